"""Task creation with group commit: submissions that arrive together share one transaction.

Under load the gateway then takes the write lock once per group instead of once per task,
which is what limits it on SQLite. Submissions without an ``Idempotency-Key`` are inserted
with one multi-row statement per table; each one with a key runs in its own savepoint, so
one that fails (a key reused with another body) fails alone.

The ``created`` event is stored but not announced on ``aiso.events``: nobody can watch a task
before its id is answered, and the request that creates it subscribes before publishing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select

from aiso.store import tables as t
from aiso.store.driver import DriverStatement
from aiso.store.model import OutboxMessage, TaskStatus
from aiso.store.sync_transaction import SyncTransaction
from aiso.store.writes import insert_events, insert_outbox, utcnow

__all__ = ["Created", "IdempotencyConflict", "SubmissionWriter", "find_key"]

_GROUP_LIMIT = 64  # submissions per group commit: keeps one transaction short
_CREATED = {"status": TaskStatus.PENDING.value}
_INSERT_TASKS = DriverStatement(insert(t.tasks))
_INSERT_KEY = insert(t.idempotency_keys)
_SELECT_KEY = select(t.idempotency_keys).where(t.idempotency_keys.c.key == bindparam("key"))

Created = tuple[str, list[OutboxMessage]]
"""A created (or, for a repeated key, found) task id and the messages to publish for it."""

Transactions = Callable[[], AbstractAsyncContextManager[SyncTransaction]]
"""``Store.sync_transaction``."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different request body."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


@dataclass
class _Submission:
    task: dict[str, Any]
    announce: OutboxMessage
    idempotency: tuple[str, str] | None
    future: asyncio.Future[Created] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SubmissionWriter:
    """Queues submissions and writes them in groups, one transaction per group."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions
        self._pending: list[_Submission] = []
        self._writer: asyncio.Task[None] | None = None

    def create(
        self, task: dict[str, Any], announce: OutboxMessage, idempotency: tuple[str, str] | None
    ) -> Awaitable[Created]:
        submission = _Submission(task, announce, idempotency)
        self._pending.append(submission)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return submission.future

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _write(self) -> None:
        while self._pending:
            group = self._pending[:_GROUP_LIMIT]
            self._pending = self._pending[_GROUP_LIMIT:]
            try:
                async with self._transactions() as tx:
                    outcomes = await tx.run(functools.partial(_write_group, group=group), last=True)
            except Exception as exc:
                for submission in group:
                    if not submission.future.done():
                        submission.future.set_exception(exc)
                continue
            for submission, outcome in zip(group, outcomes, strict=True):  # only now: committed
                if submission.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    submission.future.set_exception(outcome)
                else:
                    submission.future.set_result(outcome)


def _write_group(conn: Connection, group: list[_Submission]) -> list[Created | Exception]:
    """Insert the group; each submission's outcome, in the group's order."""
    plain = [s for s in group if s.idempotency is None]
    outcomes: dict[int, Created | Exception] = {}
    if plain:
        created = _insert_plain(conn, plain)
        outcomes.update((id(s), c) for s, c in zip(plain, created, strict=True))
    for s in group:
        if s.idempotency is None:
            continue
        if len(group) == 1:  # alone: no savepoint needed, its failure is the group's
            outcomes[id(s)] = _insert_keyed(conn, s)
            continue
        try:
            with conn.begin_nested():
                outcomes[id(s)] = _insert_keyed(conn, s)
        except Exception as exc:
            outcomes[id(s)] = exc
    return [outcomes[id(s)] for s in group]


def _insert_plain(conn: Connection, plain: list[_Submission]) -> list[Created]:
    """Tasks without idempotency keys: nothing but a bug can make one of them fail alone, so
    they need no savepoints, and each table gets one multi-row statement."""
    _INSERT_TASKS.run(conn, [s.task for s in plain])
    insert_events(conn, [(s.task["id"], "created", _CREATED) for s in plain], utcnow())
    stored = insert_outbox(conn, [s.announce for s in plain])
    return [(str(s.task["id"]), [message]) for s, message in zip(plain, stored, strict=True)]


def find_key(conn: Connection, key: str, digest: str) -> str | None:
    """The task created earlier with this key, if any; ``IdempotencyConflict`` if it was
    created from another body (``digest`` is the request's hash)."""
    existing = conn.execute(_SELECT_KEY, {"key": key}).first()
    if existing is None:
        return None
    if existing.request_hash != digest:
        raise IdempotencyConflict(existing.task_id)
    return str(existing.task_id)


def _insert_keyed(conn: Connection, s: _Submission) -> Created:
    assert s.idempotency is not None
    key, digest = s.idempotency
    earlier = find_key(conn, key, digest)
    if earlier is not None:
        return earlier, []
    _INSERT_TASKS.run(conn, [s.task])
    conn.execute(
        _INSERT_KEY,
        {
            "key": key,
            "task_id": s.task["id"],
            "request_hash": digest,
            "created_at": s.task["created_at"],
        },
    )
    insert_events(conn, [(s.task["id"], "created", _CREATED)], utcnow())
    return str(s.task["id"]), insert_outbox(conn, [s.announce])
