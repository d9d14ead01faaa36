"""``/healthz``, ``/readyz`` and ``/metrics``: for probes and Prometheus, not for clients."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from .gateway import Gateway, get_gateway
from .overview import export_gauges, service_views
from .problems import ProblemError, problem_responses
from .schemas import Health

__all__ = ["router"]

log = logging.getLogger("aiso.wrapper")

router = APIRouter(tags=["operations"])

GatewayDep = Annotated[Gateway, Depends(get_gateway)]

PROBE_TIMEOUT_SECONDS = 2.0
"""A dependency slower than this counts as down, so the probe answers 503 rather than hang;
a readiness probe's ``timeoutSeconds`` should be above it."""


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


async def _store_down(gateway: Gateway) -> str | None:
    async def ping() -> None:
        async with gateway.store.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(ping(), PROBE_TIMEOUT_SECONDS)
    except Exception as exc:
        return f"store ({type(exc).__name__})"
    return None


def _broker_down(gateway: Gateway) -> str | None:
    connection = gateway.connection
    if connection.is_closed or not connection.connected.is_set():
        return "broker (connection closed, reconnecting)"
    return None


@router.get(
    "/readyz",
    summary="Readiness: the store and the broker are reachable",
    responses=problem_responses(503),
)
async def readyz(gateway: GatewayDep) -> Health:
    down = [d for d in (await _store_down(gateway), _broker_down(gateway)) if d is not None]
    if down:
        raise ProblemError(
            503, "not-ready", "down: " + ", ".join(down), title="Not ready", down=down
        )
    return Health(status="ready", checks={"store": "ok", "broker": "ok"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(gateway: GatewayDep) -> Response:
    # Service gauges are read fresh on each scrape; when the broker or store is slow or away
    # the scrape still answers, with the values of the last good read.
    try:
        views = await asyncio.wait_for(service_views(gateway), PROBE_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("service gauges not refreshed: %r", exc)
    else:
        export_gauges(gateway.metrics, views)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
