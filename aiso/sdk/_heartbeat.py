"""Heartbeats: each replica tells the gateways it is alive, ready and how busy, every few seconds.

Queue consumer counts say a connection exists, not that the replica behind it can work; the
heartbeat carries the replica's own verdict (``/readyz``) and its in-flight count. It goes to
``aiso.events`` with key ``service.<name>.heartbeat``, non-persistent and on a channel without
publisher confirms: a lost heartbeat costs nothing, the next one follows. A replica that stops
sends one last heartbeat with ``ready=false``, so gateways need not wait for it to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from aiso import topology
from aiso.sdk._service import Service

__all__ = ["Heartbeat"]

log = logging.getLogger("aiso.sdk")


class Heartbeat:
    """Publishes ``{"service", "replica", "ready", "in_flight", "version", "at"}`` every
    ``interval`` seconds until ``stop()``; ``status()`` gives (ready, in_flight) at each beat."""

    def __init__(
        self,
        service: Service,
        *,
        replica: str,
        interval: float,
        status: Callable[[], tuple[bool, int]],
    ) -> None:
        self._service = service
        self._replica = replica
        self._interval = interval
        self._status = status
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self, connection: AbstractConnection) -> None:
        """Beat now and then every interval; ``aiso.events`` must already be declared."""
        self._channel = await connection.channel(publisher_confirms=False)
        self._exchange = await self._channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        self._loop = asyncio.create_task(self._run(), name="aiso-heartbeat")

    def nudge(self) -> None:
        """Beat now rather than at the next interval (the replica's readiness changed)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop beating and send the final ``ready=false``."""
        if self._loop is None:
            return
        self._loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop
        self._loop = None
        await self._beat(final=True)

    async def _run(self) -> None:
        while True:
            await self._beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()

    async def _beat(self, *, final: bool = False) -> None:
        assert self._exchange is not None
        ready, in_flight = self._status()
        body = {
            "service": self._service.name,
            "replica": self._replica,
            "ready": ready and not final,
            "in_flight": in_flight,
            "version": self._service.version,
            "at": datetime.now(UTC).isoformat(),
        }
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    # Stale by the time a gateway would expire the replica anyway.
                    expiration=timedelta(seconds=self._interval * 3),
                ),
                routing_key=topology.heartbeat_routing_key(self._service.name),
                mandatory=False,  # no gateway listening is fine
            )
        except CONNECTION_EXCEPTIONS as exc:  # the broker is away; the next beat tries again
            log.debug("%s: heartbeat not sent: %s", self._service.name, exc)
