"""How much CPU work *other* than the benchmark ran on the machine meanwhile (Linux ``/proc``).

Everything counts as the benchmark's own that descends from this process, plus the broker
and the database server; the rest of the machine's busy time is foreign load, which makes a
run's figures unreliable. Descendants that have already exited count through
``os.times()``, which adds up the CPU of every child this process reaped (and of theirs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

__all__ = ["CpuSplit", "ForeignLoad"]

T = TypeVar("T")

_SERVERS = ("beam.smp", "postgres", "epmd")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # all but idle and iowait


def _reaped_seconds() -> float:
    times = os.times()
    return times.children_user + times.children_system


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid → (parent pid, command name, CPU seconds so far)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(rest[1]), name, (int(rest[11]) + int(rest[12])) / _TICK)
    return table


def _ours(table: dict[int, tuple[int, str, float]]) -> dict[int, float]:
    me = os.getpid()

    def mine(pid: int) -> bool:
        while pid > 1:
            if pid == me:
                return True
            pid = table[pid][0] if pid in table else 0
        return False

    return {pid: cpu for pid, (_, name, cpu) in table.items() if name in _SERVERS or mine(pid)}


class ForeignLoad:
    """Start with ``start()``, then ``cores()`` is the foreign load since, in cores."""

    def start(self) -> None:
        self.available = Path("/proc/stat").exists()
        if self.available:
            self.t0, self.busy0, self.ours0 = time.monotonic(), _busy_seconds(), _ours(_processes())
            self.reaped0 = _reaped_seconds()

    def cores(self) -> float | None:
        if not self.available:
            return None
        ours1 = _ours(_processes())
        own = sum(cpu - self.ours0.get(pid, 0.0) for pid, cpu in ours1.items())
        own += _reaped_seconds() - self.reaped0
        foreign = _busy_seconds() - self.busy0 - own
        return max(0.0, foreign / (time.monotonic() - self.t0))


class CpuSplit:
    """CPU seconds spent by named processes (and the servers) during a mode, printed per task,
    to show which part of a system the mode's time goes to."""

    def __init__(self, system: str, pids: dict[str, int]) -> None:
        self.system = system
        self.pids = pids

    def _sample(self) -> dict[str, float]:
        table = _processes()
        sample = {name: table[pid][2] for name, pid in self.pids.items() if pid in table}
        sample["bench client"] = table[os.getpid()][2]
        for server, label in (("beam.smp", "rabbitmq"), ("postgres", "postgresql")):
            sample[label] = sum(cpu for _, name, cpu in table.values() if name == server)
        return sample

    def start(self, mode: str) -> None:
        self.mode, self.before = mode, self._sample()

    def stop(self, tasks: int) -> None:
        after = self._sample()
        spent = {n: after[n] - self.before[n] for n in after if n in self.before}
        parts = ", ".join(
            f"{name} {cpu * 1000 / tasks:.1f}"
            for name, cpu in sorted(spent.items(), key=lambda item: -item[1])
            if cpu > 0
        )
        total = sum(spent.values()) * 1000 / tasks
        print(f"{self.system} {self.mode}, CPU ms per task: {total:.1f} = {parts}", flush=True)

    async def around(self, mode: str, tasks: int, run: Awaitable[T]) -> T:
        self.start(mode)
        try:
            return await run
        finally:
            self.stop(tasks)
