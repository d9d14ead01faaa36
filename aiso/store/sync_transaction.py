"""Transactions whose statements run as plain synchronous SQLAlchemy calls, a function at a time.

Through ``aiosqlite`` every statement is a trip to the connection's thread and back through
SQLAlchemy's greenlet adaption: about 0.2 ms each, which made up most of what one of the
orchestrator's transactions cost (ten statements: 2 to 4 ms, against well under 0.1 ms of
SQLite's own work). A ``SyncTransaction`` takes whole functions instead — a unit of work's
reads, then all its writes — and runs each in one trip:

* on SQLite, on one thread of the store's own with a plain ``pysqlite`` connection to the
  same file (same pragmas, same ``BEGIN IMMEDIATE``, same in-process write lock as
  ``Store.transaction``);
* on PostgreSQL, through ``AsyncConnection.run_sync`` over ``asyncpg``, where each statement
  is a round trip to the server anyway.

Callers write their statements once, as synchronous code on a ``Connection``.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SqliteThread", "SyncTransaction"]

T = TypeVar("T")


class SyncTransaction(abc.ABC):
    """An open transaction; ``run`` executes a function of a sync ``Connection`` inside it."""

    @abc.abstractmethod
    async def run(self, fn: Callable[[Connection], T], *, last: bool = False) -> T:
        """Run ``fn(connection)`` in the transaction; its statements commit or roll back
        together with every other function run in it. ``last`` says nothing else will run in
        it, so it may commit in the same trip (it commits when its block ends otherwise)."""

    @staticmethod
    def over(conn: AsyncConnection) -> SyncTransaction:
        """A transaction on an async connection (PostgreSQL): functions run via ``run_sync``."""
        return _GreenletTransaction(conn)


class _GreenletTransaction(SyncTransaction):
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def run(self, fn: Callable[[Connection], T], *, last: bool = False) -> T:
        return await self._conn.run_sync(fn)


class _ThreadTransaction(SyncTransaction):
    """Begins with its first function and commits with its last, in the same trips."""

    def __init__(self, thread: SqliteThread) -> None:
        self._thread = thread
        self._conn: Connection | None = None
        self.ended = False

    def _step(self, fn: Callable[[Connection], T], last: bool) -> T:
        if self._conn is None:
            self._conn = self._thread.writer()
            self._conn.begin()
        result = fn(self._conn)
        if last:
            self.end(True)
        return result

    def end(self, commit: bool) -> None:
        conn, self._conn, self.ended = self._conn, None, True
        if conn is None:
            return
        try:
            if commit:
                conn.commit()
            else:
                conn.rollback()
        except BaseException:
            self._thread.discard_writer()  # in an unknown state: the next one starts afresh
            raise

    async def run(self, fn: Callable[[Connection], T], *, last: bool = False) -> T:
        if self.ended:
            raise RuntimeError("the transaction has ended")
        return await self._thread.call(self._step, fn, last)


class SqliteThread:
    """A SQLite database driven from dedicated threads with a synchronous engine: one for
    transactions, one for reads.

    Reads have a thread of their own because a write can wait long for SQLite's lock (another
    process holds it, and SQLite's busy handler sleeps in steps of up to 100 ms), and in WAL
    mode a read needs no lock at all: queued behind that write on one thread, a gateway's
    ``GET`` or the last read of a ``?wait=`` would wait for another process's transaction.
    """

    def __init__(self, engine: Engine, writes: dict[str, Any]) -> None:
        self.engine = engine
        self.writes = engine.execution_options(**writes)
        """The engine with the execution options of connections that write."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiso-sqlite")
        self._writer: Connection | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiso-sqlite-read")

    @classmethod
    def for_url(
        cls, url: str, configure: Callable[[Engine], None], writes: dict[str, Any]
    ) -> SqliteThread:
        """The same database file through the standard library driver; ``configure`` installs
        the pragmas and begin behaviour the async engine has, ``writes`` are the execution
        options that make a connection a writer."""
        engine = create_engine(url.replace("sqlite+aiosqlite", "sqlite+pysqlite", 1))
        configure(engine)
        return cls(engine, writes)

    def writer(self) -> Connection:
        """The writing connection, kept open from one transaction to the next (opening and
        closing one per transaction cost about a tenth of a short transaction); used on the
        transaction thread only."""
        conn = self._writer
        if conn is None or conn.closed or conn.invalidated:
            conn = self._writer = self.writes.connect()
        return conn

    def discard_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            conn.close()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` on a connection of its own, on the reading thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, _read, self.engine, fn
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SyncTransaction]:
        """A transaction on this thread's connection, held until the block ends."""
        tx = _ThreadTransaction(self)
        try:
            yield tx
        except BaseException:
            if not tx.ended:
                await asyncio.shield(self.call(tx.end, False))
            raise
        if not tx.ended:
            await self.call(tx.end, True)

    async def close(self) -> None:
        self._reader.shutdown(wait=True)
        await self.call(self.discard_writer)
        await self.call(self.engine.dispose)
        self._executor.shutdown(wait=True)


def _read(engine: Engine, fn: Callable[[Connection], T]) -> T:
    with engine.connect() as conn:
        return fn(conn)
