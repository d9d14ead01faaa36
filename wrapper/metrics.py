"""Prometheus metrics of the gateway, in a registry of its own.

A registry per app (not the process-global one) keeps several apps in one process — tests,
``aiso dev`` — from colliding on metric names. Requests are labelled by route *template*
(``/v1/tasks/{task_id}``), never by raw path, so the label set stays bounded.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BREAKER_STATE_VALUES", "Metrics", "MetricsMiddleware"]

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
"""``aiso_service_breaker_state``: higher is worse, so ``max()`` over gateways is the truth."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "aiso_gateway_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "aiso_gateway_request_seconds",
            "Time to answer a request (event streams: their whole life).",
            ["route"],
            registry=self.registry,
        )
        self.tasks_submitted = Counter(
            "aiso_gateway_tasks_submitted_total",
            "Tasks accepted (idempotent replays not counted), by pipeline.",
            ["pipeline"],
            registry=self.registry,
        )
        # Service gauges are set from the same view as GET /v1/services, on each scrape.
        self.breaker_state = Gauge(
            "aiso_service_breaker_state",
            "Circuit breaker of the service: 0 closed, 1 half-open, 2 open.",
            ["service"],
            registry=self.registry,
        )
        self.ready_replicas = Gauge(
            "aiso_service_ready_replicas",
            "Replicas whose last heartbeat said ready.",
            ["service"],
            registry=self.registry,
        )
        self.queue_messages = Gauge(
            "aiso_service_queue_messages",
            "Messages waiting in the service's queue.",
            ["service"],
            registry=self.registry,
        )
        self.consumers = Gauge(
            "aiso_service_consumers",
            "Consumers attached to the service's queue.",
            ["service"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts and times every HTTP request, including those refused before routing."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            # The router stores the matched route in the scope; requests refused earlier
            # (body too large) or matching nothing share one label.
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(template).observe(time.perf_counter() - started)
