"""A service's RabbitMQ queues as the operator sees them: declare, measure, delete.

Names and declarations come from ``aiso.topology``, like everywhere else. Deleting only when
empty is done here by looking first: quorum queues refuse ``queue.delete`` with ``if-empty``
(RabbitMQ answers NOT_IMPLEMENTED and closes the whole connection). A queue counts as empty
when it has no ready messages *and* no consumers, since a consumer may hold unacknowledged
ones that would come back after it stops.

One channel serves every call, one call at a time: a passive declaration of a missing queue
makes the broker close the channel, which is then reopened for the next caller. The connection
is a plain one, reopened on the next call after it drops: a robust connection would remember
every queue declared through it and re-declare them after a reconnect, deleted ones included.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from aiso import topology

__all__ = ["Broker", "BrokerUnavailable", "QueueStats"]


class BrokerUnavailable(Exception):
    """RabbitMQ could not be reached or refused the operation; worth retrying later."""


@dataclass(frozen=True)
class QueueStats:
    name: str
    messages: int
    consumers: int

    @property
    def empty(self) -> bool:
        return self.messages == 0 and self.consumers == 0


class Broker:
    """A lazily (re)connected channel to RabbitMQ."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _ensure_channel(self) -> AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._connection = await aio_pika.connect(self._url, timeout=10)
            self._channel = None
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def _stats(self, channel: AbstractChannel, name: str) -> QueueStats | None:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            self._channel = None  # closed by the broker; the next call opens another
            return None
        result = queue.declaration_result
        return QueueStats(name, result.message_count or 0, result.consumer_count or 0)

    async def declare(self, service: str) -> QueueStats:
        """Declare the service's queue and dead-letter queue with their bindings."""
        async with self._lock:
            try:
                channel = await self._ensure_channel()
                queue = await topology.declare_service(channel, service)
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
                self._channel = None
                raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
            result = queue.declaration_result
            return QueueStats(queue.name, result.message_count or 0, result.consumer_count or 0)

    async def stats(self, service: str) -> QueueStats | None:
        """Depth and consumers of the service's queue; None when it does not exist."""
        async with self._lock:
            try:
                return await self._stats(
                    await self._ensure_channel(), topology.service_queue(service)
                )
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
                self._channel = None
                raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def delete(self, service: str, *, only_if_empty: bool) -> list[QueueStats]:
        """Delete the service's queues; returns those kept because they were not empty."""
        kept: list[QueueStats] = []
        async with self._lock:
            try:
                for name in (topology.service_queue(service), topology.dead_queue(service)):
                    channel = await self._ensure_channel()
                    stats = await self._stats(channel, name)
                    if stats is None:
                        continue
                    if only_if_empty and not stats.empty:
                        kept.append(stats)
                        continue
                    await channel.queue_delete(name)
            except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
                self._channel = None
                raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return kept

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
