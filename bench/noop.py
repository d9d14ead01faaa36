"""Three no-op services (``noop-a``, ``noop-b``, ``noop-c``): text in, the same text out.

They cost nothing, so a benchmark of the ``noop3`` pipeline measures only what the platform
adds per step: broker hops, state writes and (de)serialisation.
"""

from __future__ import annotations

from typing import Any

from aiso.contracts import PayloadType
from aiso.sdk import Context, Service

__all__ = ["CONCURRENCY", "service_a", "service_b", "service_c"]

CONCURRENCY = 16
"""Messages each replica handles at once (its prefetch); bench/manifests says the same."""


def _noop(name: str) -> Service:
    service = Service(
        name=name,
        input=[PayloadType.TEXT],
        output=PayloadType.TEXT,
        concurrency=CONCURRENCY,
        description="Returns its payload unchanged (benchmark).",
    )

    @service.handler
    async def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return payload

    return service


service_a = _noop("noop-a")
service_b = _noop("noop-b")
service_c = _noop("noop-c")
