"""``aiso submit``: send a task to the gateway and, with ``--wait``, watch it run.

The parts are pure where they can be — building the request, rendering problems and results
here, following the event stream in ``aiso.devenv.progress`` — so they are tested without a
gateway; the command only wires them to httpx and rich. Progress goes to stderr and
the result to stdout, so ``aiso submit … --wait > out.txt`` keeps only the result.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.live import Live

from aiso.cli.app import app, fail
from aiso.devenv.progress import (
    LiveView,
    StepProgress,
    TaskProgress,
    error_text,
    follow,
    step_line,
)

__all__ = [
    "InputError",
    "build_request",
    "file_input",
    "json_input",
    "parse_params",
    "render_problem",
    "result_lines",
    "submit",
    "write_result",
]

AUDIO = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".flac": "audio/flac",
         ".m4a": "audio/mp4"}  # fmt: skip
VIDEO = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
         ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}  # fmt: skip
TEXT = (".txt", ".md")
BINARY_FIELDS = ("audio_b64", "video_b64", "data_b64")


class InputError(ValueError):
    """The options do not describe a valid request; the message says which and why."""


# --- the request -----------------------------------------------------------------------------


def parse_params(raw: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["summarize.sentences=2"]`` → ``{"summarize": {"sentences": 2}}``. A value that parses
    as JSON is taken as JSON (numbers, booleans, lists); anything else is a string."""
    parameters: dict[str, dict[str, Any]] = {}
    for item in raw:
        target, sep, value = item.partition("=")
        step, dot, key = target.partition(".")
        if not sep or not dot or not step or not key:
            raise InputError(f"--param {item!r}: expected STEP.KEY=VALUE, e.g. stats.limit=3")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        parameters.setdefault(step, {})[key] = parsed
    return parameters


def file_input(name: str, data: bytes) -> dict[str, Any]:
    """The task input for a file, typed by its extension (or guessed MIME type)."""
    suffix = Path(name).suffix.lower()
    mime = mimetypes.guess_type(name)[0]
    if suffix in TEXT:
        try:
            return {"payload_type": "text", "payload": {"text": data.decode("utf-8")}}
        except UnicodeDecodeError:
            raise InputError(f"{name}: not UTF-8 text") from None
    encoded = base64.b64encode(data).decode("ascii")
    if suffix in AUDIO or (mime or "").startswith("audio/"):
        audio_mime = AUDIO.get(suffix) or mime
        return {"payload_type": "audio", "payload": {"audio_b64": encoded, "mime": audio_mime}}
    if suffix in VIDEO or (mime or "").startswith("video/"):
        video_mime = VIDEO.get(suffix) or mime
        return {"payload_type": "video", "payload": {"video_b64": encoded, "mime": video_mime}}
    payload = {
        "data_b64": encoded,
        "mime": mime or "application/octet-stream",
        "filename": Path(name).name,
    }
    return {"payload_type": "file", "payload": payload}


def json_input(text: str) -> dict[str, Any]:
    """``--json '{"payload_type": …, "payload": {…}}'`` checked for shape (the gateway checks
    the payload against its type)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--json is not valid JSON: {exc}") from None
    if (
        not isinstance(value, dict)
        or set(value) != {"payload_type", "payload"}
        or not isinstance(value["payload_type"], str)
        or not isinstance(value["payload"], dict)
    ):
        raise InputError('--json must be {"payload_type": "<type>", "payload": {...}}')
    return value


def build_request(
    pipeline: str,
    task_input: Mapping[str, Any],
    parameters: Mapping[str, Mapping[str, Any]],
    callback_url: str | None = None,
) -> dict[str, Any]:
    """Body of ``POST /v1/tasks``."""
    body: dict[str, Any] = {
        "pipeline": pipeline,
        "input": dict(task_input),
        "parameters": {step: dict(values) for step, values in parameters.items()},
    }
    if callback_url is not None:
        body["callback_url"] = callback_url
    return body


def render_problem(status: int, body: Any, text: str = "") -> str:
    """An RFC 9457 problem (or any error answer) as one line plus the invalid fields."""
    if not isinstance(body, dict):
        return f"the gateway answered {status}: {text.strip()[:200] or 'no details'}"
    title = str(body.get("title") or f"HTTP {status}")
    detail = body.get("detail")
    errors = body.get("errors") or []
    fields = [e for e in errors if isinstance(e, dict)]
    # A 422's detail repeats its field list; show the list alone then.
    head = title if fields or not detail else f"{title}: {detail}"
    if status == 401:
        head += " (pass --api-key or set AISO_API_KEY)"
    lines = [head] + [f"  {e.get('field', '?')}: {e.get('message', '')}" for e in fields]
    return "\n".join(lines)


# --- the result ------------------------------------------------------------------------------


def result_lines(result: Mapping[str, Any] | None) -> list[str]:
    """How a result reads on a terminal: a text and its other fields as ``key: value``, or
    pretty JSON with inline binary data shortened (``--out`` saves it)."""
    if not result:
        return ["(no result)"]
    payload = result.get("payload") or {}
    if result.get("payload_type") == "text" and isinstance(payload.get("text"), str):
        extra = [
            f"{k}: {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
            for k, v in payload.items()
            if k != "text"
        ]
        return [payload["text"], *extra]
    shown = {
        k: f"<{len(v.rstrip('=')) * 3 // 4} bytes, base64; save with --out FILE>"
        if k in BINARY_FIELDS and isinstance(v, str)
        else v
        for k, v in payload.items()
    }
    shown_result = {"payload_type": result.get("payload_type"), "payload": shown}
    return json.dumps(shown_result, indent=2, ensure_ascii=False).splitlines()


def write_result(path: Path, result: Mapping[str, Any] | None) -> str:
    """Save a result for ``--out``: a binary payload decoded, anything else as JSON."""
    payload = (result or {}).get("payload") or {}
    binary = next((payload[k] for k in BINARY_FIELDS if isinstance(payload.get(k), str)), None)
    if binary is not None:
        data = base64.b64decode(binary)
    else:
        data = (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode()
    path.write_bytes(data)
    return f"wrote {len(data)} bytes to {path}"


# --- the command -----------------------------------------------------------------------------


@app.command("submit")
def submit(
    pipeline: str = typer.Argument(..., help="Name of a Ready pipeline."),
    text: str | None = typer.Option(None, "--text", "-t", help="Text input."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="Input file; audio, video, .txt/.md text or any file."
    ),
    json_text: str | None = typer.Option(
        None, "--json", help='Input as {"payload_type": …, "payload": {…}}.'
    ),
    param: list[str] | None = typer.Option(
        None, "--param", "-p", help="STEP.KEY=VALUE (VALUE as JSON when it parses); repeatable."
    ),
    callback_url: str | None = typer.Option(None, help="Webhook called when the task ends."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Show progress and the result."),
    timeout: float = typer.Option(300, help="Seconds --wait waits before giving up (exit 2)."),
    out: Path | None = typer.Option(None, help="Write the result (binary payload or JSON) here."),
    url: str = typer.Option("http://127.0.0.1:8080", envvar="AISO_URL", help="Gateway URL."),
    api_key: str | None = typer.Option(None, envvar="AISO_API_KEY", help="Bearer API key."),
) -> None:
    """Submit a task to a pipeline; with --wait, follow it to the end."""
    sources = [s for s in (text, file, json_text) if s is not None]
    if len(sources) != 1:
        raise fail("give exactly one of --text, --file or --json", 2)
    try:
        if text is not None:
            task_input: dict[str, Any] = {"payload_type": "text", "payload": {"text": text}}
        elif file is not None:
            task_input = file_input(file.name, file.read_bytes())
        else:
            task_input = json_input(json_text or "")
        body = build_request(pipeline, task_input, parse_params(param or []), callback_url)
    except InputError as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}", 2) from None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    session = _Session(url.rstrip("/"), headers, wait, timeout, out)
    try:
        code = asyncio.run(session.run(body))
    except KeyboardInterrupt:
        if session.task_id:
            typer.echo(f"stopped watching; task {session.task_id} keeps running", err=True)
        code = 130
    raise typer.Exit(code)


@dataclass
class _Session:
    """One submission: the request, then (with ``--wait``) the progress and the result."""

    base: str
    headers: dict[str, str]
    wait: bool
    timeout: float
    out: Path | None
    task_id: str | None = None
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    async def run(self, body: dict[str, Any]) -> int:
        async with httpx.AsyncClient(
            base_url=self.base, headers=self.headers, timeout=30.0
        ) as client:
            accepted = await self._call(client, "POST", "/v1/tasks", json=body)
            self.task_id = task_id = str(accepted["task_id"])
            status_url = f"{self.base}/v1/tasks/{task_id}"
            if not self.wait:
                typer.echo(f"task {task_id} {accepted.get('status', 'pending')}")
                typer.echo(f"  status: {status_url}")
                typer.echo(f"  events: {status_url}/events")
                return 0
            self.err.print(f"task {task_id} ({body['pipeline']})", style="dim")
            try:
                async with asyncio.timeout(self.timeout):
                    await self._follow(client, task_id)
            except TimeoutError:
                raise fail(
                    f"task {task_id} did not end within {self.timeout:g}s; "
                    f"it keeps running: {status_url}",
                    2,
                ) from None
            except httpx.HTTPStatusError as exc:
                raise fail(self._problem(exc.response)) from None
            return self._finish(await self._call(client, "GET", f"/v1/tasks/{task_id}"))

    async def _call(
        self, client: httpx.AsyncClient, method: str, path: str, **kwargs: Any
    ) -> dict[str, Any]:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise fail(
                f"cannot reach the gateway at {self.base} ({type(exc).__name__}): "
                "is `aiso dev` running?"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_error or not isinstance(body, dict):
            raise fail(self._problem(response))
        return body

    @staticmethod
    def _problem(response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            body = None
        return render_problem(response.status_code, body, response.text)

    async def _follow(self, client: httpx.AsyncClient, task_id: str) -> None:
        """Live table on a terminal; elsewhere one plain line per step change."""
        if not self.err.is_terminal:
            shown: list[StepProgress] = []

            def show(progress: TaskProgress) -> None:
                for step in progress.steps:
                    if step not in shown:
                        shown.append(step)
                        self.err.print(step_line(step))

            await follow(client, task_id, show)
            return
        view = LiveView()
        with Live(view, console=self.err, refresh_per_second=12.5):

            def update(progress: TaskProgress) -> None:
                view.progress = progress

            await follow(client, task_id, update)

    def _finish(self, task: dict[str, Any]) -> int:
        status = str(task.get("status"))
        if status != "succeeded":
            error = task.get("error") or {}
            where = f" at step {error['step']!r}" if error.get("step") else ""
            reason = error_text(error) or "no error given"
            raise fail(f"task {task.get('task_id')} {status}{where}: {reason}")
        result = task.get("result")
        if self.out is not None:
            try:
                self.err.print(write_result(self.out, result))
            except OSError as exc:
                raise fail(f"cannot write {self.out}: {exc.strerror or exc}") from None
            return 0
        for line in result_lines(result):
            typer.echo(line)
        return 0
