"""Reads of a task, its step attempts and its events, as synchronous functions of a
``Connection`` (``Store.read`` runs them)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select

from aiso.store import tables as t
from aiso.store.driver import DriverStatement
from aiso.store.model import EventRecord, StepRecord, StepStatus, TaskRecord, TaskStatus
from aiso.store.writes import as_utc, utcnow

__all__ = ["attempt_fields", "events", "steps", "task"]

# Without the plan snapshot: nothing reading a task needs it, and it is the largest column.
_TASK = DriverStatement(
    select(*[c for c in t.tasks.c if c.name != "plan"]).where(t.tasks.c.id == bindparam("task_id"))
)
_STEPS = DriverStatement(
    select(t.step_attempts)
    .where(t.step_attempts.c.task_id == bindparam("task_id"))
    .order_by(t.step_attempts.c.id)
)
_EVENTS = DriverStatement(
    select(t.events)
    .where(t.events.c.task_id == bindparam("task_id"), t.events.c.id > bindparam("after"))
    .order_by(t.events.c.id)
)


def task(conn: Connection, task_id: str) -> TaskRecord | None:
    found = _TASK.rows(conn, {"task_id": task_id})
    if not found:
        return None
    row = found[0]
    return TaskRecord(
        id=row.id,
        pipeline=row.pipeline,
        status=TaskStatus(row.status),
        input=row.input,
        parameters=row.parameters,
        callback_url=row.callback_url,
        result=row.result,
        error=row.error,
        created_at=as_utc(row.created_at) or utcnow(),
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        deadline_at=as_utc(row.deadline_at) or utcnow(),
        updated_at=as_utc(row.updated_at) or utcnow(),
    )


def attempt_fields(row: Any) -> dict[str, Any]:
    """A ``step_attempts`` row's fields as every reader of attempts takes them: times in UTC,
    status as stored (a string)."""
    return {
        "step": row.step,
        "attempt": row.attempt,
        "service": row.service,
        "status": row.status,
        "message_id": row.message_id,
        "output": row.output,
        "error": row.error,
        "replica": row.replica,
        "dispatched_at": as_utc(row.dispatched_at) or utcnow(),
        "finished_at": as_utc(row.finished_at),
    }


def steps(conn: Connection, task_id: str) -> list[StepRecord]:
    records = []
    for row in _STEPS.rows(conn, {"task_id": task_id}):
        fields = attempt_fields(row)
        fields["status"] = StepStatus(row.status)
        records.append(StepRecord(task_id=row.task_id, **fields))
    return records


def events(conn: Connection, task_id: str, after: int = 0) -> list[EventRecord]:
    return [
        EventRecord(r.id, r.task_id, r.kind, r.data, as_utc(r.created_at) or utcnow())
        for r in _EVENTS.rows(conn, {"task_id": task_id, "after": after})
    ]
