"""Benchmark of the floor: ``bench/floor.py`` processes driven by an aio-pika client."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench import floor
from bench.common import PAYLOAD, ROOT, Config, Result, child_process, stop_process
from bench.modes import limited, window

__all__ = ["bench_floor"]

SYSTEM = "floor"
TIMEOUT = 120.0


class Client:
    """Publishes tasks (with confirms) and learns of their end from a private done queue."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[float]] = {}

    async def open(self, amqp_url: str) -> None:
        self.connection = await aio_pika.connect(amqp_url)
        channel = await self.connection.channel(publisher_confirms=True)
        await floor.declare(channel)
        self.tasks = await channel.get_exchange(floor.TASKS_EXCHANGE, ensure=False)
        done = await channel.get_exchange(floor.DONE_EXCHANGE, ensure=False)
        self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.bind(done, self.queue.name)
        await self.queue.consume(self._on_done, no_ack=True)

    async def close(self) -> None:
        await self.connection.close()

    def _on_done(self, message: AbstractIncomingMessage) -> None:
        future = self.pending.pop(json.loads(message.body)["id"], None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def submit(self) -> asyncio.Future[float]:
        """Publish one task; the future resolves with the time its end was learnt."""
        task_id = uuid.uuid4().hex
        future = self.pending[task_id] = asyncio.get_running_loop().create_future()
        body = json.dumps({"id": task_id, "reply_to": self.queue.name, "payload": PAYLOAD})
        await floor.publish(self.tasks, body.encode(), "task")
        return future

    async def run_one(self) -> bool:
        await asyncio.wait_for(await self.submit(), TIMEOUT)
        return True


async def _burst(client: Client, cfg: Config) -> Result:
    async def submit() -> tuple[float, asyncio.Future[float]]:
        sent = time.perf_counter()
        return sent, await client.submit()

    started = time.perf_counter()
    sent = await limited(cfg.submit_concurrency, [submit] * cfg.tasks)
    ends = [await asyncio.wait_for(f, TIMEOUT) for _, f in sent]
    latencies = [(end - t0) * 1000 for (t0, _), end in zip(sent, ends, strict=True)]
    return Result(SYSTEM, f"burst N={cfg.tasks}", cfg.tasks, max(ends) - started, latencies)


async def bench_floor(amqp_url: str, cfg: Config) -> list[Result]:
    """Start the relay and three services, run the three modes, stop everything."""
    client = Client()
    await client.open(amqp_url)  # declares the topology before anyone publishes
    script = str(ROOT / "bench" / "floor.py")
    env = {"BENCH_AMQP_URL": amqp_url}
    roles = [("relay",), *(("service", s) for s in floor.SERVICES)]
    processes = []
    try:
        for role in roles:
            log = cfg.log_dir / f"floor-{'-'.join(role)}.log"
            processes.append(await child_process([sys.executable, script, *role], log, env))
        for _ in range(cfg.warmup):  # also waits until every process consumes
            await client.run_one()
        return [
            await _burst(client, cfg),
            await window(SYSTEM, f"window W={cfg.window}", client.run_one, cfg.window, cfg.tasks),
            await window(SYSTEM, "sequential", client.run_one, 1, cfg.sequential),
        ]
    finally:
        await asyncio.gather(*(stop_process(p) for p in processes))
        await client.close()
