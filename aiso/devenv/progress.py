"""Following a task: Server-Sent Events in, per-step progress out.

Three layers, the first two pure so they are tested without a gateway: ``SSEParser`` turns
stream lines into events, ``reduce`` folds each event into a ``TaskProgress``, and ``follow``
runs the HTTP stream, reconnecting with ``Last-Event-ID`` when it drops. ``step_line`` and
``LiveView`` draw the progress as plain lines or as a live rich table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx
from rich.console import RenderableType
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

__all__ = [
    "TERMINAL",
    "LiveView",
    "SSEEvent",
    "SSEParser",
    "StepProgress",
    "TaskProgress",
    "error_text",
    "follow",
    "reduce",
    "step_line",
]

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
"""Event kinds (and task statuses) that end a task."""


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event; ``id`` is the last id seen, as ``Last-Event-ID`` resends it."""

    event: str
    data: str
    id: str | None


class SSEParser:
    """Turns ``text/event-stream`` lines into events, following the WHATWG rules that matter
    here: ``:`` comments, ``data`` lines joined by newlines, an ``id`` that persists, a blank
    line dispatching."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SSEEvent | None:
        """Take one line (without its line break); return the event a blank line completes."""
        if not line:
            event = None
            if self._data:
                event = SSEEvent(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


# --- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepProgress:
    """Where one step stands: its current attempt, and how the last one went."""

    step: str
    service: str
    attempt: int
    state: str  # running, succeeded, failed, timed_out, retrying
    since: datetime | None = None
    duration: float | None = None
    error: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True)
class TaskProgress:
    """Everything shown about a task; ``last_event`` is where a reconnect resumes."""

    status: str = "pending"
    steps: tuple[StepProgress, ...] = ()
    last_event: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def error_text(error: Any) -> str | None:
    """``{"code": …, "message": …}`` as ``code: message``; None when there is no error."""
    if not isinstance(error, dict):
        return None
    return f"{error.get('code', 'Error')}: {error.get('message', '')}".rstrip(": ")


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _step_update(
    step: StepProgress | None, kind: str, data: Mapping[str, Any], at: Any
) -> StepProgress:
    name, service = str(data.get("step", "?")), str(data.get("service", "?"))
    attempt = int(data.get("attempt") or 1)
    if step is None:
        step = StepProgress(name, service, attempt, "running")
    if kind == "step.dispatched":
        return StepProgress(name, service, attempt, "running", since=_when(at))
    if kind == "step.retrying":
        delay = data.get("delay_seconds")
        retry_in = float(delay) if isinstance(delay, int | float) else None
        return replace(step, attempt=attempt, state="retrying", retry_in=retry_in, since=None)
    finished = _when(at)
    duration = (
        (finished - step.since).total_seconds() if finished and step.since is not None else None
    )
    state = {"step.succeeded": "succeeded", "step.timed_out": "timed_out"}.get(kind, "failed")
    return replace(step, state=state, duration=duration, error=error_text(data.get("error")))


def reduce(progress: TaskProgress, event: Mapping[str, Any]) -> TaskProgress:
    """Fold one task event (``{"id", "kind", "data", "at"}``) into the progress. Events already
    seen — replays after a reconnect — leave it unchanged (the same object)."""
    event_id = int(event.get("id") or 0)
    if event_id and event_id <= progress.last_event:
        return progress
    kind = str(event.get("kind", ""))
    data = event.get("data") or {}
    progress = replace(progress, last_event=max(event_id, progress.last_event))
    if kind == "started":
        return replace(progress, status="running")
    if kind in TERMINAL:
        return replace(progress, status=kind, error=error_text(data.get("error")))
    if not kind.startswith("step.") or "step" not in data:
        return progress
    steps = list(progress.steps)
    index = next((i for i, s in enumerate(steps) if s.step == data["step"]), None)
    updated = _step_update(steps[index] if index is not None else None, kind, data, event.get("at"))
    if index is None:
        steps.append(updated)
    else:
        steps[index] = updated
    return replace(progress, steps=tuple(steps))


def step_line(step: StepProgress) -> str:
    """One plain line for a step's current state."""
    head = f"{step.step} ({step.service}) attempt {step.attempt}"
    if step.state == "running":
        return f"▸ {head}: running"
    if step.state == "succeeded":
        took = f" in {step.duration:.2f}s" if step.duration is not None else ""
        return f"✓ {head}: succeeded{took}"
    if step.state == "retrying":
        when = f" in {step.retry_in:g}s" if step.retry_in is not None else ""
        after = f" (after {step.error})" if step.error else ""
        return f"↻ {head}: retrying{when}{after}"
    verb = "timed out" if step.state == "timed_out" else "failed"
    return f"✗ {head}: {verb}" + (f": {step.error}" if step.error else "")


class LiveView:
    """The rich rendering: one row per step, a spinner while it runs."""

    def __init__(self) -> None:
        self.progress = TaskProgress()
        self._spinners: dict[str, Spinner] = {}  # kept, so each keeps turning between events

    def __rich__(self) -> RenderableType:
        table = Table.grid(padding=(0, 1))
        if not self.progress.steps:
            spinner = self._spinners.setdefault("", Spinner("dots", style="cyan"))
            table.add_row(spinner, Text(f"task {self.progress.status}"))
        for step in self.progress.steps:
            text = Text(step_line(step)[2:])  # the plain line without its status symbol
            icon: RenderableType
            if step.state in ("running", "retrying"):
                icon = self._spinners.setdefault(step.step, Spinner("dots", style="cyan"))
                text.stylize("yellow" if step.state == "retrying" else "")
            elif step.state == "succeeded":
                icon = Text("✓", style="green")
            else:
                icon = Text("✗", style="red")
                text.stylize("red")
            table.add_row(icon, text)
        return table


async def follow(
    client: httpx.AsyncClient, task_id: str, show: Callable[[TaskProgress], None]
) -> TaskProgress:
    """Read a task's events up to its terminal event, calling ``show`` on each change.

    A dropped stream — network, gateway restart, a 5xx — is reopened with ``Last-Event-ID``
    so nothing is shown twice; before reopening, the task's status is checked, in case it
    ended while the stream was down. A 4xx answer raises ``httpx.HTTPStatusError``.
    """
    progress = TaskProgress()
    delay = 0.5
    while True:
        progress = await _read_stream(client, task_id, progress, show)
        if progress.finished:
            return progress
        with contextlib.suppress(httpx.HTTPError, ValueError):
            task = (await client.get(f"/v1/tasks/{task_id}")).json()
            if isinstance(task, dict) and task.get("status") in TERMINAL:
                return progress
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _read_stream(
    client: httpx.AsyncClient,
    task_id: str,
    progress: TaskProgress,
    show: Callable[[TaskProgress], None],
) -> TaskProgress:
    """One connection's worth of events; returns when the stream ends or drops."""
    headers = {"Accept": "text/event-stream"}
    if progress.last_event:
        headers["Last-Event-ID"] = str(progress.last_event)
    # The gateway sends a comment every 15 s: a minute of silence means a dead stream.
    timeout = httpx.Timeout(30.0, read=60.0)
    parser = SSEParser()
    try:
        async with client.stream(
            "GET", f"/v1/tasks/{task_id}/events", headers=headers, timeout=timeout
        ) as response:
            if response.is_client_error:
                await response.aread()
                response.raise_for_status()
            if response.is_error:
                return progress
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                try:
                    record = json.loads(event.data)
                except ValueError:
                    continue
                if (
                    isinstance(record, dict)
                    and (updated := reduce(progress, record)) is not progress
                ):
                    progress = updated
                    show(progress)
                    if progress.finished:
                        break
    except httpx.TransportError:
        pass  # the caller reconnects from the last event seen
    return progress
