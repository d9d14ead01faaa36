"""Publishes outbox rows to RabbitMQ with publisher confirms, then deletes them.

The writer of a transaction publishes its own rows right after commit (``publish``); rows a
crashed process left behind are picked up by ``sweep`` once they are older than the grace
period. A row may therefore be published twice, never zero times: every consumer dedupes
(compare-and-set on the step attempt, stable event and message ids).

Rows that are not urgent can be *coalesced* (``Coalescing``): instead of one message each,
they wait up to a tick (``run``'s ``tick``, a tenth of a second) and go out merged, several
rows in one message, and are deleted once that message is confirmed. They are in the outbox
meanwhile, so a crash only leaves them to the sweep. Under load this takes most of the
broker traffic that is not on a task's critical path (timers, progress wake-ups) off the
broker and off the publishing process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from sqlalchemy import bindparam, delete, select

from aiso.store import tables as t
from aiso.store.database import Store, utcnow
from aiso.store.driver import DriverStatement
from aiso.store.model import OutboxMessage

__all__ = ["Coalescing", "OutboxRelay"]

_DELETE_PUBLISHED = DriverStatement(
    delete(t.outbox).where(t.outbox.c.id.in_(bindparam("ids", expanding=True)))
)

log = logging.getLogger("aiso.outbox")


class Coalescing(Protocol):
    """Which messages may wait to go out merged, and how they merge."""

    def group(self, message: OutboxMessage) -> str | None:
        """The group ``message`` merges with; None to publish it now."""

    def merge(self, group: str, messages: list[OutboxMessage]) -> list[OutboxMessage]:
        """The messages that carry everything ``messages`` (all of ``group``) carried."""


class OutboxRelay:
    """Moves committed outbox rows onto the broker."""

    def __init__(
        self,
        store: Store,
        channel: AbstractChannel,
        *,
        grace_seconds: float,
        coalescing: Coalescing | None = None,
    ) -> None:
        self.store = store
        self.channel = channel
        self.grace = timedelta(seconds=grace_seconds)
        self.coalescing = coalescing
        self._exchanges: dict[str, AbstractExchange] = {}
        self._published: list[int] = []
        self._waiting: dict[str, list[OutboxMessage]] = {}
        self._flush_lock = asyncio.Lock()

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self.channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def _send(self, message: OutboxMessage) -> None:
        exchange = await self._exchange(message.exchange)
        await exchange.publish(
            aio_pika.Message(
                message.body,
                message_id=message.message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=message.headers or None,
            ),
            routing_key=message.routing_key,
        )

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish rows this process just committed; confirmed rows are deleted in batches.
        Stored rows the coalescing lets wait are held for ``flush_coalesced`` instead."""
        now: list[OutboxMessage] = []
        for message in messages:
            group = None
            if self.coalescing is not None and message.id is not None:
                group = self.coalescing.group(message)
            if group is None:
                now.append(message)
            else:
                self._waiting.setdefault(group, []).append(message)
        if not now:
            return
        await asyncio.gather(*(self._send(m) for m in now))
        self._published.extend(m.id for m in now if m.id is not None)

    async def flush_coalesced(self) -> None:
        """Publish the rows held back, merged by group; a group that fails stays in the
        outbox for the sweep."""
        if self.coalescing is None or not self._waiting:
            return
        waiting, self._waiting = self._waiting, {}
        for group, messages in waiting.items():
            try:
                merged = self.coalescing.merge(group, messages)
                await asyncio.gather(*(self._send(m) for m in merged))
            except Exception as exc:
                log.warning(
                    "publishing %d coalesced %s message(s) failed: %s", len(messages), group, exc
                )
                continue
            self._published.extend(m.id for m in messages if m.id is not None)

    async def flush_deletes(self) -> None:
        """Delete rows already confirmed by the broker (batched: one statement per flush)."""
        async with self._flush_lock:
            ids, self._published = self._published, []
            if not ids:
                return
            try:
                async with self.store.sync_transaction() as tx:
                    await tx.run(partial(_DELETE_PUBLISHED.run, params=[{"ids": ids}]), last=True)
            except Exception:
                self._published.extend(ids)
                raise

    async def sweep(self, limit: int = 200) -> int:
        """Publish and delete rows older than the grace period; returns how many."""
        cutoff = utcnow() - self.grace
        query = (
            select(t.outbox)
            .where(t.outbox.c.created_at < cutoff)
            .order_by(t.outbox.c.id)
            .limit(limit)
        )
        if self.store.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        async with self.store.transaction() as conn:
            rows = (await conn.execute(query)).all()
            if not rows:
                return 0
            messages = [
                OutboxMessage(r.exchange, r.routing_key, r.message_id, r.body, r.headers, r.id)
                for r in rows
            ]
            await asyncio.gather(*(self._send(m) for m in messages))
            await conn.execute(delete(t.outbox).where(t.outbox.c.id.in_([r.id for r in rows])))
        log.info("outbox sweep published %d orphaned message(s)", len(rows))
        return len(rows)

    async def run(self, interval: float, tick: float = 0.1) -> None:
        """Background loop: every ``tick`` seconds publish what waited to be coalesced, every
        other tick flush deletes, every ``interval`` seconds sweep orphans."""
        ticks = 0
        while True:
            await asyncio.sleep(tick)
            ticks += 1
            try:
                await self.flush_coalesced()
                if ticks % 2 == 0:
                    await self.flush_deletes()
                if ticks * tick >= interval:
                    ticks = 0
                    while await self.sweep() > 0:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or database is away: try again next tick
                log.warning("outbox relay: %s", exc)
