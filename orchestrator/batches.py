"""Applies incoming messages in batches: many messages, one transaction.

Under load many results wait at once; applying them in one unit of work makes one commit, a
few multi-row statements and one outbox insert carry many of them. Failures
are rare, so a batch runs without savepoints; if it fails, it is rolled back whole and its
messages are applied one by one, so the one that fails is given back alone
(``aiso.orchestrator.deliveries``).
Messages are applied in task-id order so two orchestrators locking the same tasks on
PostgreSQL always lock them in the same order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from aiso.orchestrator.deliveries import Delivery, is_transient
from aiso.orchestrator.engine import Engine
from aiso.orchestrator.unit import UnitOfWork
from aiso.store import OutboxMessage, OutboxRelay

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

Apply = Callable[[UnitOfWork], None]

FAILED_MESSAGE_PAUSE_SECONDS = 1.0
"""How long a message that failed to apply waits before it is given back for redelivery."""


@dataclass
class Work:
    """One incoming message (or one part of it) and the state change it asks for."""

    message: Delivery
    task_id: str
    apply: Apply


class Batcher:
    """Collects work from the consumers and applies it, ``max_batch`` at a time."""

    def __init__(self, engine: Engine, relay: OutboxRelay, *, max_batch: int, workers: int) -> None:
        self.engine = engine
        self.relay = relay
        self.max_batch = max_batch
        self.workers = workers
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._giving_back: set[asyncio.Task[None]] = set()

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
            except Exception as exc:  # a message's own transaction failed: see _apply
                await self._failed(batch, exc)

    async def _apply(self, batch: list[Work]) -> None:
        batch.sort(key=lambda w: w.task_id)
        try:
            outgoing = await self._commit(batch)
        except Exception:
            if len(batch) == 1:
                raise
            # Find the culprit: each message alone, in its own transaction.
            log.warning("a batch of %d failed; applying its messages one by one", len(batch))
            for i, work in enumerate(batch):
                try:
                    await self._apply([work])
                except Exception as exc:
                    # The store being unwell is no message's fault, and the rest would fail
                    # alike: they all go back. Otherwise this one alone.
                    if is_transient(exc):
                        await self._failed(batch[i:], exc)
                        return
                    await self._failed([work], exc)
            return
        BATCH_SIZE.observe(len(batch))
        try:
            await self.relay.publish(outgoing)
        except Exception as exc:  # committed to the outbox: the sweep publishes them
            log.warning(
                "publishing %d message(s) failed; left to the outbox sweep: %s", len(outgoing), exc
            )
        try:
            for work in batch:
                await work.message.ack()
        except Exception as exc:  # the channel is gone: redelivered, and then a no-op
            log.warning("acknowledging %d applied message(s) failed: %s", len(batch), exc)
        MESSAGES.labels("applied").inc(len(batch))

    async def _failed(self, works: list[Work], exc: Exception) -> None:
        """``works`` failed to apply: each goes back after a pause of its own; when the store
        itself failed, the worker pauses too rather than try the next batch at once."""
        log.exception(
            "failed to apply %d message(s), for task(s) %s",
            len(works),
            ", ".join(w.task_id for w in works),
            exc_info=exc,
        )
        MESSAGES.labels("error").inc(len(works))
        for work in works:
            self._give_back_later(work, exc)
        if is_transient(exc):
            await asyncio.sleep(FAILED_MESSAGE_PAUSE_SECONDS)

    def _give_back_later(self, work: Work, exc: Exception) -> None:
        """Give a message that failed to apply back after a pause, so that one which keeps
        failing is not redelivered in a tight loop; the pause holds that message only, not
        the batches behind it."""

        async def later() -> None:
            await asyncio.sleep(FAILED_MESSAGE_PAUSE_SECONDS)
            try:
                await work.message.give_back(exc)
            except Exception as lost:  # the channel is gone: the broker redelivers it anyway
                log.warning("could not give back a message for task %s: %s", work.task_id, lost)

        pending = asyncio.create_task(later())
        self._giving_back.add(pending)
        pending.add_done_callback(self._giving_back.discard)

    async def _commit(self, batch: list[Work]) -> list[OutboxMessage]:
        """Apply the batch in one transaction, with its outbox rows; all or nothing."""

        def apply_all(unit: UnitOfWork) -> None:
            unit.load(w.task_id for w in batch)  # every task of the batch in one read
            for work in batch:
                work.apply(unit)

        _, outgoing = await self.engine.commit(apply_all)
        return outgoing
