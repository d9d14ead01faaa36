"""The orchestrator process: consumes tasks, results and timers and applies them once.

Consumers only decode; ``Batcher`` applies the decoded work in transactions that also write
the outbox, publishes the outbox rows with confirms, and only then acks. A crash anywhere in
between leaves the message unacked (the broker redelivers it, and the compare-and-set makes
the repeat a no-op) or leaves committed outbox rows (another process's sweep publishes them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from aiso import topology
from aiso.contracts import ReplayRequest, parse_result, parse_task
from aiso.errors import InvalidMessage
from aiso.orchestrator.batches import MESSAGES, Batcher, Work
from aiso.orchestrator.breaker import BreakerWatch
from aiso.orchestrator.coalescing import OrchestratorCoalescing
from aiso.orchestrator.deliveries import Incoming, Redelivery, SharedDelivery
from aiso.orchestrator.engine import Engine
from aiso.orchestrator.timers import Timer, live_timers, parse_timers, timer_messages
from aiso.settings import Settings
from aiso.store import OutboxMessage, OutboxRelay, Store, open_store
from aiso.store.database import utcnow
from aiso.webhooks.deliveries import WebhookSender

__all__ = ["Orchestrator", "run"]

log = logging.getLogger("aiso.orchestrator")

_EARLY_TOLERANCE_SECONDS = 0.05
_RETENTION_INTERVAL_SECONDS = 600.0
_BREAKER_REFRESH_SECONDS = 1.0

Decoder = Callable[[AbstractIncomingMessage], Awaitable[list[Work]]]
"""Turns one incoming message into the work it asks for (none, one, or one per timer)."""


class Orchestrator:
    """One orchestrator process; any number may run against the same store and broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.connection: AbstractRobustConnection | None = None
        self.relay: OutboxRelay | None = None
        self.engine: Engine | None = None
        self.webhooks: WebhookSender | None = None
        self.batcher: Batcher | None = None
        self.redelivery = Redelivery(settings.orchestrator_delivery_limit, self._park)
        self.watch = BreakerWatch()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self.store = await open_store(self.settings.database_url)
        self.watch = BreakerWatch()
        await self.watch.refresh(self.store)
        self.engine = Engine(self.store, self.watch)
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url)
        publish_channel = await self.connection.channel(publisher_confirms=True)
        await topology.declare_core(publish_channel)
        self.relay = OutboxRelay(
            self.store,
            publish_channel,
            grace_seconds=self.settings.outbox_grace_seconds,
            coalescing=OrchestratorCoalescing(),
        )
        self._background.append(
            asyncio.create_task(self.relay.run(self.settings.outbox_sweep_seconds))
        )
        self._background.append(asyncio.create_task(self._expire_finished()))
        self._background.append(asyncio.create_task(self._watch_breakers()))
        if self.settings.webhook_secret is None:
            log.warning("AISO_WEBHOOK_SECRET is not set: client webhooks go out unsigned")
        self.webhooks = WebhookSender(self.store, self.settings)
        self._background.append(asyncio.create_task(self.webhooks.run()))
        self.batcher = Batcher(
            self.engine,
            self.relay,
            max_batch=self.settings.orchestrator_batch_size,
            workers=self.settings.orchestrator_batch_workers,
        )
        self._background.append(asyncio.create_task(self.batcher.run()))
        decoders: list[tuple[str, Decoder]] = [
            (topology.TASKS_QUEUE, self._on_task),
            (topology.RESULTS_QUEUE, self._on_result),
            (topology.TIMERS_QUEUE, self._on_timers),
        ]
        for queue, decode in decoders:
            channel = await self.connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.orchestrator_prefetch)
            # Declared (passively), not just looked up: a robust channel re-consumes only the
            # queues it declared when it reconnects after a broker restart.
            q = await channel.declare_queue(queue, passive=True)
            await q.consume(self._consumer(queue, decode))
        log.info("orchestrator consuming tasks, results and timers")

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.relay is not None:
            await self.relay.flush_coalesced()
            await self.relay.flush_deletes()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.connection is not None:
            await self.connection.close()
        if self.store is not None:
            await self.store.close()

    def _consumer(
        self, queue: str, decode: Decoder
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def consume(message: AbstractIncomingMessage) -> None:
            try:
                work = await decode(message)
            except (InvalidMessage, ValidationError) as exc:
                # A message that breaks its contract would fail the same way forever.
                log.error("parked malformed message on %s: %s", queue, exc)
                MESSAGES.labels("invalid").inc()
                await self._park(message, f"malformed message on {queue}: {exc}"[:1000])
                await message.ack()
                return
            assert self.batcher is not None
            for piece in work:
                self.batcher.submit(piece)

        return consume

    async def _on_task(self, message: AbstractIncomingMessage) -> list[Work]:
        engine = self._engine()
        if message.routing_key == topology.REPLAY_ROUTING_KEY:
            replay = ReplayRequest.model_validate_json(message.body)
            log.info("replay of task %s from step %s", replay.task_id, replay.step)
            task_id, step = str(replay.task_id), replay.step
            delivery = Incoming(message, self.redelivery)
            return [Work(delivery, task_id, lambda unit: engine.replay(unit, task_id, step))]
        task_id = str(parse_task(message.body).task_id)
        delivery = Incoming(message, self.redelivery)
        return [Work(delivery, task_id, lambda unit: engine.start(unit, task_id))]

    async def _on_result(self, message: AbstractIncomingMessage) -> list[Work]:
        engine = self._engine()
        result = parse_result(message.body)
        task_id = str(result.task_id)
        delivery = Incoming(message, self.redelivery)
        return [Work(delivery, task_id, lambda unit: engine.apply_result(unit, result))]

    async def _on_timers(self, message: AbstractIncomingMessage) -> list[Work]:
        assert self.store is not None
        timers = parse_timers(message.body)
        try:
            timers = await self.store.read(functools.partial(live_timers, timers=timers))
        except Exception as exc:  # only an optimisation: the engine checks again when they fire
            log.warning("could not check %d timer(s) against the store: %s", len(timers), exc)
        due: list[Timer] = []
        later: list[Timer] = []
        for timer in timers:  # one look at the clock per timer: each lands in exactly one list
            (due if timer.remaining() <= _EARLY_TOLERANCE_SECONDS else later).append(timer)
        if later:
            # Those not due yet go on through the next delay tier. A crash before the ack
            # only duplicates them, which the compare-and-set makes harmless.
            assert self.relay is not None
            await self.relay.publish(timer_messages(later))
        if not due:
            await message.ack()
            return []
        engine = self._engine()
        shared = SharedDelivery(message, len(due), self.redelivery)
        return [
            Work(shared, timer.task_id, functools.partial(engine.fire, timer=timer))
            for timer in due
        ]

    async def _park(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Publish ``message`` to the orchestrator's dead queue, with the reason and where it
        came from, and wait for the broker's confirm."""
        assert self.relay is not None
        headers = {
            **(message.headers or {}),
            "x-aiso-reason": reason,
            "x-aiso-exchange": message.exchange or "",
            "x-aiso-routing-key": message.routing_key or "",
        }
        parked = OutboxMessage(
            topology.DEAD_EXCHANGE,
            topology.ORCHESTRATOR_DEAD_ROUTING_KEY,
            message.message_id or "",
            message.body,
            headers,
        )
        await self.relay.publish([parked])

    def _engine(self) -> Engine:
        assert self.engine is not None
        return self.engine

    async def _watch_breakers(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(_BREAKER_REFRESH_SECONDS)
            try:
                await self.watch.refresh(self.store)
            except Exception as exc:
                log.warning("breaker refresh failed: %s", exc)

    async def _expire_finished(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(_RETENTION_INTERVAL_SECONDS)
            cutoff = utcnow() - timedelta(hours=self.settings.task_retention_hours)
            try:
                removed = await self.store.delete_expired(cutoff)
            except Exception as exc:
                log.warning("retention sweep failed: %s", exc)
                continue
            if removed:
                log.info("deleted %d finished task(s) past retention", removed)

    async def wait(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()


async def run(settings: Settings) -> None:
    """Run one orchestrator until SIGTERM or SIGINT."""
    orchestrator = Orchestrator(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, orchestrator.request_stop)
    await orchestrator.start()
    try:
        await orchestrator.wait()
    finally:
        log.info("orchestrator stopping")
        await orchestrator.stop()
