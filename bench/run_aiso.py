"""Benchmark of aiso: gateway, orchestrator and the three no-op services as real processes.

The platform is started the way the integration tests start one: ``aiso.supervisor``
running ``aiso wrapper``, ``aiso orchestrator`` and ``aiso service run bench.noop:…``
against a fresh store (a SQLite file, or a new PostgreSQL database with ``--store postgres``).
"""

from __future__ import annotations

import asyncio
import contextlib
import pstats
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
from sqlalchemy import func, select

from aiso.store import Store, open_store
from aiso.store import tables as t
from aiso.store.database import as_utc
from aiso.supervisor import ProcessSpec, Supervisor
from bench.common import PAYLOAD, ROOT, Config, Result, console_script
from bench.load import CpuSplit
from bench.modes import limited, window

__all__ = ["POSTGRES_URL", "bench_aiso"]

SYSTEM = "aiso"
MANIFESTS = ROOT / "bench" / "manifests"
POSTGRES_URL = "postgresql+asyncpg://aiso:aiso@127.0.0.1:5432/aiso"
BODY = {"pipeline": "noop3", "input": {"payload_type": "text", "payload": PAYLOAD}}
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
SERVICES = {"noop-a": "service_a", "noop-b": "service_b", "noop-c": "service_c"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _database(kind: str) -> AsyncIterator[str]:
    """URL of a fresh, empty store, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="aiso-bench-") as tmp:
            yield f"sqlite+aiosqlite:///{Path(tmp) / 'aiso.db'}"
        return
    name = f"aiso_bench_{uuid.uuid4().hex[:10]}"
    admin = POSTGRES_URL.replace("postgresql+asyncpg", "postgresql")
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await asyncio.shield(conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        await conn.close()


def _profiled(name: str, argv: list[str], cfg: Config) -> list[str]:
    """``argv`` run under cProfile, writing ``<profile dir>/<name>.prof``, when profiling."""
    if cfg.profile_dir is None:
        return argv
    cfg.profile_dir.mkdir(parents=True, exist_ok=True)
    out = cfg.profile_dir / f"{name}.prof"
    # -P: the working directory (the repo root) must not come first on sys.path.
    return [sys.executable, "-P", "-m", "cProfile", "-o", str(out), *argv]


def _specs(
    amqp_url: str, database_url: str, cfg: Config
) -> tuple[list[ProcessSpec], str, list[str]]:
    """Process specs, the gateway URL, and every URL that must answer /readyz."""
    env = {
        "AISO_AMQP_URL": amqp_url,
        "AISO_DATABASE_URL": database_url,
        "AISO_MANIFESTS": str(MANIFESTS),
        "AISO_LOG_LEVEL": "WARNING",
    }
    aiso = console_script("aiso")
    port = _free_port()
    gateway = f"http://127.0.0.1:{port}"
    wrapper = [aiso, "wrapper", "--port", str(port), "--manifests", str(MANIFESTS)]
    specs = [
        ProcessSpec("wrapper", wrapper, env),
        ProcessSpec("orchestrator", _profiled("orchestrator", [aiso, "orchestrator"], cfg), env),
    ]
    ready = [gateway]
    for name, attr in SERVICES.items():
        svc_port = _free_port()
        argv = [aiso, "service", "run", f"bench.noop:{attr}", "--port", str(svc_port)]
        specs.append(ProcessSpec(f"svc-{name}", argv, env))
        ready.append(f"http://127.0.0.1:{svc_port}")
    return specs, gateway, ready


async def _wait_ready(urls: list[str], timeout: float = 60) -> None:
    async with httpx.AsyncClient() as client:
        for url in urls:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready after {timeout}s")
                await asyncio.sleep(0.2)


async def _terminal(store: Store, ids: list[str], timeout: float) -> list[Any]:
    """Rows (status, created_at, finished_at) of the tasks, once every one has ended."""
    deadline = time.monotonic() + timeout
    chunks = [ids[i : i + 500] for i in range(0, len(ids), 500)]
    while True:
        done = 0
        async with store.engine.connect() as conn:
            for chunk in chunks:
                query = select(func.count()).where(
                    t.tasks.c.id.in_(chunk), t.tasks.c.status.in_(TERMINAL)
                )
                done += int((await conn.execute(query)).scalar_one())
        if done >= len(ids):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - done} of {len(ids)} tasks unfinished after {timeout}s")
        await asyncio.sleep(0.25)
    rows: list[Any] = []
    async with store.engine.connect() as conn:
        for chunk in chunks:
            query = select(t.tasks.c.status, t.tasks.c.created_at, t.tasks.c.finished_at)
            rows += (await conn.execute(query.where(t.tasks.c.id.in_(chunk)))).all()
    return rows


def _seconds(value: datetime) -> float:
    stamp = as_utc(value)
    assert stamp is not None
    return stamp.timestamp()


async def _burst(
    client: aiohttp.ClientSession, store: Store, cfg: Config, split: CpuSplit
) -> Result:
    async def submit() -> str | None:
        try:
            async with client.post("/v1/tasks", json=BODY) as answer:
                if answer.status != 202:
                    return None
                return str((await answer.json())["task_id"])
        except aiohttp.ClientError:
            return None

    started = time.time()
    split.start("burst")
    submitted = await limited(cfg.submit_concurrency, [submit] * cfg.tasks)
    ids = [i for i in submitted if i is not None]
    rows = await _terminal(store, ids, timeout=max(120.0, cfg.tasks / 5))
    split.stop(cfg.tasks)
    ended = max(_seconds(r.finished_at) for r in rows)
    latencies = [(_seconds(r.finished_at) - _seconds(r.created_at)) * 1000 for r in rows]
    failed = sum(r.status != "succeeded" for r in rows) + len(submitted) - len(ids)
    return Result(SYSTEM, f"burst N={cfg.tasks}", cfg.tasks, ended - started, latencies, failed)


async def bench_aiso(amqp_url: str, cfg: Config) -> list[Result]:
    """Start the platform, run the three modes, stop it."""
    async with _database(cfg.store) as database_url:
        store = await open_store(database_url)  # migrate once before the processes start
        specs, gateway, ready = _specs(amqp_url, database_url, cfg)
        supervisor = Supervisor(specs, log_dir=cfg.log_dir / "aiso", restart_delay=0.5)
        # aiohttp rather than httpx: the client shares the two cores with the platform, and
        # httpx spends several times more CPU per request.
        client = aiohttp.ClientSession(
            base_url=gateway,
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=max(cfg.window, cfg.submit_concurrency) + 4),
        )
        try:
            await supervisor.start()
            await _wait_ready(ready)

            async def run_one() -> bool:
                try:
                    async with client.post("/v1/tasks", params={"wait": 30}, json=BODY) as answer:
                        return (
                            answer.status == 200 and (await answer.json())["status"] == "succeeded"
                        )
                except aiohttp.ClientError:
                    return False

            for _ in range(cfg.warmup):
                await run_one()
            split = CpuSplit(SYSTEM, {n: supervisor.pid(n) for n in supervisor.names()})
            return [
                await _burst(client, store, cfg, split),
                await split.around(
                    "window",
                    cfg.tasks,
                    window(SYSTEM, f"window W={cfg.window}", run_one, cfg.window, cfg.tasks),
                ),
                await split.around(
                    "sequential",
                    cfg.sequential,
                    window(SYSTEM, "sequential", run_one, 1, cfg.sequential),
                ),
            ]
        finally:
            await asyncio.shield(supervisor.stop())
            await client.close()
            await store.close()
            if cfg.profile_dir is not None:
                _report_profile(cfg.profile_dir / "orchestrator.prof")


def _report_profile(path: Path) -> None:
    """Write the heaviest functions of a cProfile dump next to it, as text."""
    if not path.exists():
        return
    with path.with_suffix(".txt").open("w") as out:
        stats = pstats.Stats(str(path), stream=out)
        for key in ("tottime", "cumulative"):
            stats.sort_stats(key).print_stats(40)
    print(f"profile of the {path.stem}: {path.with_suffix('.txt')}")
