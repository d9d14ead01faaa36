"""The measuring loops shared by every system.

``window`` keeps a fixed number of tasks in flight, each worker submitting its next task as
soon as its last one ended, and times every task from submission to the client learning of
its end; ``window`` with one worker is the sequential mode. The burst mode depends on how each
system reports completion, so each runner has its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from bench.common import Result

__all__ = ["Call", "limited", "window"]

T = TypeVar("T")

Call = Callable[[], Awaitable[bool]]
"""Run one task end to end; True when it succeeded."""


async def window(system: str, mode: str, call: Call, workers: int, total: int) -> Result:
    """``total`` tasks, ``workers`` at a time; client-side end-to-end latencies."""
    remaining = total
    latencies: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal remaining, failed
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            ok = await call()
            latencies.append((time.perf_counter() - started) * 1000)
            failed += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return Result(system, mode, total, time.perf_counter() - started, latencies, failed)


async def limited(concurrency: int, calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls with at most ``concurrency`` at a time; results in call order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))
