"""What every system's benchmark shares: sizes, vhosts, child processes, statistics.

A benchmark of one system is an async function ``(amqp_url, Config) -> list[Result]`` that
runs the three modes against a platform it starts and stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PAYLOAD",
    "ROOT",
    "Config",
    "Result",
    "child_process",
    "console_script",
    "percentile",
    "stop_process",
    "summarise",
    "vhost",
]

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = {"text": "The quick brown fox jumps over the lazy dog."}
"""The text every task carries through the three no-op steps."""


@dataclass(frozen=True)
class Config:
    """Sizes of one run: ``tasks`` in the burst, ``window`` in flight, ``sequential`` one by one."""

    tasks: int = 1000
    window: int = 32
    sequential: int = 200
    submit_concurrency: int = 64
    warmup: int = 20
    store: str = "sqlite"
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "aiso-bench")
    profile_dir: Path | None = None


@dataclass(frozen=True)
class Result:
    """One line of the table: a system in one mode."""

    system: str
    mode: str
    tasks: int
    seconds: float
    latencies_ms: Sequence[float]
    failed: int = 0

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(result: Result) -> tuple[float, float, float, float]:
    """(tasks/s, p50, p95, p99) of a result."""
    lat = result.latencies_ms
    return result.throughput, percentile(lat, 50), percentile(lat, 95), percentile(lat, 99)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextlib.asynccontextmanager
async def vhost(system: str) -> AsyncIterator[str]:
    """A fresh RabbitMQ vhost for one system (AMQP URL), deleted on the way out."""
    name = f"bench-{system}-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", name)
    try:
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", name, "guest", *[".*"] * 3)
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        # Shielded: a Ctrl-C arriving now must not leave the vhost behind.
        await asyncio.shield(asyncio.to_thread(_rabbitmqctl, "delete_vhost", name))


def console_script(name: str) -> str:
    """Path of a console script installed next to this interpreter (``aiso``, ``celery``).

    Not ``python -m``: that puts the working directory (the repo root) first on ``sys.path``,
    where the source folder ``aiso/`` would shadow the installed package, whose subpackages
    (``aiso.orchestrator``, ``aiso.wrapper``) live in other folders.
    """
    return str(Path(sys.executable).parent / name)


async def child_process(
    argv: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start a process in its own session (Ctrl-C reaches only us) from the repo root."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    """SIGTERM the process's whole group, SIGKILL it if it outlives ``timeout``."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
