"""Throughput and latency of a 3-step no-op pipeline: aiso, a raw aio-pika relay, Celery.

    python bench/pipeline.py [--tasks N] [--window W] [--store sqlite|postgres] [--quick]
                             [--rounds K]

Each system runs on its own fresh vhost of the local RabbitMQ (deleted afterwards) in three
modes: a burst of N tasks submitted as fast as possible, W tasks kept in flight, and one
task at a time. With ``--rounds K`` the systems take turns K times and the summary gives the
median of each figure, so that a slow minute of the machine does not decide a comparison.
See bench/README.md for what each system does and what is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
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


def _ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """mode → {other system: aiso's throughput divided by the other's}."""
    by_mode: dict[str, dict[str, float]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {})[r.system] = r.throughput
    ratios: dict[str, dict[str, float]] = {}
    for mode, rates in by_mode.items():
        aiso = rates.get("aiso")
        if aiso is None:
            continue
        ratios[mode] = {o: aiso / rates[o] for o in ("celery", "floor") if rates.get(o)}
    return ratios


def _medians(rounds: list[list[Result]]) -> list[Result]:
    """Each system and mode with the median throughput of the rounds and the latencies of
    all of them together."""
    merged: dict[tuple[str, str], list[Result]] = {}
    for results in rounds:
        for r in results:
            merged.setdefault((r.system, r.mode), []).append(r)
    summary = []
    for (system, mode), runs in merged.items():
        rate = statistics.median(r.throughput for r in runs)
        tasks = runs[0].tasks
        summary.append(
            Result(
                system,
                mode,
                tasks,
                tasks / rate if rate > 0 else 0.0,
                [ms for r in runs for ms in r.latencies_ms],
                sum(r.failed for r in runs),
            )
        )
    return summary


def _table(results: list[Result]) -> str:
    head = f"{'system':<7} {'mode':<15} {'tasks/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        rate, p50, p95, p99 = summarise(r)
        failed = f"  ({r.failed} failed)" if r.failed else ""
        lines.append(
            f"{r.system:<7} {r.mode:<15} {rate:>8.1f} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f}{failed}"
        )
    ratios = [
        f"  {mode:<15} aiso = " + ", ".join(f"{v:.2f}x {other}" for other, v in versus.items())
        for mode, versus in _ratios(results).items()
        if versus
    ]
    if ratios:
        lines += ["", "aiso throughput relative to the others:", *ratios]
    return "\n".join(lines)


def _spread(rounds: list[list[Result]]) -> str:
    """Each round's ratios, then their medians: the comparison made within each round, where
    the systems ran minutes apart on the same machine."""
    per_round = [_ratios(results) for results in rounds]
    lines = ["aiso throughput relative to the others, round by round:"]
    for mode in per_round[0]:
        for other in per_round[0][mode]:
            values = [r[mode][other] for r in per_round if other in r.get(mode, {})]
            listed = " ".join(f"{v:.2f}" for v in values)
            lines.append(
                f"  {mode:<15} vs {other:<6} {listed}   median {statistics.median(values):.2f}x"
            )
    return "\n".join(lines)


async def _run(
    cfg: Config, systems: list[str], rounds: int
) -> tuple[list[list[Result]], dict[str, float]]:
    """Every system once per round, in turn; the results of each round, and the most foreign
    load seen while each system ran."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    measured_rounds: list[list[Result]] = []
    loads: dict[str, float] = {}
    foreign = ForeignLoad()
    for round_number in range(1, rounds + 1):
        results: list[Result] = []
        for system in systems:
            turn = f" (round {round_number} of {rounds})" if rounds > 1 else ""
            print(f"== {system}{turn}", flush=True)
            async with vhost(system) as amqp_url:
                foreign.start()
                measured = await _runner(system)(amqp_url, cfg)
                load = foreign.cores()
            print(_table(measured), flush=True)
            if load is not None:
                loads[system] = max(load, loads.get(system, 0.0))
                note = "  (figures unreliable)" if load > FOREIGN_LOAD_LIMIT else ""
                print(f"other work on the machine meanwhile: {load:.2f} cores{note}", flush=True)
            results += measured
        measured_rounds.append(results)
    return measured_rounds, loads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="tasks in the burst and window modes")
    parser.add_argument("--window", type=int, help="tasks in flight in the window mode")
    parser.add_argument("--sequential", type=int, help="tasks in the sequential mode")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="N=200, W=16, 50 sequential")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the systems in turn this many times (medians)"
    )
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
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    os.chdir(ROOT)  # services import `bench.noop`, and the Celery worker `bench.celery_app`
    try:
        rounds, loads = asyncio.run(_run(cfg, systems, args.rounds))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)
    print(f"\n{cfg.tasks} tasks, window {cfg.window}, {cfg.sequential} sequential, ", end="")
    print(f"aiso store {cfg.store}", end="")
    if len(rounds) == 1:
        print("\n")
        print(_table(rounds[0]))
    else:
        print(f"; medians of {len(rounds)} rounds (latencies: all rounds together)\n")
        print(_table(_medians(rounds)))
        if any(_ratios(rounds[0]).values()):
            print()
            print(_spread(rounds))
    if loads:
        spent = ", ".join(f"{system} {cores:.2f}" for system, cores in loads.items())
        print(f"\nother work on the machine meanwhile, at most (cores): {spent}")


if __name__ == "__main__":
    main()
