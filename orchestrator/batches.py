"""Applies incoming messages in batches: many messages, one transaction.

Under load many results wait at once; applying them in one transaction makes one commit and
one outbox insert carry many of them, which is where the orchestrator's time goes. Failures
are rare, so a batch runs without savepoints; if it fails, it is rolled back whole and its
messages are applied one by one, so the one that fails is nacked (and redelivered) alone.
Messages are applied in task-id order so two orchestrators locking the same tasks on
PostgreSQL always lock them in the same order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection

from aiso import topology
from aiso.store import OutboxMessage, OutboxRelay, Store

__all__ = ["Batcher", "Work"]

log = logging.getLogger("aiso.orchestrator")

MESSAGES = Counter(
    "aiso_orchestrator_messages_total", "Messages handled by the orchestrator.", ["outcome"]
)
BATCH_SIZE = Histogram(
    "aiso_orchestrator_batch_size",
    "Messages applied per transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

Apply = Callable[[AsyncConnection], Awaitable[list[OutboxMessage]]]


@dataclass
class Work:
    """One incoming message and the state change it asks for."""

    message: AbstractIncomingMessage
    task_id: str
    apply: Apply


def _coalesce_events(messages: list[OutboxMessage]) -> list[OutboxMessage]:
    """Keep one task event per task: the last. Every event is in the store already, and an
    AMQP event only wakes the gateways' watchers, which then read the store; one wake-up per
    task per transaction is enough and halves what the orchestrator publishes."""
    last: dict[str, int] = {}
    for index, message in enumerate(messages):
        if message.exchange == topology.EVENTS_EXCHANGE and message.routing_key.startswith("task."):
            last[message.routing_key.split(".")[1]] = index
    keep = set(last.values())
    return [
        m
        for i, m in enumerate(messages)
        if i in keep
        or m.id is not None
        or not (m.exchange == topology.EVENTS_EXCHANGE and m.routing_key.startswith("task."))
    ]


class Batcher:
    """Collects work from the consumers and applies it, ``max_batch`` at a time."""

    def __init__(self, store: Store, relay: OutboxRelay, *, max_batch: int, workers: int) -> None:
        self.store = store
        self.relay = relay
        self.max_batch = max_batch
        self.workers = workers
        self._queue: asyncio.Queue[Work] = asyncio.Queue()

    def submit(self, work: Work) -> None:
        self._queue.put_nowait(work)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    async def _worker(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._apply(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "a batch of %d message(s) failed; they will be redelivered", len(batch)
                )
                MESSAGES.labels("error").inc(len(batch))
                await asyncio.sleep(1.0)  # the store is unwell: don't spin
                await asyncio.gather(
                    *(w.message.nack(requeue=True) for w in batch), return_exceptions=True
                )

    async def _apply(self, batch: list[Work]) -> None:
        batch.sort(key=lambda w: w.task_id)
        try:
            outgoing = await self._commit(batch)
        except Exception:
            if len(batch) == 1:
                raise
            # Find the culprit: each message alone, in its own transaction.
            log.warning("a batch of %d failed; applying its messages one by one", len(batch))
            for work in batch:
                try:
                    await self._apply([work])
                except Exception:
                    log.exception("failed to apply a message for task %s", work.task_id)
                    MESSAGES.labels("error").inc()
                    await asyncio.sleep(1.0)  # don't spin on a message that keeps failing
                    await work.message.nack(requeue=True)
            return
        BATCH_SIZE.observe(len(batch))
        try:
            await self.relay.publish(outgoing)
        except Exception as exc:  # committed to the outbox: the sweep publishes them
            log.warning(
                "publishing %d message(s) failed; left to the outbox sweep: %s", len(outgoing), exc
            )
        for work in batch:
            await work.message.ack()
        MESSAGES.labels("applied").inc(len(batch))

    async def _commit(self, batch: list[Work]) -> list[OutboxMessage]:
        """Apply the batch in one transaction, with its outbox rows; all or nothing."""
        outgoing: list[OutboxMessage] = []
        async with self.store.transaction() as conn:
            for work in batch:
                outgoing += await work.apply(conn)
            outgoing = _coalesce_events(outgoing)
            fresh = [m for m in outgoing if m.id is None]
            outgoing = [m for m in outgoing if m.id is not None]
            outgoing += await self.store.enqueue(conn, fresh)
        return outgoing
