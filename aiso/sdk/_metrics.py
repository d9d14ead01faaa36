"""Prometheus metrics of one service replica, in a registry of its own.

A private ``CollectorRegistry`` keeps two runtimes in one process (tests, embedding) from
colliding on metric names, and keeps library metrics out of ``/metrics``.
"""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "Outcome"]

Outcome = Literal["succeeded", "failed", "invalid", "dead", "expired"]
"""How a message ended: handler succeeded or failed, input rejected (``InvalidInput``),
message dead-lettered (malformed), or dropped because its deadline had passed."""

# AI handlers run from milliseconds (normalisation) to minutes (transcription).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self._messages = Counter(
            "aiso_service_messages",
            "Messages taken off the service queue, by outcome.",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "aiso_service_handler_seconds",
            "Time spent in the handler.",
            ["service"],
            buckets=_BUCKETS,
            registry=self.registry,
        ).labels(service)
        self.in_flight = Gauge(
            "aiso_service_in_flight",
            "Handler calls running now.",
            ["service"],
            registry=self.registry,
        ).labels(service)
        for outcome in get_args(Outcome):  # every series exists from the start, at zero
            self._messages.labels(service, outcome)

    def message(self, outcome: Outcome) -> None:
        self._messages.labels(self.service, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
