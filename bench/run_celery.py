"""Benchmark of Celery: a chain of three no-op tasks on one prefork worker.

The worker runs as ``celery -A bench.celery_app worker`` in a subprocess; this process is the
client. Celery's client is synchronous, so every task in flight holds a thread (each thread
has its own ``rpc://`` reply queue).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from celery import Celery

from bench.celery_app import QUEUE, make_app, pipeline
from bench.common import PAYLOAD, Config, Result, child_process, console_script, stop_process
from bench.modes import window

__all__ = ["bench_celery"]

SYSTEM = "celery"
TIMEOUT = 120.0
WORKER_CONCURRENCY = 2
BURST_THREADS = 8
"""Client threads submitting the burst: publishing is cheap, and each thread holds a
connection for its replies."""


def _run_one(client: Celery) -> bool:
    return bool(pipeline(client, PAYLOAD).apply_async().get(timeout=TIMEOUT) == PAYLOAD)


def _batch(client: Celery, count: int) -> list[tuple[float, bool, float]]:
    """Submit ``count`` chains back to back, then wait for each: (sent, succeeded, done).

    Submission and reading stay on one thread: a result is read through the reply queue of
    the thread that submitted it. ``done`` is when the last task finished (worker's clock).
    """
    sent = [(time.time(), pipeline(client, PAYLOAD).apply_async()) for _ in range(count)]
    ends = []
    for t0, result in sent:
        ok = result.get(timeout=TIMEOUT) == PAYLOAD
        done = result.date_done
        if isinstance(done, str):
            done = datetime.fromisoformat(done)
        ends.append((t0, ok, done.timestamp()))
    return ends


async def _burst(cfg: Config, pool: ThreadPoolExecutor, client: Celery) -> Result:
    loop = asyncio.get_running_loop()
    threads = min(cfg.submit_concurrency, BURST_THREADS)
    shares = [cfg.tasks // threads + (i < cfg.tasks % threads) for i in range(threads)]
    started = time.time()
    batches = await asyncio.gather(*(loop.run_in_executor(pool, _batch, client, n) for n in shares))
    rows = [row for batch in batches for row in batch]
    latencies = [(done - t0) * 1000 for t0, _, done in rows]
    failed = sum(not ok for _, ok, _ in rows)
    seconds = max(done for _, _, done in rows) - started
    return Result(SYSTEM, f"burst N={cfg.tasks}", cfg.tasks, seconds, latencies, failed)


async def bench_celery(amqp_url: str, cfg: Config) -> list[Result]:
    """Start a worker, run the three modes, stop it."""
    client = make_app(amqp_url)
    argv = [
        console_script("celery"),
        "-A",
        "bench.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(WORKER_CONCURRENCY),
        "-Q",
        QUEUE,
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    worker = await child_process(
        argv, cfg.log_dir / "celery-worker.log", {"BENCH_AMQP_URL": amqp_url}
    )
    threads = max(cfg.window, cfg.submit_concurrency)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="celery-client")
    loop = asyncio.get_running_loop()

    async def run_one() -> bool:
        return await loop.run_in_executor(pool, _run_one, client)

    try:
        for _ in range(cfg.warmup):  # the first also waits for the worker to come up
            await run_one()
        return [
            await _burst(cfg, pool, client),
            await window(SYSTEM, f"window W={cfg.window}", run_one, cfg.window, cfg.tasks),
            await window(SYSTEM, "sequential", run_one, 1, cfg.sequential),
        ]
    finally:
        await stop_process(worker)
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()
