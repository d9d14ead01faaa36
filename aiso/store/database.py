"""The ``Store``: engine set-up, migrations, transactions, task creation and reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, delete, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from aiso.settings import store_url
from aiso.store import reads
from aiso.store import tables as t
from aiso.store.model import EventRecord, OutboxMessage, StepRecord, TaskRecord
from aiso.store.submissions import IdempotencyConflict, SubmissionWriter, find_key
from aiso.store.sync_transaction import SqliteThread, SyncTransaction
from aiso.store.writes import as_utc, utcnow

__all__ = ["IdempotencyConflict", "Store", "as_utc", "open_store", "utcnow"]

T = TypeVar("T")


_WRITE_OPTION = "aiso_write"
WRITES = {_WRITE_OPTION: True}
"""Execution options of the connections that write: on SQLite they begin ``IMMEDIATE``."""


def _sqlite_serialised_writes(engine: Engine) -> None:
    """Make SQLite usable by several processes at once.

    WAL lets readers run beside the writer. A writing transaction (a connection with the
    ``WRITES`` options) begins ``IMMEDIATE``, taking the write lock at its start instead of
    failing half-way with "database is locked" when its first write finds another writer;
    ``busy_timeout`` makes waiting writers queue instead of erroring. Reads begin deferred:
    a snapshot, without the write lock.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        writes = connection.get_execution_options().get(_WRITE_OPTION, False)
        # On the driver's cursor: a statement through SQLAlchemy's execution layer costs
        # several times what SQLite spends on it, and every transaction begins.
        cursor = connection.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        finally:
            cursor.close()


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
        self._writes = engine.execution_options(**WRITES)
        self._sqlite_thread: SqliteThread | None = None
        self._submissions = SubmissionWriter(self.sync_transaction)

    # --- lifecycle ---------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        url = self.engine.url.render_as_string(hide_password=False)
        await asyncio.to_thread(command.upgrade, _alembic_config(url), "head")

    async def close(self) -> None:
        await self._submissions.close()
        if self._sqlite_thread is not None:
            await self._sqlite_thread.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: commits on success, rolls back on any exception."""
        if self._write_lock is None:
            async with self._writes.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writes.begin() as conn:
            yield conn

    @asynccontextmanager
    async def sync_transaction(self) -> AsyncIterator[SyncTransaction]:
        """A write transaction for statements written as synchronous code (see
        ``aiso.store.sync_transaction``): the hot paths, where per-statement overhead counts."""
        if self._write_lock is None:
            async with self._writes.begin() as conn:
                yield SyncTransaction.over(conn)
            return
        async with self._write_lock, self._sqlite().transaction() as tx:
            yield tx

    def _sqlite(self) -> SqliteThread:
        if self._sqlite_thread is None:
            url = self.engine.url.render_as_string(hide_password=False)
            self._sqlite_thread = SqliteThread.for_url(url, _sqlite_serialised_writes, WRITES)
        return self._sqlite_thread

    def for_update(self, query: Any) -> Any:
        """Row lock on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already serialises writers."""
        return query.with_for_update() if self.dialect == "postgresql" else query

    # --- task creation (gateway) ---------------------------------------------------------------

    async def find_idempotent(self, key: str, request_hash: str) -> str | None:
        """The task created earlier with this key, if any; a different body is a conflict."""
        return await self.read(lambda conn: find_key(conn, key, request_hash))

    async def create_task(
        self,
        task: dict[str, Any],
        announce: OutboxMessage,
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[str, list[OutboxMessage]]:
        """Insert a pending task and the message that starts it, atomically.

        With ``idempotency`` = (key, request hash) a repeated request returns the first task id
        and no messages. Returns (task id, outbox messages to publish) once committed.
        Submissions that arrive together share a transaction (``aiso.store.submissions``).
        """
        return await self._submissions.create(task, announce, idempotency)

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

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a read-only connection: on SQLite in one trip to the store's thread
        (``aiso.store.sync_transaction``), on PostgreSQL through ``run_sync``."""
        if self.dialect == "sqlite":
            return await self._sqlite().read(fn)
        async with self.engine.connect() as conn:
            return await conn.run_sync(fn)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self.read(lambda conn: reads.task(conn, task_id))

    async def get_steps(self, task_id: str) -> list[StepRecord]:
        return await self.read(lambda conn: reads.steps(conn, task_id))

    async def get_task_and_steps(self, task_id: str) -> tuple[TaskRecord, list[StepRecord]] | None:
        """The task and its step attempts, read together; None if unknown."""

        def both(conn: Connection) -> tuple[TaskRecord, list[StepRecord]] | None:
            task = reads.task(conn, task_id)
            return None if task is None else (task, reads.steps(conn, task_id))

        return await self.read(both)

    async def events_since(self, task_id: str, after: int = 0) -> list[EventRecord]:
        return await self.read(lambda conn: reads.events(conn, task_id, after))


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Connect to the store at ``url`` (``store_url`` adds the async driver when it is left
    out); create the SQLite directory and migrate if asked."""
    url = store_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # A ping before each checkout finds connections a PostgreSQL restart closed; a SQLite
    # file cannot drop its connection, and the ping is a round trip per transaction.
    engine = create_async_engine(url, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    if engine.dialect.name == "sqlite":
        _sqlite_serialised_writes(engine.sync_engine)
    store = Store(engine)
    if migrate:
        await store.migrate()
    return store
