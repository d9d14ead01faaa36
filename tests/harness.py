"""A whole aiso platform as real OS processes, for integration tests.

Starts gateways, orchestrators and one process per AIService of ``manifests/`` under the same
``Supervisor`` that ``aiso dev`` uses, on a private RabbitMQ vhost and a fresh database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from aiso.resources import load_manifests
from aiso.sdk import Runtime, Service
from aiso.settings import Settings
from aiso.store import Store, open_store
from aiso.store import tables as t
from aiso.supervisor import ProcessSpec, Supervisor, aiso_command

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    supervisor: Supervisor
    store: Store
    gateways: list[str]
    service_ports: dict[str, int]

    @property
    def url(self) -> str:
        return self.gateways[0]

    def kill(self, name: str) -> None:
        os.kill(self.supervisor.pid(name), signal.SIGKILL)

    async def wait_running(self, name: str, timeout: float = 30) -> None:
        for _ in range(int(timeout * 10)):
            try:
                self.supervisor.pid(name)
                return
            except LookupError:
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{name} did not come back")

    async def counts(self) -> dict[str, int]:
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                select(t.tasks.c.status, func.count()).group_by(t.tasks.c.status)
            )
            return {r[0]: int(r[1]) for r in rows}

    async def wait_terminal(self, total: int, timeout: float) -> dict[str, int]:
        """Wait until ``total`` tasks are terminal; return the counts by status."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            counts = await self.counts()
            if sum(counts.get(s, 0) for s in TERMINAL) >= total:
                return counts
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"tasks not finished in {timeout}s: {counts}")
            await asyncio.sleep(0.5)

    async def step_applications(self) -> list[tuple[str, str, int]]:
        """(task, step, successful applications) for every step of every task."""
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                select(t.step_attempts.c.task_id, t.step_attempts.c.step, func.count())
                .where(t.step_attempts.c.status == "succeeded")
                .group_by(t.step_attempts.c.task_id, t.step_attempts.c.step)
            )
            applied = [(r[0], r[1], int(r[2])) for r in rows]
            events = await conn.execute(
                select(t.events.c.task_id, t.events.c.data).where(
                    t.events.c.kind == "step.succeeded"
                )
            )
            keys = [(r.task_id, r.data["step"], r.data["attempt"]) for r in events]
            assert len(keys) == len(set(keys)), "a step.succeeded event was written twice"
        return applied


def make_runtime(service: Service, amqp_url: str, **settings: Any) -> Runtime:
    """A service runtime on an ephemeral port, for running inside the test's event loop."""
    config = Settings(amqp_url=amqp_url, service_host="127.0.0.1", **settings)
    return Runtime(service, port=0, settings=config, handle_signals=False)


@contextlib.asynccontextmanager
async def running(runtime: Runtime) -> AsyncIterator[Runtime]:
    """Run ``runtime`` in this event loop until the block ends; wait until it is ready."""
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(20):
            while runtime.not_ready() is not None:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield runtime
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)


async def submit_many(
    urls: list[str], n: int, *, pipeline: str = "text-stats", concurrency: int = 50
) -> list[str]:
    """Submit ``n`` text tasks, spread over the gateways ``urls``, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int) -> str:
            body = {
                "pipeline": pipeline,
                "input": {"payload_type": "text", "payload": {"text": f"task {i}. ok"}},
            }
            async with gate:
                response = await client.post(f"{urls[i % len(urls)]}/v1/tasks", json=body)
            assert response.status_code == 202, response.text
            return str(response.json()["task_id"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _wait_ready(url: str, timeout: float = 60) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(int(timeout * 5)):
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


async def start_platform(
    *,
    amqp_url: str,
    database_url: str,
    log_dir: Path,
    orchestrators: int = 1,
    gateways: int = 1,
    manifests: Path = MANIFESTS,
    extra_services: Sequence[tuple[str, str, int]] = (),
    env: dict[str, Any] | None = None,
) -> Platform:
    store = await open_store(database_url)  # migrate once before the processes start
    common = {
        "AISO_AMQP_URL": amqp_url,
        "AISO_DATABASE_URL": database_url,
        "AISO_MANIFESTS": str(manifests),
        **{k: str(v) for k, v in (env or {}).items()},
    }
    specs: list[ProcessSpec] = []
    urls: list[str] = []
    for i in range(gateways):
        port = free_port()
        urls.append(f"http://127.0.0.1:{port}")
        argv = aiso_command("wrapper", "--port", str(port), "--manifests", str(manifests))
        specs.append(ProcessSpec(f"wrapper-{i}", argv, common))
    for i in range(orchestrators):
        specs.append(ProcessSpec(f"orchestrator-{i}", aiso_command("orchestrator"), common))
    ports: dict[str, int] = {}
    catalog = load_manifests(manifests)
    services = [(s.name, s.spec.handler, s.spec.concurrency) for s in catalog.services.values()]
    for name, handler, concurrency in [*services, *extra_services]:
        ports[name] = free_port()
        argv = aiso_command(
            "service", "run", handler, "--port", str(ports[name]), "--concurrency", str(concurrency)
        )
        specs.append(ProcessSpec(f"svc-{name}", argv, common))
    supervisor = Supervisor(specs, log_dir=log_dir, restart_delay=0.5)
    await supervisor.start()
    try:
        await asyncio.gather(
            *(_wait_ready(u) for u in urls),
            *(_wait_ready(f"http://127.0.0.1:{p}") for p in ports.values()),
        )
    except Exception:
        await supervisor.stop()
        await store.close()
        raise
    return Platform(supervisor, store, urls, ports)


async def stop_platform(platform: Platform) -> None:
    await platform.supervisor.stop()
    await platform.store.close()
