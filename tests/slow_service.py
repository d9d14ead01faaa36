"""A service whose handler takes its time: work is still in flight when SIGTERM arrives."""

from __future__ import annotations

import asyncio
from typing import Any

from aiso.contracts import PayloadType
from aiso.sdk import Context, Service

service = Service(name="slow", input=[PayloadType.TEXT], output=PayloadType.TEXT, concurrency=4)


@service.handler
async def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    await asyncio.sleep(float(params.get("seconds", 2)))
    return {"text": payload["text"]}
