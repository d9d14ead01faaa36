"""What a running gateway holds: settings, catalog, store, broker, relay, event hub and the
replicas' heartbeats.

The lifespan in ``aiso.wrapper.app`` builds one ``Gateway`` and routes receive it through the
``get_gateway`` dependency, so no route reaches for globals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import aio_pika
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from fastapi import Request

from aiso.orchestrator.engine import Engine
from aiso.registry import Registry
from aiso.settings import Settings
from aiso.store import OutboxMessage, OutboxRelay, Store, TaskStatus

from .events import EventHub
from .heartbeats import ReplicaBook
from .metrics import Metrics
from .schemas import QueueView

__all__ = ["PUBLISH_TIMEOUT_SECONDS", "Gateway", "QueueInspector", "get_gateway"]

log = logging.getLogger("aiso.wrapper")

PUBLISH_TIMEOUT_SECONDS = 5.0
"""How long a request waits for the broker to confirm its messages. Past it the request is
answered anyway: the rows stay in the outbox and a sweep publishes them."""


class QueueInspector:
    """Reads queue depth and consumer count with passive declarations.

    A passive declaration of a missing queue makes the broker close the channel, so this uses
    a channel of its own (never the publishing one) and reopens it after such a miss.
    """

    def __init__(self, channel: AbstractRobustChannel) -> None:
        self.channel = channel
        self._lock = asyncio.Lock()

    async def stats(self, names: Sequence[str]) -> dict[str, QueueView | None]:
        result: dict[str, QueueView | None] = {}
        async with self._lock:
            for name in names:
                try:
                    # robust=False: a passive look must not be re-declared after a reconnect.
                    queue = await self.channel.declare_queue(name, passive=True, robust=False)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    result[name] = None
                    await self.channel.reopen()
                    continue
                declared = queue.declaration_result
                result[name] = QueueView(
                    name=name,
                    messages=declared.message_count or 0,
                    consumers=declared.consumer_count or 0,
                )
        return result


@dataclass
class Gateway:
    settings: Settings
    registry: Registry
    store: Store
    connection: AbstractRobustConnection
    relay: OutboxRelay
    hub: EventHub
    queues: QueueInspector
    metrics: Metrics
    heartbeats: ReplicaBook
    engine: Engine
    """The orchestrator's state machine, for the one transition a client makes: cancel."""

    async def cancel(self, task_id: str) -> tuple[TaskStatus | None, list[OutboxMessage]]:
        """Cancel a pending or running task in one transaction. Returns its status afterwards
        (None if unknown) and the messages to publish (none if it had already ended)."""
        return await self.engine.commit(lambda unit: self.engine.cancel(unit, task_id))

    async def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish rows this request committed. A failure is only logged: the rows stay in
        the outbox and a sweep (this gateway's or the orchestrator's) publishes them."""
        try:
            await asyncio.wait_for(self.relay.publish(messages), PUBLISH_TIMEOUT_SECONDS)
        except Exception as exc:
            log.warning(
                "publishing %d message(s) failed; left to the outbox sweep: %r", len(messages), exc
            )


async def get_gateway(request: Request) -> Gateway:
    """FastAPI dependency: the gateway of the app serving this request."""
    return cast(Gateway, request.app.state.gateway)
