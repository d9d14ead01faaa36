"""The services view: catalog, queues, circuit breakers and heartbeats joined per service.

One function builds it for ``GET /v1/services`` and for the service gauges on ``/metrics``,
so the two never disagree. Breakers are read from the store (the orchestrators write
``service_health``; a service without a row has never failed, hence closed), queue depths from
the broker, replicas from the heartbeats this gateway heard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from aiso import topology
from aiso.store import Store
from aiso.store import tables as t
from aiso.store.database import as_utc

from .metrics import BREAKER_STATE_VALUES, Metrics
from .schemas import BreakerView, ReplicaView, ServiceView

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["CLOSED", "export_gauges", "read_breakers", "service_views"]

CLOSED = BreakerView(state="closed", consecutive_failures=0, opened_at=None)
"""The breaker of a service without a ``service_health`` row."""


async def read_breakers(store: Store) -> dict[str, BreakerView]:
    h = t.service_health
    query = select(h.c.service, h.c.breaker, h.c.consecutive_failures, h.c.opened_at)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {
        r.service: BreakerView(
            state=r.breaker,
            consecutive_failures=r.consecutive_failures,
            opened_at=as_utc(r.opened_at),
        )
        for r in rows
    }


async def service_views(gateway: Gateway) -> list[ServiceView]:
    """Every service of the catalog, by name."""
    services = gateway.registry.catalog().services
    names = sorted(services)
    queues = await gateway.queues.stats(
        [q for n in names for q in (topology.service_queue(n), topology.dead_queue(n))]
    )
    breakers = await read_breakers(gateway.store)
    views = []
    for name in names:
        replicas = [
            ReplicaView(
                replica=b.replica,
                ready=b.ready,
                in_flight=b.in_flight,
                version=b.version,
                last_seen=b.last_seen,
            )
            for b in gateway.heartbeats.replicas(name)
        ]
        views.append(
            ServiceView.of(
                services[name],
                queues[topology.service_queue(name)],
                queues[topology.dead_queue(name)],
                breakers.get(name, CLOSED),
                replicas,
            )
        )
    return views


def export_gauges(metrics: Metrics, views: list[ServiceView]) -> None:
    """Set the service gauges to ``views``; services gone from the catalog disappear."""
    for gauge in (
        metrics.breaker_state,
        metrics.ready_replicas,
        metrics.queue_messages,
        metrics.consumers,
    ):
        gauge.clear()
    for view in views:
        metrics.breaker_state.labels(view.name).set(BREAKER_STATE_VALUES[view.breaker.state])
        metrics.ready_replicas.labels(view.name).set(view.health.ready_replicas)
        if view.queue is not None:
            metrics.queue_messages.labels(view.name).set(view.queue.messages)
            metrics.consumers.labels(view.name).set(view.queue.consumers)
