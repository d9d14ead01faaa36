"""The orchestrator process: consumes tasks, results and timers and applies them once.

Each message is handled in its own transaction; the transaction's outbox rows are published
with confirms, and only then is the message acked. A crash anywhere in between leaves the
message unacked (the broker redelivers it, and the compare-and-set makes the repeat a no-op)
or leaves committed outbox rows (another process's sweep publishes them).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from prometheus_client import Counter
from pydantic import ValidationError

from aiso import topology
from aiso.contracts import ReplayRequest, parse_result, parse_task
from aiso.errors import InvalidMessage
from aiso.orchestrator.engine import Engine
from aiso.orchestrator.timers import Timer, timer_message
from aiso.settings import Settings
from aiso.store import OutboxMessage, OutboxRelay, Store, open_store
from aiso.store.database import utcnow
from aiso.webhooks.deliveries import WebhookSender

__all__ = ["Orchestrator", "run"]

log = logging.getLogger("aiso.orchestrator")

MESSAGES = Counter(
    "aiso_orchestrator_messages_total",
    "Messages handled by the orchestrator.",
    ["queue", "outcome"],
)

_EARLY_TOLERANCE_SECONDS = 0.05
_RETENTION_INTERVAL_SECONDS = 600.0

Handler = Callable[[AbstractIncomingMessage], Awaitable[list[OutboxMessage]]]


class Orchestrator:
    """One orchestrator process; any number may run against the same store and broker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.connection: AbstractRobustConnection | None = None
        self.relay: OutboxRelay | None = None
        self.engine: Engine | None = None
        self.webhooks: WebhookSender | None = None
        self._background: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self.store = await open_store(self.settings.database_url)
        self.engine = Engine(self.store)
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url)
        publish_channel = await self.connection.channel(publisher_confirms=True)
        await topology.declare_core(publish_channel)
        self.relay = OutboxRelay(
            self.store, publish_channel, grace_seconds=self.settings.outbox_grace_seconds
        )
        self._background.append(
            asyncio.create_task(self.relay.run(self.settings.outbox_sweep_seconds))
        )
        self._background.append(asyncio.create_task(self._expire_finished()))
        if self.settings.webhook_secret is None:
            log.warning("AISO_WEBHOOK_SECRET is not set: client webhooks go out unsigned")
        self.webhooks = WebhookSender(self.store, self.settings)
        self._background.append(asyncio.create_task(self.webhooks.run()))
        for queue, handler in (
            (topology.TASKS_QUEUE, self._on_task),
            (topology.RESULTS_QUEUE, self._on_result),
            (topology.TIMERS_QUEUE, self._on_timer),
        ):
            channel = await self.connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.settings.orchestrator_prefetch)
            # Declared (passively), not just looked up: a robust channel re-consumes only the
            # queues it declared when it reconnects after a broker restart.
            q = await channel.declare_queue(queue, passive=True)
            await q.consume(self._consumer(queue, handler, channel))
        log.info("orchestrator consuming tasks, results and timers")

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.relay is not None:
            await self.relay.flush_deletes()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.connection is not None:
            await self.connection.close()
        if self.store is not None:
            await self.store.close()

    def _consumer(
        self, queue: str, handler: Handler, channel: AbstractRobustChannel
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def consume(message: AbstractIncomingMessage) -> None:
            try:
                outgoing = await handler(message)
            except (InvalidMessage, ValidationError) as exc:
                # A message that breaks its contract would fail the same way forever.
                log.error("rejected malformed message on %s: %s", queue, exc)
                MESSAGES.labels(queue, "invalid").inc()
                await message.reject(requeue=False)
                return
            except Exception:
                log.exception("failed to handle a message from %s; it will be redelivered", queue)
                MESSAGES.labels(queue, "error").inc()
                await asyncio.sleep(1.0)  # the store or broker is unwell: don't spin
                await message.nack(requeue=True)
                return
            assert self.relay is not None
            await self.relay.publish(outgoing)
            await message.ack()
            MESSAGES.labels(queue, "applied" if outgoing else "ignored").inc()

        return consume

    async def _apply(
        self, step: Callable[..., Awaitable[list[OutboxMessage]]], *args: object
    ) -> list[OutboxMessage]:
        assert self.store is not None
        async with self.store.transaction() as conn:
            return await step(conn, *args)

    async def _on_task(self, message: AbstractIncomingMessage) -> list[OutboxMessage]:
        assert self.engine is not None
        if message.routing_key == topology.REPLAY_ROUTING_KEY:
            replay = ReplayRequest.model_validate_json(message.body)
            log.info("replay of task %s from step %s", replay.task_id, replay.step)
            return await self._apply(self.engine.replay, str(replay.task_id), replay.step)
        task = parse_task(message.body)
        return await self._apply(self.engine.start, str(task.task_id))

    async def _on_result(self, message: AbstractIncomingMessage) -> list[OutboxMessage]:
        result = parse_result(message.body)
        assert self.engine is not None
        return await self._apply(self.engine.apply_result, result)

    async def _on_timer(self, message: AbstractIncomingMessage) -> list[OutboxMessage]:
        timer = Timer.model_validate_json(message.body)
        if timer.remaining() > _EARLY_TOLERANCE_SECONDS:
            return [timer_message(timer)]  # not due yet: next hop through a delay tier
        assert self.engine is not None
        return await self._apply(self.engine.fire, timer)

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
