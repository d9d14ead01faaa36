"""Publishes outbox rows to RabbitMQ with publisher confirms, then deletes them.

The writer of a transaction publishes its own rows right after commit (``publish``); rows a
crashed process left behind are picked up by ``sweep`` once they are older than the grace
period. A row may therefore be published twice, never zero times: every consumer dedupes
(compare-and-set on the step attempt, stable event and message ids).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from sqlalchemy import delete, select

from aiso.store import tables as t
from aiso.store.database import Store, utcnow
from aiso.store.model import OutboxMessage

__all__ = ["OutboxRelay"]

log = logging.getLogger("aiso.outbox")


class OutboxRelay:
    """Moves committed outbox rows onto the broker."""

    def __init__(self, store: Store, channel: AbstractChannel, *, grace_seconds: float) -> None:
        self.store = store
        self.channel = channel
        self.grace = timedelta(seconds=grace_seconds)
        self._exchanges: dict[str, AbstractExchange] = {}
        self._published: list[int] = []
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
        """Publish rows this process just committed; confirmed rows are deleted in batches."""
        if not messages:
            return
        await asyncio.gather(*(self._send(m) for m in messages))
        self._published.extend(m.id for m in messages if m.id is not None)

    async def flush_deletes(self) -> None:
        """Delete rows already confirmed by the broker (batched: one statement per flush)."""
        async with self._flush_lock:
            ids, self._published = self._published, []
            if not ids:
                return
            try:
                async with self.store.transaction() as conn:
                    await conn.execute(delete(t.outbox).where(t.outbox.c.id.in_(ids)))
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

    async def run(self, interval: float) -> None:
        """Background loop: flush deletes often, sweep orphans every ``interval`` seconds."""
        ticks = 0
        while True:
            await asyncio.sleep(0.2)
            ticks += 1
            try:
                await self.flush_deletes()
                if ticks * 0.2 >= interval:
                    ticks = 0
                    while await self.sweep() > 0:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or database is away: try again next tick
                log.warning("outbox relay: %s", exc)
