"""The last heartbeat of every service replica, as heard on ``aiso.events``.

Each replica publishes ``{"service", "replica", "ready", "in_flight", "version", "at"}`` every
``heartbeat_seconds`` (see ``aiso.sdk``); a gateway keeps the newest per replica and forgets a
replica after three silent intervals — it died without its final ``ready=false``, or its
heartbeats are lost. Ages are measured on the gateway's clock, so a replica with a skewed
clock is neither kept forever nor dropped at once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage

__all__ = ["EXPIRY_INTERVALS", "Heartbeat", "ReplicaBook"]

log = logging.getLogger("aiso.wrapper.heartbeats")

EXPIRY_INTERVALS = 3
"""Missed heartbeats after which a replica is forgotten: one lost message is not a death."""


@dataclass(frozen=True)
class Heartbeat:
    service: str
    replica: str
    ready: bool
    in_flight: int
    version: str | None
    last_seen: datetime
    """When this gateway heard it (its own clock)."""
    received: float
    """``time.monotonic()`` at receipt, for expiry."""


class ReplicaBook:
    """service → replica → newest heartbeat."""

    def __init__(self, interval_seconds: float) -> None:
        self.ttl = interval_seconds * EXPIRY_INTERVALS
        self._beats: dict[str, dict[str, Heartbeat]] = {}

    def record(self, beat: Heartbeat) -> None:
        self._beats.setdefault(beat.service, {})[beat.replica] = beat

    def replicas(self, service: str) -> list[Heartbeat]:
        """The service's live replicas, by name; expired ones are dropped on the way."""
        beats = self._beats.get(service, {})
        cutoff = time.monotonic() - self.ttl
        for name in [n for n, b in beats.items() if b.received < cutoff]:
            del beats[name]
        return [beats[name] for name in sorted(beats)]

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Consumer callback for heartbeats (consumed with ``no_ack``)."""
        try:
            body = json.loads(message.body)
            beat = Heartbeat(
                service=str(body["service"]),
                replica=str(body["replica"]),
                ready=bool(body["ready"]),
                in_flight=int(body["in_flight"]),
                version=str(body["version"]) if body.get("version") is not None else None,
                last_seen=datetime.now(UTC),
                received=time.monotonic(),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed heartbeat on %s: %s", message.routing_key, exc)
            return
        self.record(beat)
