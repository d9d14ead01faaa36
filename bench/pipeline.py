"""Throughput and latency of a 3-step no-op pipeline: aiso, a raw aio-pika relay, Celery.

    python bench/pipeline.py [--tasks N] [--window W] [--store sqlite|postgres] [--quick]

Each system runs on its own fresh vhost of the local RabbitMQ (deleted afterwards) in three
modes: a burst of N tasks submitted as fast as possible, W tasks kept in flight, and one
task at a time. See bench/README.md for what each system does and what is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `bench` without the repo first

from bench.common import ROOT, Config, Result, summarise, vhost
from bench.load import ForeignLoad

Runner = Callable[[str, Config], Awaitable[list[Result]]]
SYSTEMS = ("aiso", "floor", "celery")
FOREIGN_LOAD_LIMIT = 0.1
"""Cores of unrelated work above which a run's figures are flagged as unreliable."""


def _runner(system: str) -> Runner:
    # Imported on demand: `--systems floor` needs neither aiso's store nor Celery.
    if system == "aiso":
        from bench.run_aiso import bench_aiso

        return bench_aiso
    if system == "floor":
        from bench.run_floor import bench_floor

        return bench_floor
    from bench.run_celery import bench_celery

    return bench_celery


def _table(results: list[Result]) -> str:
    head = f"{'system':<7} {'mode':<15} {'tasks/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        rate, p50, p95, p99 = summarise(r)
        failed = f"  ({r.failed} failed)" if r.failed else ""
        lines.append(
            f"{r.system:<7} {r.mode:<15} {rate:>8.1f} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f}{failed}"
        )
    by_mode: dict[str, dict[str, float]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {})[r.system] = r.throughput
    ratios = []
    for mode, rates in by_mode.items():
        aiso = rates.get("aiso")
        parts = [
            f"{aiso / rates[other]:.2f}x {other}"
            for other in ("celery", "floor")
            if aiso is not None and rates.get(other)
        ]
        if parts:
            ratios.append(f"  {mode:<15} aiso = " + ", ".join(parts))
    if ratios:
        lines += ["", "aiso throughput relative to the others:", *ratios]
    return "\n".join(lines)


async def _run(cfg: Config, systems: list[str]) -> tuple[list[Result], dict[str, float]]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results: list[Result] = []
    loads: dict[str, float] = {}
    foreign = ForeignLoad()
    for system in systems:
        print(f"== {system}", flush=True)
        async with vhost(system) as amqp_url:
            foreign.start()
            measured = await _runner(system)(amqp_url, cfg)
            load = foreign.cores()
        print(_table(measured), flush=True)
        if load is not None:
            loads[system] = load
            note = "  (figures unreliable)" if load > FOREIGN_LOAD_LIMIT else ""
            print(f"other work on the machine meanwhile: {load:.2f} cores{note}", flush=True)
        results += measured
    return results, loads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="tasks in the burst and window modes")
    parser.add_argument("--window", type=int, help="tasks in flight in the window mode")
    parser.add_argument("--sequential", type=int, help="tasks in the sequential mode")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="N=200, W=16, 50 sequential")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument(
        "--profile", type=Path, help="write cProfile stats of aiso's orchestrator here"
    )
    args = parser.parse_args(argv)
    quick = {"tasks": 200, "window": 16, "sequential": 50} if args.quick else {}
    sizes = {k: v for k in ("tasks", "window", "sequential") if (v := getattr(args, k))}
    profile = args.profile.resolve() if args.profile else None  # before the chdir below
    cfg = Config(**{**quick, **sizes}, store=args.store, profile_dir=profile)
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    os.chdir(ROOT)  # services import `bench.noop`, and the Celery worker `bench.celery_app`
    try:
        results, loads = asyncio.run(_run(cfg, systems))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
    print(f"\n{cfg.tasks} tasks, window {cfg.window}, {cfg.sequential} sequential, ", end="")
    print(f"aiso store {cfg.store}\n")
    print(_table(results))
    if loads:
        spent = ", ".join(f"{system} {cores:.2f}" for system, cores in loads.items())
        print(f"\nother work on the machine meanwhile (cores): {spent}")


if __name__ == "__main__":
    main()
