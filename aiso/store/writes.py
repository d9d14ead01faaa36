"""Statements and rows shared by the transactions of several processes.

Written as synchronous functions of a ``Connection``, so that each runs inside a
``SyncTransaction`` (``aiso.store.sync_transaction``): the orchestrator's units of work (the
gateway's cancel is one too) and the gateway's task creation.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert

from aiso import topology
from aiso.store import tables as t
from aiso.store.driver import DriverStatement
from aiso.store.model import OutboxMessage, TaskStatus

__all__ = [
    "as_utc",
    "event_message",
    "finished_task_data",
    "finished_webhook_data",
    "insert_events",
    "insert_events_with_ids",
    "insert_outbox",
    "utcnow",
    "webhook_row",
]

_INSERT_OUTBOX = DriverStatement(insert(t.outbox))
_INSERT_EVENTS = DriverStatement(insert(t.events))
_WEBHOOK_NAMESPACE = uuid.UUID("3b0c9a56-90e5-4f61-b3e1-1a5e0b0c0000")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp aiso writes is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def event_message(
    event_id: int, task_id: str, kind: str, data: dict[str, Any], at: datetime
) -> OutboxMessage:
    """The message announcing a stored task event on ``aiso.events``."""
    body = {"id": event_id, "task_id": task_id, "kind": kind, "data": data, "at": at.isoformat()}
    return OutboxMessage(
        exchange=topology.EVENTS_EXCHANGE,
        routing_key=topology.event_routing_key(task_id, kind),
        message_id=f"event-{event_id}",
        body=json.dumps(body).encode(),
    )


def webhook_row(
    *, task_id: str, url: str, event: str, key: str, data: dict[str, Any]
) -> dict[str, Any]:
    """A ``webhook_deliveries`` row for a task's event, due now.

    ``key`` names the event within the task, so its ``webhook-id`` is stable: a receiver that
    sees the same id twice has seen the same event.
    """
    now = utcnow()
    body = {"type": f"task.{event}", "timestamp": now.isoformat(), "data": data}
    return {
        "id": f"msg_{uuid.uuid5(_WEBHOOK_NAMESPACE, f'{task_id}:{key}').hex}",
        "task_id": task_id,
        "url": url,
        "event": event,
        "body": json.dumps(body, default=str).encode(),
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def finished_task_data(
    status: TaskStatus, error: dict[str, Any] | None, degraded: list[str] | None
) -> dict[str, Any]:
    """The data of the event that ends a task."""
    data: dict[str, Any] = {"status": status.value}
    if error is not None:
        data["error"] = error
    if degraded:
        data["degraded_steps"] = degraded
    return data


def finished_webhook_data(
    task_id: str,
    pipeline: str,
    status: TaskStatus,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    degraded: list[str] | None,
    finished_at: datetime,
) -> dict[str, Any]:
    """What the client's webhook says when a task ends."""
    return {
        "task_id": task_id,
        "pipeline": pipeline,
        "status": status.value,
        "result": result,
        "error": error,
        "degraded_steps": degraded or [],
        "finished_at": finished_at.isoformat(),
    }


def insert_outbox(conn: Connection, messages: Sequence[OutboxMessage]) -> list[OutboxMessage]:
    """Add messages to the outbox in the caller's transaction; returns them with their row
    ids, to publish once it has committed."""
    if not messages:
        return []
    now = utcnow()
    rows = [
        {
            "exchange": m.exchange,
            "routing_key": m.routing_key,
            "message_id": m.message_id,
            "body": m.body,
            "headers": m.headers,
            "created_at": now,
        }
        for m in messages
    ]
    ids = _INSERT_OUTBOX.inserted_ids(conn, rows)
    return [
        OutboxMessage(m.exchange, m.routing_key, m.message_id, m.body, m.headers, i)
        for m, i in zip(messages, ids, strict=True)
    ]


def _event_rows(
    events: Sequence[tuple[str, str, dict[str, Any]]], at: datetime
) -> list[dict[str, Any]]:
    return [
        {"task_id": task_id, "kind": kind, "data": data, "created_at": at}
        for task_id, kind, data in events
    ]


def insert_events(
    conn: Connection, events: Sequence[tuple[str, str, dict[str, Any]]], at: datetime
) -> None:
    """Record task events, given as (task id, kind, data), in one statement."""
    _INSERT_EVENTS.run(conn, _event_rows(events, at))


def insert_events_with_ids(
    conn: Connection, events: Sequence[tuple[str, str, dict[str, Any]]], at: datetime
) -> list[int]:
    """``insert_events`` for a caller that needs their ids (one statement per row where the
    driver reports row ids, so only those callers pay it)."""
    return _INSERT_EVENTS.inserted_ids(conn, _event_rows(events, at))
