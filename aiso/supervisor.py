"""Runs aiso components as separate OS processes and restarts any that die.

``aiso dev`` uses it to behave like a small cluster on one machine; the integration tests use
it to kill and watch components the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ProcessSpec", "Supervisor", "aiso_command"]

log = logging.getLogger("aiso.supervisor")


def aiso_command(*args: str) -> list[str]:
    """argv that runs ``aiso <args>`` from the current environment (no PATH lookup).

    The console script, not ``python -m aiso``: ``-m`` puts the working directory first on
    ``sys.path``, where the source folders would shadow the installed package mapping.
    """
    script = Path(sys.executable).with_name("aiso")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-P", "-m", "aiso", *args]


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Child:
    spec: ProcessSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    watcher: asyncio.Task[None] | None = None


class Supervisor:
    """Starts every process, restarts one that exits, stops them all on ``stop``."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        log_dir: Path,
        restart_delay: float = 1.0,
        on_output: Callable[[str, str], None] | None = None,
    ) -> None:
        self._children = {s.name: _Child(s) for s in specs}
        self.log_dir = log_dir
        self.restart_delay = restart_delay
        self.on_output = on_output
        self._stopping = False
        self._pumps: set[asyncio.Task[None]] = set()

    def pid(self, name: str) -> int:
        process = self._children[name].process
        if process is None or process.returncode is not None:
            raise LookupError(f"{name} is not running")
        return process.pid

    def restarts(self, name: str) -> int:
        return self._children[name].restarts

    def names(self) -> list[str]:
        return list(self._children)

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self._children.values():
            child.process = await self._spawn(child.spec)
            child.watcher = asyncio.create_task(self._watch(child))

    async def _spawn(self, spec: ProcessSpec) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *spec.argv,
            env={**os.environ, **spec.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own session: a Ctrl-C reaches only the supervisor, which stops children in order.
            start_new_session=True,
        )
        self._pumps.add(pump := asyncio.create_task(self._pump(spec.name, process)))
        pump.add_done_callback(self._pumps.discard)
        return process

    async def _pump(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        with (self.log_dir / f"{name}.log").open("ab") as logfile:
            async for line in process.stdout:
                logfile.write(line)
                logfile.flush()
                if self.on_output is not None:
                    self.on_output(name, line.decode(errors="replace").rstrip())

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            child.restarts += 1
            log.warning(
                "%s exited with code %s; restarting (restart #%d)",
                child.spec.name,
                code,
                child.restarts,
            )
            await asyncio.sleep(min(self.restart_delay * child.restarts, 10.0))
            if self._stopping:
                return
            child.process = await self._spawn(child.spec)

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (services drain their work); SIGKILL what outlives ``timeout``."""
        self._stopping = True
        running = [
            c.process
            for c in self._children.values()
            if c.process is not None and c.process.returncode is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), timeout)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))
        for child in self._children.values():
            if child.watcher is not None:
                child.watcher.cancel()
