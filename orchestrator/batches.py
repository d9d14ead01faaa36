"""Applies incoming messages in batches: one transaction, one savepoint per message.

Under load many results wait at once; applying them in one transaction makes one commit and
one outbox insert carry many of them, which is where the orchestrator's time goes. Each
message still runs in its own savepoint, so one that fails rolls back alone and is redelivered
while the rest of the batch commits. Messages are applied in task-id order so two
orchestrators locking the same tasks on PostgreSQL always lock them in the same order.
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
        applied: list[Work] = []
        failed: list[Work] = []
        outgoing: list[OutboxMessage] = []
        async with self.store.transaction() as conn:
            if len(batch) == 1:  # no savepoint needed: the transaction is the message's own
                outgoing += await batch[0].apply(conn)
                applied.append(batch[0])
            else:
                for work in batch:
                    try:
                        async with conn.begin_nested():
                            outgoing += await work.apply(conn)
                    except Exception:
                        log.exception("failed to apply a message for task %s", work.task_id)
                        failed.append(work)
                        continue
                    applied.append(work)
            outgoing = _coalesce_events(outgoing)
            fresh = [m for m in outgoing if m.id is None]
            outgoing = [m for m in outgoing if m.id is not None]
            outgoing += await self.store.enqueue(conn, fresh)
        BATCH_SIZE.observe(len(batch))
        try:
            await self.relay.publish(outgoing)
        except Exception as exc:  # committed to the outbox: the sweep publishes them
            log.warning(
                "publishing %d message(s) failed; left to the outbox sweep: %s", len(outgoing), exc
            )
        for work in applied:
            await work.message.ack()
        MESSAGES.labels("applied").inc(len(applied))
        if failed:
            MESSAGES.labels("error").inc(len(failed))
            await asyncio.sleep(1.0)
            for work in failed:
                await work.message.nack(requeue=True)
