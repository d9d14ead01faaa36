"""A batch's tasks held in memory, and the writes made to them, flushed as a few statements.

The orchestrator applies messages in batches (``aiso.orchestrator.batches``). Instead of
reading and writing rows one statement at a time per message, a ``UnitOfWork`` locks and
reads every task of the batch and its step attempts in two queries, lets the engine change
them in memory, and writes the changes back at the end with one multi-row statement per
table. The task row lock (PostgreSQL) or the single writer (SQLite) is held from the read to
the commit, so the compare-and-set checks the engine makes in memory are as safe as the
``UPDATE … WHERE status = …`` they replace: no other writer touches a locked task's rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, insert, select, update

from aiso.orchestrator.timers import Timer, timer_messages
from aiso.resources import ResolvedPipeline
from aiso.store import OutboxMessage, Store, TaskStatus
from aiso.store import tables as t
from aiso.store.driver import DriverStatement
from aiso.store.reads import attempt_fields
from aiso.store.writes import (
    as_utc,
    event_message,
    insert_events_with_ids,
    insert_outbox,
    utcnow,
    webhook_row,
)

__all__ = ["Attempt", "TaskState", "UnitOfWork"]

_TASK_COLUMNS = [c for c in t.tasks.c if c.name != "plan"]
_A = t.step_attempts.c


@dataclass
class Attempt:
    """One step attempt row, as the engine sees and changes it."""

    step: str
    attempt: int
    service: str
    status: str
    message_id: str
    dispatched_at: datetime
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    replica: str | None = None
    finished_at: datetime | None = None
    stored: bool = True
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)
        if self.stored:
            self.changed.update(values)

    def row(self, task_id: str) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "step": self.step,
            "attempt": self.attempt,
            "service": self.service,
            "status": self.status,
            "message_id": self.message_id,
            "output": self.output,
            "error": self.error,
            "replica": self.replica,
            "dispatched_at": self.dispatched_at,
            "finished_at": self.finished_at,
        }


@dataclass
class TaskState:
    """A locked task: its row (without the plan) and its step attempts in insertion order."""

    id: str
    pipeline: str
    status: TaskStatus
    input: dict[str, Any]
    parameters: dict[str, Any]
    callback_url: str | None
    callback_progress: bool
    deadline_at: datetime
    attempts: list[Attempt]
    plan: ResolvedPipeline | None = None
    """The plan from the engine's cache, when it had it; else ``plan_json`` is read."""
    plan_json: dict[str, Any] | None = None
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        """Change task columns; status and deadline also update what the engine reads."""
        if "status" in values:
            self.status = TaskStatus(values["status"])
        if "deadline_at" in values:
            self.deadline_at = values["deadline_at"]
        self.changed.update(values)

    def attempt(self, step: str, attempt: int) -> Attempt | None:
        return next((a for a in self.attempts if a.step == step and a.attempt == attempt), None)

    def latest(self, step: str) -> Attempt | None:
        return max(
            (a for a in self.attempts if a.step == step), key=lambda a: a.attempt, default=None
        )


@dataclass
class _Event:
    task_id: str
    kind: str
    data: dict[str, Any]
    webhook_url: str | None


class UnitOfWork:
    """The tasks one transaction works on, and what it changes; see the module docstring."""

    def __init__(
        self,
        store: Store,
        conn: Connection,
        *,
        cached_plan: Callable[[str], ResolvedPipeline | None] = lambda _task_id: None,
    ) -> None:
        self.store = store
        self.conn = conn
        self._cached_plan = cached_plan
        self._tasks: dict[str, TaskState | None] = {}
        self._new_attempts: list[tuple[str, Attempt]] = []
        self._events: list[_Event] = []
        self._webhooks: list[dict[str, Any]] = []
        self._timers: list[Timer] = []
        self._messages: list[OutboxMessage] = []

    # --- reading ---------------------------------------------------------------------------

    def load(self, task_ids: Iterable[str]) -> None:
        """Lock and read the tasks not read yet, in id order (a fixed lock order keeps two
        orchestrators from deadlocking on PostgreSQL)."""
        wanted = sorted({i for i in task_ids if i not in self._tasks})
        if not wanted:
            return
        cached = {task_id: self._cached_plan(task_id) for task_id in wanted}
        uncached = [task_id for task_id, plan in cached.items() if plan is None]
        rows, attempts, plans = _read_tasks(self.conn, wanted, uncached)
        for task_id in wanted:
            self._tasks[task_id] = None
        for row in rows:
            self._tasks[row.id] = TaskState(
                id=row.id,
                pipeline=row.pipeline,
                status=TaskStatus(row.status),
                input=row.input,
                parameters=row.parameters or {},
                callback_url=row.callback_url,
                callback_progress=bool(row.callback_progress),
                deadline_at=as_utc(row.deadline_at) or utcnow(),
                attempts=[Attempt(**attempt_fields(a)) for a in attempts.get(row.id, [])],
                plan=cached[row.id],
                plan_json=plans.get(row.id),
            )

    def task(self, task_id: str) -> TaskState | None:
        """The locked task, read now if the batch did not read it yet; None if unknown."""
        if task_id not in self._tasks:
            self.load([task_id])
        return self._tasks[task_id]

    # --- recording changes -----------------------------------------------------------------

    def add_attempt(self, task: TaskState, attempt: Attempt) -> None:
        """A new attempt (made with ``stored=False``), inserted at the flush."""
        task.attempts.append(attempt)
        self._new_attempts.append((task.id, attempt))

    def event(self, task: TaskState, kind: str, **data: Any) -> None:
        """Record a progress event; a task that asked for progress also gets it by webhook."""
        url = task.callback_url if task.callback_progress else None
        self._events.append(_Event(task.id, kind, data, url))

    def final_event(self, task: TaskState, kind: str, data: dict[str, Any]) -> None:
        """Record the event that ends the task: its webhook is the final one, not progress."""
        self._events.append(_Event(task.id, kind, data, None))

    def webhook(self, **delivery: Any) -> None:
        """A client webhook to deliver once committed (``aiso.webhooks`` sends it); the
        arguments are ``webhook_row``'s."""
        self._webhooks.append(webhook_row(**delivery))

    def arm(self, timer: Timer) -> None:
        self._timers.append(timer)

    def send(self, message: OutboxMessage) -> None:
        self._messages.append(message)

    # --- writing ---------------------------------------------------------------------------

    def flush(self) -> list[OutboxMessage]:
        """Write every change, put the resulting messages in the outbox, and return them."""
        conn = self.conn
        tasks = [s for s in self._tasks.values() if s is not None]
        for columns, rows in _grouped(
            {"_id": s.id, **_bound(s.changed)} for s in tasks if s.changed
        ).items():
            _task_update(columns).run(conn, rows)
        changed = (
            {"_t": s.id, "_s": a.step, "_a": a.attempt, **_bound(a.changed)}
            for s in tasks
            for a in s.attempts
            if a.stored and a.changed
        )
        for columns, rows in _grouped(changed).items():
            _attempt_update(columns).run(conn, rows)
        if self._new_attempts:
            _INSERT_ATTEMPTS.run(conn, [a.row(task_id) for task_id, a in self._new_attempts])
        messages = [*self._messages, *timer_messages(self._timers)]
        messages += self._write_events()
        if self._webhooks:
            conn.execute(_INSERT_WEBHOOKS, self._webhooks)
        return insert_outbox(conn, messages)

    def _write_events(self) -> list[OutboxMessage]:
        """Insert the events; announce the last one of each task on ``aiso.events``.

        Every event is in the store, and an AMQP event only wakes the gateways' watchers,
        which then read the store: one wake-up per task per transaction is enough.
        """
        if not self._events:
            return []
        now = utcnow()
        ids = insert_events_with_ids(
            self.conn, [(e.task_id, e.kind, e.data) for e in self._events], now
        )
        last: dict[str, tuple[int, _Event]] = {}
        for event_id, e in zip(ids, self._events, strict=True):
            last[e.task_id] = (event_id, e)
            if e.webhook_url:
                self._webhooks.append(
                    webhook_row(
                        task_id=e.task_id,
                        url=e.webhook_url,
                        event=e.kind,
                        key=f"event-{event_id}",
                        data={"task_id": e.task_id, "kind": e.kind, **e.data},
                    )
                )
        return [
            event_message(event_id, e.task_id, e.kind, e.data, now) for event_id, e in last.values()
        ]


# The statements of every transaction, built once: building one costs more than running it.
_IDS: BindParameter[list[str]] = bindparam("ids", expanding=True)
# FOR UPDATE locks the rows on PostgreSQL; SQLite renders none (BEGIN IMMEDIATE serialises).
_SELECT_TASKS = DriverStatement(
    select(*_TASK_COLUMNS).where(t.tasks.c.id.in_(_IDS)).order_by(t.tasks.c.id).with_for_update()
)
_SELECT_ATTEMPTS = DriverStatement(
    select(t.step_attempts).where(_A.task_id.in_(_IDS)).order_by(_A.task_id, _A.id)
)
_SELECT_PLANS = DriverStatement(select(t.tasks.c.id, t.tasks.c.plan).where(t.tasks.c.id.in_(_IDS)))
_INSERT_ATTEMPTS = DriverStatement(insert(t.step_attempts))
_INSERT_WEBHOOKS = insert(t.webhook_deliveries)


@functools.cache
def _task_update(columns: tuple[str, ...]) -> DriverStatement:
    stmt = update(t.tasks).where(t.tasks.c.id == bindparam("_id"))
    return DriverStatement(stmt.values({c: bindparam(f"v_{c}") for c in columns}))


@functools.cache
def _attempt_update(columns: tuple[str, ...]) -> DriverStatement:
    key = (_A.task_id == bindparam("_t")) & (_A.step == bindparam("_s"))
    stmt = update(t.step_attempts).where(key & (_A.attempt == bindparam("_a")))
    return DriverStatement(stmt.values({c: bindparam(f"v_{c}") for c in columns}))


def _read_tasks(
    conn: Connection, wanted: list[str], uncached: list[str]
) -> tuple[list[Any], dict[str, list[Any]], dict[str, Any]]:
    """The task rows (locked), their attempts by task, and the plans not cached."""
    rows = _SELECT_TASKS.rows(conn, {"ids": wanted})
    attempts: dict[str, list[Any]] = {}
    plans: dict[str, Any] = {}
    if not rows:
        return rows, attempts, plans
    found = [row.id for row in rows]
    for a in _SELECT_ATTEMPTS.rows(conn, {"ids": found}):
        attempts.setdefault(a.task_id, []).append(a)
    need = sorted(set(uncached) & set(found))
    if need:
        plans = {row.id: row.plan for row in _SELECT_PLANS.rows(conn, {"ids": need})}
    return rows, attempts, plans


def _bound(values: dict[str, Any]) -> dict[str, Any]:
    # A bind parameter may not share its column's name in an UPDATE's SET clause.
    return {f"v_{name}": value for name, value in values.items()}


def _grouped(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows by the set of columns they change: one executemany statement per set."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        columns = tuple(sorted(c[2:] for c in row if c.startswith("v_")))
        groups.setdefault(columns, []).append(row)
    return groups
