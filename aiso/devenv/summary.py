"""What ``aiso dev`` prints once everything is up: where things are and how to try them."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from aiso.registry import PipelineState
from aiso.resources import Catalog, PipelineProblem

__all__ = ["EXAMPLE_TEXT", "ProcessRow", "example_commands", "pipeline_lines", "summary"]

EXAMPLE_TEXT = "  Hello   World. Second sentence!  "
DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class ProcessRow:
    """One line of the process table."""

    name: str
    pid: int | None
    port: int | None
    state: str


def _states(catalog: Catalog) -> list[PipelineState]:
    states = []
    for name in sorted(catalog.pipelines):
        resolved = catalog.resolve(name)
        if isinstance(resolved, PipelineProblem):
            states.append(PipelineState(name, None, resolved))
        else:
            states.append(PipelineState(name, resolved, None))
    return states


def pipeline_lines(catalog: Catalog) -> list[Text]:
    """One line per pipeline: its steps when Ready, else why not (it does not stop dev)."""
    lines = []
    for state in _states(catalog):
        if state.plan is not None:
            chain = " → ".join(s.name for s in state.plan.steps)
            flow = f"{state.plan.input.value} → {chain} → {state.plan.output.value}"
            lines.append(Text.assemble(("  ✓ ", "green"), (state.name, "bold"), f"  {flow}"))
        else:
            assert state.problem is not None
            problem = f"  not ready: {state.problem.reason}: {state.problem.message}"
            lines.append(Text.assemble(("  ✗ ", "red"), (state.name, "bold"), (problem, "red")))
    if not lines:
        lines.append(Text("  (no Pipeline in the manifests)", style="yellow"))
    return lines


def example_commands(catalog: Catalog, gateway: str, api_key_needed: bool) -> list[str]:
    """A copy-paste ``aiso submit`` and its curl equivalent for a Ready text pipeline."""
    ready = [s for s in _states(catalog) if s.plan is not None]
    text_ready = [s.name for s in ready if s.plan is not None and s.plan.input.value == "text"]
    if not text_ready:
        if not ready:
            return []
        return [f"aiso submit {ready[0].name} --file PATH --wait"]
    name = "text-stats" if "text-stats" in text_ready else text_ready[0]
    url = "" if gateway == DEFAULT_URL else f" --url {gateway}"
    submit = f"aiso submit {name} --text {shlex.quote(EXAMPLE_TEXT)} --wait{url}"
    body = {"pipeline": name, "input": {"payload_type": "text", "payload": {"text": EXAMPLE_TEXT}}}
    auth = ' -H "Authorization: Bearer $AISO_API_KEY"' if api_key_needed else ""
    curl = (
        f"curl -s '{gateway}/v1/tasks?wait=30' -H 'Content-Type: application/json'{auth} "
        f"-d {shlex.quote(json.dumps(body))}"
    )
    return [submit, curl]


def summary(
    *,
    gateway: str,
    broker: str,
    store: str,
    log_dir: Path,
    processes: Sequence[ProcessRow],
    examples: Sequence[str],
    extra: Mapping[str, str],
) -> list[Text]:
    """Lines to print without wrapping, so the URLs and commands stay copy-pasteable."""
    places = {
        "gateway": gateway,
        "API docs": f"{gateway}/docs",
        "broker": broker,
        "store": store,
        "logs": f"{log_dir}/",
        **extra,
    }
    width = max(map(len, places))
    lines = [Text("aiso dev is up", style="bold green")]
    lines += [Text.assemble((f"  {k:<{width}}  ", "bold"), v) for k, v in places.items()]
    lines.append(Text(""))
    rows = [("process", "pid", "port", "state")] + [
        (
            r.name,
            str(r.pid) if r.pid is not None else "-",
            str(r.port) if r.port is not None else "-",
            r.state,
        )
        for r in processes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for i, (name, pid, port, state) in enumerate(rows):
        cells = f"  {name:<{widths[0]}}  {pid:>{widths[1]}}  {port:>{widths[2]}}  "
        if i == 0:
            lines.append(Text(cells + state, style="bold"))
        else:
            ok = state in ("ready", "running")
            lines.append(Text.assemble(cells, (state, "green" if ok else "yellow")))
    lines.append(Text(""))
    if examples:
        lines.append(Text("Try it:", style="bold"))
        lines += [Text(f"  {command}") for command in examples]
        lines.append(Text(""))
    lines.append(
        Text(
            "Showing warnings and errors of every process (--verbose shows everything). "
            "Ctrl-C stops them all.",
            style="dim",
        )
    )
    return lines
