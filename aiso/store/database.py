"""The ``Store``: engine set-up, migrations, reads, and the writes shared by several processes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import delete, event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from aiso import topology
from aiso.store import tables as t
from aiso.store.model import (
    EventRecord,
    OutboxMessage,
    StepRecord,
    StepStatus,
    TaskRecord,
    TaskStatus,
)

__all__ = [
    "IdempotencyConflict",
    "Store",
    "as_utc",
    "event_message",
    "finished_task_data",
    "finished_webhook_data",
    "open_store",
    "utcnow",
    "webhook_row",
]


_GROUP_LIMIT = 64  # submissions per group commit: keeps one transaction short
_Created = tuple[str, list[OutboxMessage]]
_Submission = tuple[
    dict[str, Any],
    OutboxMessage,
    "tuple[str, str] | None",
    "asyncio.Future[tuple[str, list[OutboxMessage]]]",
]
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


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different request body."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


def _sqlite_serialised_writes(engine: AsyncEngine) -> None:
    """Make SQLite usable by several processes at once.

    WAL lets readers run beside the writer; ``BEGIN IMMEDIATE`` takes the write lock at the
    start of a transaction instead of failing half-way with "database is locked" when a read
    turns into a write; ``busy_timeout`` makes waiting writers queue instead of erroring.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _alembic_config(url: str) -> Config:
    config = Config(str(Path(__file__).with_name("alembic.ini")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class Store:
    """Handle on the task store; one per process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite has one writer at a time: queueing writers here is cheaper than letting
        # them spin in SQLite's busy handler.
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        self._submissions: list[_Submission] = []
        self._writer: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        url = self.engine.url.render_as_string(hide_password=False)
        await asyncio.to_thread(command.upgrade, _alembic_config(url), "head")

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: commits on success, rolls back on any exception."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    def for_update(self, query: Any) -> Any:
        """Row lock on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers."""
        return query.with_for_update() if self.dialect == "postgresql" else query

    # --- writes used inside callers' transactions --------------------------------------------

    async def enqueue(
        self, conn: AsyncConnection, messages: Sequence[OutboxMessage]
    ) -> list[OutboxMessage]:
        """Add messages to the outbox; they are published after the transaction commits."""
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
        result = await conn.execute(insert(t.outbox).returning(t.outbox.c.id), rows)
        ids = [row[0] for row in result]
        return [
            OutboxMessage(m.exchange, m.routing_key, m.message_id, m.body, m.headers, i)
            for m, i in zip(messages, ids, strict=True)
        ]

    async def add_event(
        self, conn: AsyncConnection, task_id: str, kind: str, data: dict[str, Any]
    ) -> OutboxMessage:
        """Record a task event and return the message announcing it on ``aiso.events``."""
        now = utcnow()
        row = await conn.execute(
            insert(t.events)
            .values(task_id=task_id, kind=kind, data=data, created_at=now)
            .returning(t.events.c.id)
        )
        return event_message(row.scalar_one(), task_id, kind, data, now)

    # --- task creation and cancellation (gateway) ---------------------------------------------

    async def find_idempotent(self, key: str, request_hash: str) -> str | None:
        """The task created earlier with this key, if any; a different body is a conflict."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.idempotency_keys).where(t.idempotency_keys.c.key == key)
                )
            ).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise IdempotencyConflict(row.task_id)
        return str(row.task_id)

    async def create_task(
        self,
        task: dict[str, Any],
        announce: OutboxMessage,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[str, list[OutboxMessage]]:
        """Insert a pending task and the message that starts it, atomically.

        With ``idempotency`` = (key, request hash) a repeated request returns the first task id
        and no messages. Returns (task id, outbox messages to publish) once committed.

        Submissions that arrive together share one transaction (group commit): under load the
        gateway then takes the write lock once per group instead of once per task, which is
        what limits it on SQLite. Those without a key are inserted with one multi-row
        statement per table; each one with a key runs in its own savepoint, so one that fails
        (a key reused with another body) fails alone.
        """
        future: asyncio.Future[tuple[str, list[OutboxMessage]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._submissions.append((task, announce, idempotency, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_submissions())
        return await future

    async def _write_submissions(self) -> None:
        while self._submissions:
            group, self._submissions = (
                self._submissions[:_GROUP_LIMIT],
                self._submissions[_GROUP_LIMIT:],
            )
            plain = [s for s in group if s[2] is None]
            keyed = [s for s in group if s[2] is not None]
            done: list[tuple[asyncio.Future[tuple[str, list[OutboxMessage]]], _Created]] = []
            try:
                async with self.transaction() as conn:
                    if plain:
                        created = await self._insert_tasks(conn, [(s[0], s[1]) for s in plain])
                        done += zip([s[3] for s in plain], created, strict=True)
                    for task, announce, idempotency, future in keyed:
                        try:
                            if len(group) == 1:
                                one = await self._insert_task(conn, task, announce, idempotency)
                            else:
                                async with conn.begin_nested():
                                    one = await self._insert_task(conn, task, announce, idempotency)
                        except Exception as exc:
                            if len(group) == 1:
                                raise
                            future.set_exception(exc)
                            continue
                        done.append((future, one))
            except Exception as exc:
                for _task, _announce, _key, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future, result in done:  # only now: the group has committed
                if not future.done():
                    future.set_result(result)

    async def _insert_tasks(
        self, conn: AsyncConnection, tasks: list[tuple[dict[str, Any], OutboxMessage]]
    ) -> list[_Created]:
        """Insert tasks without idempotency keys: nothing but a bug can make one of them fail
        alone, so they need no savepoints, and each table gets one multi-row statement."""
        now = utcnow()
        created = {"status": TaskStatus.PENDING.value}
        await conn.execute(insert(t.tasks), [task for task, _ in tasks])
        rows = [
            {"task_id": task["id"], "kind": "created", "data": created, "created_at": now}
            for task, _ in tasks
        ]
        stmt = insert(t.events).returning(t.events.c.id, sort_by_parameter_order=True)
        ids = [row[0] for row in await conn.execute(stmt, rows)]
        messages: list[OutboxMessage] = []
        for (task, announce), event_id in zip(tasks, ids, strict=True):
            messages += [announce, event_message(event_id, task["id"], "created", created, now)]
        stored = await self.enqueue(conn, messages)
        return [(str(task["id"]), stored[2 * i : 2 * i + 2]) for i, (task, _) in enumerate(tasks)]

    async def _insert_task(
        self,
        conn: AsyncConnection,
        task: dict[str, Any],
        announce: OutboxMessage,
        idempotency: tuple[str, str] | None,
    ) -> tuple[str, list[OutboxMessage]]:
        if idempotency is not None:
            key, digest = idempotency
            existing = (
                await conn.execute(
                    select(t.idempotency_keys).where(t.idempotency_keys.c.key == key)
                )
            ).first()
            if existing is not None:
                if existing.request_hash != digest:
                    raise IdempotencyConflict(existing.task_id)
                return str(existing.task_id), []
        await conn.execute(insert(t.tasks).values(**task))
        if idempotency is not None:
            await conn.execute(
                insert(t.idempotency_keys).values(
                    key=idempotency[0],
                    task_id=task["id"],
                    request_hash=idempotency[1],
                    created_at=task["created_at"],
                )
            )
        created = await self.add_event(
            conn, task["id"], "created", {"status": TaskStatus.PENDING.value}
        )
        return str(task["id"]), await self.enqueue(conn, [announce, created])

    async def cancel_task(self, task_id: str) -> tuple[TaskStatus | None, list[OutboxMessage]]:
        """Cancel a pending or running task. Returns its status afterwards (None if unknown)."""
        async with self.transaction() as conn:
            row = (
                await conn.execute(
                    self.for_update(select(t.tasks.c.status).where(t.tasks.c.id == task_id))
                )
            ).first()
            if row is None:
                return None, []
            status = TaskStatus(row.status)
            if status.terminal:
                return status, []
            finished = await self.finish_task(
                conn,
                task_id,
                TaskStatus.CANCELLED,
                error={"code": "Cancelled", "message": "cancelled by the client"},
            )
            messages = await self.enqueue(conn, finished)
        return TaskStatus.CANCELLED, messages

    async def schedule_webhook(self, conn: AsyncConnection, **delivery: Any) -> None:
        """Record a webhook delivery in the caller's transaction (``aiso.webhooks`` sends it);
        the arguments are ``webhook_row``'s."""
        await conn.execute(insert(t.webhook_deliveries).values(**webhook_row(**delivery)))

    async def finish_task(
        self,
        conn: AsyncConnection,
        task_id: str,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        degraded: list[str] | None = None,
    ) -> list[OutboxMessage]:
        """Move a task (locked by the caller) to a terminal status; close its open attempts.

        Returns the event message; the caller puts it in the outbox with the rest.

        ``degraded`` names steps a fallback skipped; the event and webhook say so.
        """
        now = utcnow()
        row = (
            await conn.execute(
                update(t.tasks)
                .where(t.tasks.c.id == task_id)
                .values(
                    status=status.value, result=result, error=error, finished_at=now, updated_at=now
                )
                .returning(t.tasks.c.pipeline, t.tasks.c.callback_url, t.tasks.c.finished_at)
            )
        ).one()
        await conn.execute(
            update(t.step_attempts)
            .where(
                t.step_attempts.c.task_id == task_id,
                t.step_attempts.c.status.in_([StepStatus.SCHEDULED, StepStatus.DISPATCHED]),
            )
            .values(status=StepStatus.CANCELLED.value, finished_at=now)
        )
        if row.callback_url:
            await self.schedule_webhook(
                conn,
                task_id=task_id,
                url=row.callback_url,
                event=status.value,
                key=f"{status.value}:{now.isoformat()}",
                data=finished_webhook_data(
                    task_id, row.pipeline, status, result, error, degraded, now
                ),
            )
        data = finished_task_data(status, error, degraded)
        return [await self.add_event(conn, task_id, status.value, data)]

    async def delete_expired(self, before: datetime) -> int:
        """Delete finished tasks (and, by cascade, their rows) that ended before ``before``."""
        async with self.transaction() as conn:
            result = await conn.execute(
                delete(t.tasks).where(
                    t.tasks.c.finished_at.is_not(None), t.tasks.c.finished_at < before
                )
            )
        return int(result.rowcount or 0)

    # --- reads -------------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self.engine.connect() as conn:
            # Without the plan snapshot: nothing reading a task needs it, and it is the
            # largest column to decode.
            columns = [c for c in t.tasks.c if c.name != "plan"]
            row = (await conn.execute(select(*columns).where(t.tasks.c.id == task_id))).first()
        if row is None:
            return None
        m = row._mapping
        return TaskRecord(
            id=m["id"],
            pipeline=m["pipeline"],
            status=TaskStatus(m["status"]),
            input=m["input"],
            parameters=m["parameters"],
            callback_url=m["callback_url"],
            result=m["result"],
            error=m["error"],
            created_at=as_utc(m["created_at"]) or utcnow(),
            started_at=as_utc(m["started_at"]),
            finished_at=as_utc(m["finished_at"]),
            deadline_at=as_utc(m["deadline_at"]) or utcnow(),
            updated_at=as_utc(m["updated_at"]) or utcnow(),
        )

    async def get_steps(self, task_id: str) -> list[StepRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.step_attempts)
                .where(t.step_attempts.c.task_id == task_id)
                .order_by(t.step_attempts.c.id)
            )
            return [
                StepRecord(
                    task_id=r.task_id,
                    step=r.step,
                    attempt=r.attempt,
                    service=r.service,
                    status=StepStatus(r.status),
                    message_id=r.message_id,
                    output=r.output,
                    error=r.error,
                    replica=r.replica,
                    dispatched_at=as_utc(r.dispatched_at) or utcnow(),
                    finished_at=as_utc(r.finished_at),
                )
                for r in rows
            ]

    async def events_since(self, task_id: str, after: int = 0) -> list[EventRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.events)
                .where(t.events.c.task_id == task_id, t.events.c.id > after)
                .order_by(t.events.c.id)
            )
            return [
                EventRecord(r.id, r.task_id, r.kind, r.data, as_utc(r.created_at) or utcnow())
                for r in rows
            ]


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Connect to the store at ``url``; create the SQLite directory and migrate if asked."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # A ping before each checkout finds connections a PostgreSQL restart closed; a SQLite
    # file cannot drop its connection, and the ping is a round trip per transaction.
    engine = create_async_engine(url, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    if engine.dialect.name == "sqlite":
        _sqlite_serialised_writes(engine)
    store = Store(engine)
    if migrate:
        await store.migrate()
    return store
