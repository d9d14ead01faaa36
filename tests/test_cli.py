"""``aiso dev``, ``aiso submit`` and the admin commands.

The pure parts (request building, SSE parsing, progress, rendering) are tested directly; the
commands run as real subprocesses, the way a user runs them, and must fail with one line and
no traceback.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiso.cli.submit import (
    InputError,
    build_request,
    file_input,
    json_input,
    parse_params,
    render_problem,
    result_lines,
    write_result,
)
from aiso.devenv.broker import (
    BrokerError,
    find_rabbitmq_server,
    install_hint,
    redact,
    start_rabbitmq,
)
from aiso.devenv.output import LineFilter
from aiso.devenv.progress import SSEParser, TaskProgress, follow, reduce, step_line
from aiso.devenv.secrets import webhook_secret
from aiso.devenv.summary import example_commands
from aiso.resources import load_manifests
from aiso.settings import store_url
from aiso.supervisor import aiso_command
from aiso.webhooks import verify

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
EXAMPLE = "  Hello   World. Second sentence!  "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_aiso(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        aiso_command(*args),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the request -----------------------------------------------------------------------------


def test_params_parse_json_values_and_fall_back_to_strings() -> None:
    params = parse_params(
        ["summarize.sentences=2", "summarize.style=short", 'tts.voice="x"', "stats.flags=[1]"]
    )
    assert params == {
        "summarize": {"sentences": 2, "style": "short"},
        "tts": {"voice": "x"},
        "stats": {"flags": [1]},
    }
    assert parse_params(["a.b=c=d"]) == {"a": {"b": "c=d"}}
    assert parse_params(["a.b="]) == {"a": {"b": ""}}


@pytest.mark.parametrize("raw", ["sentences=2", "summarize.sentences", ".x=1", "s.=1"])
def test_params_without_step_key_or_value_are_refused(raw: str) -> None:
    with pytest.raises(InputError, match=r"STEP\.KEY=VALUE"):
        parse_params([raw])


def test_file_input_is_typed_by_extension() -> None:
    data = b"\x00\x01binary"
    encoded = base64.b64encode(data).decode()
    assert file_input("talk.WAV", data) == {
        "payload_type": "audio",
        "payload": {"audio_b64": encoded, "mime": "audio/wav"},
    }
    assert file_input("a.m4a", data)["payload"]["mime"] == "audio/mp4"
    assert file_input("clip.mp4", data) == {
        "payload_type": "video",
        "payload": {"video_b64": encoded, "mime": "video/mp4"},
    }
    assert file_input("notes.md", "héllo".encode()) == {
        "payload_type": "text",
        "payload": {"text": "héllo"},
    }
    assert file_input("dir/report.pdf", data) == {
        "payload_type": "file",
        "payload": {"data_b64": encoded, "mime": "application/pdf", "filename": "report.pdf"},
    }
    assert file_input("blob", data)["payload"]["mime"] == "application/octet-stream"
    with pytest.raises(InputError, match="not UTF-8"):
        file_input("latin.txt", b"\xff\xfe")


def test_json_input_must_be_a_typed_payload() -> None:
    good = {"payload_type": "url", "payload": {"url": "https://example.com/a.wav"}}
    assert json_input(json.dumps(good)) == good
    with pytest.raises(InputError, match="not valid JSON"):
        json_input("{nope")
    bad: object
    for bad in ({"payload": {}}, {"payload_type": "text", "payload": "x"}, [1]):
        with pytest.raises(InputError, match="payload_type"):
            json_input(json.dumps(bad))


def test_request_body() -> None:
    text = {"payload_type": "text", "payload": {"text": "hi"}}
    assert build_request("text-stats", text, {}) == {
        "pipeline": "text-stats",
        "input": text,
        "parameters": {},
    }
    body = build_request("p", text, {"s": {"k": 1}}, "https://hooks.example/done")
    assert body["parameters"] == {"s": {"k": 1}}
    assert body["callback_url"] == "https://hooks.example/done"


def test_problems_render_as_one_line_and_the_field_list() -> None:
    invalid = {
        "type": "https://aiso.dev/problems/invalid-request",
        "title": "Invalid request",
        "status": 422,
        "detail": "input.payload.text: Field required",
        "errors": [{"field": "input.payload.text", "message": "Field required"}],
    }
    assert render_problem(422, invalid) == "Invalid request\n  input.payload.text: Field required"
    missing = {"title": "Pipeline not found", "status": 404, "detail": "no pipeline named 'x'"}
    assert render_problem(404, missing) == "Pipeline not found: no pipeline named 'x'"
    assert "--api-key" in render_problem(401, {"title": "Unauthorized", "status": 401})
    assert render_problem(502, None, "<html>Bad gateway</html>") == (
        "the gateway answered 502: <html>Bad gateway</html>"
    )


# --- following a task ------------------------------------------------------------------------


def frames(*events: dict[str, Any]) -> list[str]:
    lines = [": keep-alive", ""]
    for event in events:
        lines += [f"id: {event['id']}", f"event: {event['kind']}", f"data: {json.dumps(event)}", ""]
    return lines


def event(id: int, kind: str, at: str = "2025-01-01T00:00:00+00:00", **data: Any) -> dict[str, Any]:
    return {"id": id, "task_id": "t", "kind": kind, "data": data, "at": at}


def test_sse_parser_follows_the_event_stream_rules() -> None:
    parser = SSEParser()
    lines = [
        ": comment",
        "id: 7",
        "event: step.dispatched",
        'data: {"a":',
        "data:1}",
        "",
        "",  # a blank line with nothing pending dispatches nothing
        "event: lonely",
        "",  # no data: no event
        "data: x",
        "",
    ]
    got = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.id, e.event, e.data) for e in got] == [
        ("7", "step.dispatched", '{"a":\n1}'),
        ("7", "message", "x"),  # the id persists; the event type does not
    ]


def test_progress_of_a_step_that_fails_retries_and_succeeds() -> None:
    steps: dict[str, Any] = {"step": "stats", "service": "stats"}
    progress = TaskProgress()
    for record in [
        event(1, "created", status="pending"),
        event(2, "started", status="running"),
        event(3, "step.dispatched", "2025-01-01T00:00:00+00:00", attempt=1, **steps),
        event(
            4,
            "step.failed",
            "2025-01-01T00:00:01+00:00",
            attempt=1,
            **steps,
            error={"code": "Flaky", "message": "try again", "retryable": True},
        ),
    ]:
        progress = reduce(progress, record)
    (step,) = progress.steps
    assert (step.state, step.attempt, step.duration, step.error) == (
        "failed",
        1,
        1.0,
        "Flaky: try again",
    )
    assert step_line(step) == "✗ stats (stats) attempt 1: failed: Flaky: try again"
    progress = reduce(progress, event(5, "step.retrying", attempt=2, delay_seconds=5, **steps))
    assert step_line(progress.steps[0]) == (
        "↻ stats (stats) attempt 2: retrying in 5s (after Flaky: try again)"
    )
    progress = reduce(
        progress, event(6, "step.dispatched", "2025-01-01T00:00:06+00:00", attempt=2, **steps)
    )
    assert step_line(progress.steps[0]) == "▸ stats (stats) attempt 2: running"
    progress = reduce(
        progress, event(7, "step.succeeded", "2025-01-01T00:00:06.250000+00:00", attempt=2, **steps)
    )
    assert step_line(progress.steps[0]) == "✓ stats (stats) attempt 2: succeeded in 0.25s"
    assert progress.status == "running" and not progress.finished
    done = reduce(progress, event(8, "succeeded", status="succeeded"))
    assert done.finished and done.status == "succeeded" and done.last_event == 8
    assert reduce(done, event(5, "step.retrying", attempt=9, **steps)) is done  # a replay


def test_progress_keeps_steps_in_order_and_records_the_task_error() -> None:
    progress = TaskProgress()
    for i, name in enumerate(["normalize", "stats"], start=1):
        progress = reduce(progress, event(i, "step.dispatched", step=name, service=name))
    progress = reduce(
        progress,
        event(
            3,
            "step.timed_out",
            step="stats",
            service="stats",
            error={"code": "StepTimeout", "message": "no result"},
        ),
    )
    assert [s.step for s in progress.steps] == ["normalize", "stats"]
    assert step_line(progress.steps[1]).endswith("timed out: StepTimeout: no result")
    failed = reduce(progress, event(4, "failed", error={"code": "StepTimeout", "message": "x"}))
    assert (failed.status, failed.error) == ("failed", "StepTimeout: x")
    assert reduce(failed, event(5, "something.new")).steps == failed.steps


async def test_follow_reconnects_with_last_event_id() -> None:
    steps: dict[str, Any] = {"step": "s", "service": "svc", "attempt": 1}
    first = frames(event(1, "started"), event(2, "step.dispatched", **steps))
    second = frames(
        event(2, "step.dispatched", **steps),
        event(3, "step.succeeded", **steps),
        event(4, "succeeded"),
    )
    seen: list[str | None] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            seen.append(request.headers.get("Last-Event-ID"))
            body = first if len(seen) == 1 else second
            return httpx.Response(200, text="\n".join(body) + "\n")
        return httpx.Response(200, json={"task_id": "t", "status": "running"})

    shown: list[TaskProgress] = []
    transport = httpx.MockTransport(gateway)
    async with httpx.AsyncClient(base_url="http://gw", transport=transport) as client:
        final = await follow(client, "t", shown.append)
    assert seen == [None, "2"]
    assert final.status == "succeeded" and final.steps[0].state == "succeeded"
    assert len(shown) == 4  # the replayed event 2 changed nothing


async def test_follow_raises_on_a_client_error() -> None:
    def gateway(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"title": "Task not found", "status": 404})

    async with httpx.AsyncClient(
        base_url="http://gw", transport=httpx.MockTransport(gateway)
    ) as client:
        with pytest.raises(httpx.HTTPStatusError):
            await follow(client, "t", lambda _: None)


# --- the result ------------------------------------------------------------------------------


def test_text_results_print_the_text_and_its_fields() -> None:
    result = {"payload_type": "text", "payload": {"text": "Hi.", "words": 1, "tags": ["a"]}}
    assert result_lines(result) == ["Hi.", "words: 1", 'tags: ["a"]']
    assert result_lines(None) == ["(no result)"]


def test_binary_results_are_shortened_on_screen_and_saved_whole(tmp_path: Path) -> None:
    audio = base64.b64encode(b"RIFF" + bytes(96)).decode()
    result = {"payload_type": "audio", "payload": {"audio_b64": audio, "mime": "audio/wav"}}
    shown = json.loads("\n".join(result_lines(result)))
    assert shown["payload"]["audio_b64"].startswith("<100 bytes")
    assert (
        write_result(tmp_path / "out.wav", result) == f"wrote 100 bytes to {tmp_path / 'out.wav'}"
    )
    assert (tmp_path / "out.wav").read_bytes() == b"RIFF" + bytes(96)
    url_result = {"payload_type": "url", "payload": {"url": "https://x"}}
    write_result(tmp_path / "out.json", url_result)
    assert json.loads((tmp_path / "out.json").read_text()) == url_result


# --- aiso dev helpers ------------------------------------------------------------------------


def test_console_shows_problems_and_condenses_tracebacks() -> None:
    keep = LineFilter(log_dir=Path(".aiso/logs"))
    hint = "  (traceback in .aiso/logs/svc-stats.log)"
    lines = [
        ("wrapper", "2025-01-01 10:00:00,000 wrapper INFO aiso.wrapper: listening", None),
        ("wrapper", "  continuation of an info line", None),
        ("wrapper", "2025-01-01 10:00:01,000 wrapper ERROR aiso.wrapper: boom", "same"),
        ("wrapper", "  continuation of the error", "same"),
        ("wrapper", "WARNING:  uvicorn says so", "same"),
        ("wrapper", "INFO:     Started server process", None),
        ("svc-stats", "Traceback (most recent call last):", None),
        ("wrapper", "  wrapper's own continuation", None),  # each process has its own state
        ("svc-stats", '  File "x.py", line 1, in <module>', None),
        ("svc-stats", "    raise KeyError(1)", None),
        ("svc-stats", "KeyError: 1", "KeyError: 1" + hint),
        ("svc-stats", "", None),
        ("svc-stats", "During handling of the above exception, another exception occurred:", None),
        ("svc-stats", "Traceback (most recent call last):", None),
        ("svc-stats", '  File "y.py", line 2, in <module>', None),
        ("svc-stats", "pydantic.ValidationError: 1 validation error", "same+hint"),
        ("svc-stats", "text", "same"),
        ("svc-stats", "2025-01-01 10:00:02,000 svc-stats INFO aiso: back", None),
    ]
    for name, line, want in lines:
        expected = {"same": line, "same+hint": line + hint}.get(str(want), want)
        assert keep(name, line) == expected, line
    assert LineFilter(log_dir=Path("l"), verbose=True)("x", "INFO anything") == "INFO anything"


def test_rabbitmq_server_is_found_on_path_or_in_the_sibling_sbin(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    assert find_rabbitmq_server(str(tmp_path / "bin")) is None
    server = tmp_path / "sbin" / "rabbitmq-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(server.stat().st_mode | stat.S_IEXEC)
    assert find_rabbitmq_server(str(tmp_path / "bin")) == str(server)
    assert find_rabbitmq_server(str(tmp_path / "sbin")) == str(server)


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user the server runs under sudo")
async def test_a_broker_that_fails_to_start_is_reported(tmp_path: Path) -> None:
    server = tmp_path / "rabbitmq-server"
    server.write_text("#!/bin/sh\necho starting\necho 'ERROR: epmd error for host x' >&2\nexit 3\n")
    server.chmod(0o755)
    with pytest.raises(BrokerError, match="starting RabbitMQ failed: ERROR: epmd error for host x"):
        await start_rabbitmq(str(server), f"amqp://guest:guest@127.0.0.1:{free_port()}/")


def test_the_local_webhook_secret_is_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / ".aiso" / "webhook-secret"
    secret = webhook_secret(path)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert webhook_secret(path) == secret  # a restart signs with the same key


def test_broker_urls_are_shown_without_passwords() -> None:
    assert redact("amqp://user:secret@host:5672/v") == "amqp://user:***@host:5672/v"
    assert redact("amqp://host/") == "amqp://host/"
    assert "secret" not in install_hint("amqp://u:secret@127.0.0.1:5672/")


def test_example_commands_use_a_ready_text_pipeline() -> None:
    catalog = load_manifests(MANIFESTS)
    submit, curl = example_commands(catalog, "http://127.0.0.1:8080", api_key_needed=False)
    assert submit == f"aiso submit text-stats --text '{EXAMPLE}' --wait"
    assert curl.startswith("curl -s 'http://127.0.0.1:8080/v1/tasks?wait=30'")
    other, _ = example_commands(catalog, "http://127.0.0.1:9000", api_key_needed=True)
    assert other.endswith("--url http://127.0.0.1:9000")


# --- the commands as a user runs them --------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: ")


def test_dev_says_how_to_get_rabbitmq_when_none_is_installed(tmp_path: Path) -> None:
    closed = free_port()
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_aiso(
        "dev",
        "--port",
        str(free_port()),
        "--manifests",
        str(MANIFESTS),
        env={"PATH": str(empty), "AISO_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{closed}/"},
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result)
    assert "sudo apt-get install -y rabbitmq-server" in result.stderr
    assert "brew install rabbitmq" in result.stderr
    assert "AISO_AMQP_URL" in result.stderr
    assert not (tmp_path / ".aiso" / "logs").exists()  # nothing was started


@pytest.mark.skipif(find_rabbitmq_server() is None, reason="needs an installed RabbitMQ")
def test_dev_does_not_start_a_second_broker_beside_a_running_one(
    amqp_url: str, tmp_path: Path
) -> None:
    wrong_port = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    result = run_aiso(
        "dev",
        "--port",
        str(free_port()),
        "--manifests",
        str(MANIFESTS),
        env={"AISO_AMQP_URL": wrong_port},
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert_one_line_error(result)
    assert "but a broker does at 127.0.0.1:5672; fix the port in AISO_AMQP_URL" in result.stderr


def test_dev_exits_2_on_a_broken_manifest(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: aiso.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p}\nspec: {input: text}\n"
    )
    result = run_aiso("dev", "--manifests", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result)
    assert "Pipeline 'p': spec.steps: Field required" in result.stderr


def test_submit_without_a_gateway_says_so(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_aiso("submit", "text-stats", "--text", "hi", "--url", url, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result)
    assert f"cannot reach the gateway at {url}" in result.stderr
    assert "is `aiso dev` running?" in result.stderr


def test_submit_refuses_bad_options(tmp_path: Path) -> None:
    both = run_aiso("submit", "p", "--text", "a", "--json", "{}", cwd=tmp_path)
    assert both.returncode == 2 and "exactly one of --text, --file or --json" in both.stderr
    missing = run_aiso("submit", "p", "--file", str(tmp_path / "nope.wav"), cwd=tmp_path)
    assert missing.returncode == 2
    assert_one_line_error(missing)


def test_db_upgrade_migrates_the_store(sqlite_url: str, tmp_path: Path) -> None:
    result = run_aiso("db", "upgrade", "--database-url", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "has the newest schema" in result.stdout
    broken = run_aiso("db", "upgrade", "--database-url", "nonsense://", cwd=tmp_path)
    assert broken.returncode == 2
    assert_one_line_error(broken)
    assert "--database-url: 'nonsense' is not supported; the task store is SQLite" in broken.stderr


def test_a_store_url_gets_its_async_driver_and_other_databases_are_refused() -> None:
    assert store_url("sqlite:///.aiso/aiso.db") == "sqlite+aiosqlite:///.aiso/aiso.db"
    assert store_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert (
        store_url("postgresql://u:p%40ss@db:5432/aiso?ssl=require")
        == "postgresql+asyncpg://u:p%40ss@db:5432/aiso?ssl=require"
    )
    assert store_url("postgres://u@db/aiso") == "postgresql+asyncpg://u@db/aiso"
    refused = {
        "mysql://u@db/aiso": "'mysql' is not supported",
        "postgresql+psycopg://u@db/aiso": "the postgresql driver must be asyncpg, not psycopg",
        "not a url": "not a database URL",
    }
    for url, reason in refused.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            store_url(url)


def test_processes_refuse_bad_settings_in_one_line(tmp_path: Path) -> None:
    number = run_aiso("orchestrator", env={"AISO_ORCHESTRATOR_PREFETCH": "many"}, cwd=tmp_path)
    assert number.returncode == 2
    assert_one_line_error(number)
    assert "AISO_ORCHESTRATOR_PREFETCH: Input should be a valid integer" in number.stderr
    database = run_aiso("wrapper", env={"AISO_DATABASE_URL": "mysql://u@db/aiso"}, cwd=tmp_path)
    assert database.returncode == 2
    assert_one_line_error(database)
    assert "AISO_DATABASE_URL: 'mysql' is not supported" in database.stderr
    option = run_aiso(
        "orchestrator", "--database-url", "postgresql+psycopg://u@db/aiso", cwd=tmp_path
    )
    assert option.returncode == 2
    assert_one_line_error(option)
    assert "--database-url: the postgresql driver must be asyncpg" in option.stderr
    service = run_aiso(
        "service",
        "run",
        "aiso.services.normalize:service",
        env={"AISO_HEARTBEAT_SECONDS": "often"},
        cwd=tmp_path,
    )
    assert service.returncode == 2
    assert_one_line_error(service)
    assert "AISO_HEARTBEAT_SECONDS: Input should be a valid number" in service.stderr
    operator = run_aiso(
        "operator", "-n", "default", env={"AISO_OPERATOR_STATUS_INTERVAL_SECONDS": "x"}
    )
    assert operator.returncode == 2
    assert_one_line_error(operator)
    assert "AISO_OPERATOR_STATUS_INTERVAL_SECONDS: Input should be a valid number" in (
        operator.stderr
    )


def test_topology_declare_declares_the_services_queues(amqp_url: str, tmp_path: Path) -> None:
    result = run_aiso("topology", "declare", "--manifests", str(MANIFESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "declared service stats: queue aiso.svc.stats" in result.stdout
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", amqp_url.rsplit("/", 1)[1], "name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert {"aiso.svc.stats", "aiso.svc.normalize", "aiso.orchestrator.tasks"} <= set(
        listed.stdout.split()
    )


# --- end to end: aiso dev + aiso submit ------------------------------------------------------


class Running:
    """A subprocess whose output lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self._queue.empty():
                    break
                continue
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not printed; output:\n" + "\n".join(self.lines))

    def rest(self) -> str:
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "\n".join(self.lines)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], bytes]]]]:
    """A callback URL on loopback and the (headers, body) of each POST it receives."""
    received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dev(amqp_url: str, sqlite_url: str, tmp_path: Path) -> Iterator[tuple[Running, str]]:
    port = free_port()
    env = {
        **os.environ,
        "AISO_AMQP_URL": amqp_url,
        "AISO_DATABASE_URL": sqlite_url,
        "AISO_ALLOW_PRIVATE_URLS": "true",  # the test's webhook receiver is on loopback
    }
    env.pop("AISO_WEBHOOK_SECRET", None)
    running = Running(
        aiso_command("dev", "--port", str(port), "--manifests", str(MANIFESTS)), env, tmp_path
    )
    yield running, f"http://127.0.0.1:{port}"
    if running.process.poll() is None:  # the test failed early: stop the children too
        running.process.terminate()
        try:
            running.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


def test_dev_runs_the_manifests_and_submit_waits_for_the_result(
    dev: tuple[Running, str], tmp_path: Path
) -> None:
    running, url = dev
    running.wait_for("Ctrl-C stops them all", timeout=120)
    output = running.rest()
    assert "✓ text-stats" in output
    assert f"gateway    {url}" in output
    rows = re.findall(r"^  (wrapper|orchestrator|svc-\S+) +(\d+) ", output, re.MULTILINE)
    pids = [int(pid) for _, pid in rows]
    services = load_manifests(MANIFESTS).services
    assert len(pids) == 2 + len(services), output  # wrapper, orchestrator, one per AIService

    assert "webhooks   signed with the secret in .aiso/webhook-secret" in output
    secret_file = tmp_path / ".aiso" / "webhook-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    with webhook_receiver() as (callback, received):
        result = run_aiso(
            "submit", "text-stats", "--text", EXAMPLE, "--wait", "--url", url,
            "--callback-url", callback, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "words: 4" in result.stdout and "sentences: 2" in result.stdout
        assert "✓ stats (stats) attempt 1: succeeded" in result.stderr
        headers, body = received.get(timeout=30)
    event = verify(secret_file.read_text().strip(), headers, body)
    assert event["type"] == "task.succeeded"

    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=60) == 0
    running.wait_for("stopped", timeout=5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert (tmp_path / ".aiso" / "logs" / "wrapper.log").exists()
