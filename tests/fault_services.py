"""Services that misbehave on purpose, for the fault-injection suite.

Their behaviour is steered through files in ``$AISO_TEST_STATE_DIR`` so a test can break and
fix a running service; each records its invocations there so a test can count deliveries.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from aiso.contracts import PayloadType
from aiso.errors import PermanentError, RetryableError
from aiso.sdk import Context, Service

__all__ = ["broken", "flaky", "hang", "sick", "slow"]

TEXT = [PayloadType.TEXT]


def _state() -> Path:
    return Path(os.environ["AISO_TEST_STATE_DIR"])


def _record(service: str, ctx: Context) -> None:
    with (_state() / f"{service}.calls").open("a") as log:
        log.write(f"{ctx.task_id} {ctx.attempt} {time.time():.3f} {os.getpid()}\n")


flaky = Service(name="flaky", input=TEXT, output=PayloadType.TEXT, concurrency=8)


@flaky.handler
async def _flaky(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _record("flaky", ctx)
    if ctx.attempt <= int(params.get("fail_attempts", 2)):
        raise RetryableError(f"attempt {ctx.attempt} fails on purpose")
    return payload


broken = Service(name="broken", input=TEXT, output=PayloadType.TEXT, concurrency=8)


@broken.handler
async def _broken(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _record("broken", ctx)
    if not (_state() / "broken.fixed").exists():
        raise PermanentError("broken until fixed", code="Broken")
    return payload


hang = Service(name="hang", input=TEXT, output=PayloadType.TEXT, concurrency=8)


@hang.handler
def _hang(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    # A plain function cannot be cancelled: its late result really is published.
    _record("hang", ctx)
    if ctx.attempt == 1:
        time.sleep(float(params.get("hang_seconds", 4)))
    return {**payload, "attempt": ctx.attempt}


sick = Service(name="sick", input=TEXT, output=PayloadType.TEXT, concurrency=8)


@sick.handler
async def _sick(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _record("sick", ctx)
    if (_state() / "sick.down").exists():
        raise RetryableError("service is down")
    return payload


slow = Service(name="slow", input=TEXT, output=PayloadType.TEXT, concurrency=4)


@slow.handler
async def _slow(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _record("slow", ctx)
    import asyncio

    await asyncio.sleep(float(params.get("seconds", 1.5)))
    return payload
