"""``aiso dev``: the whole platform on one machine, from the same manifests a cluster uses.

The steps run in an order that fails early and cheaply, each with one line that says what to
do: manifests (exit 2 when malformed) → broker (started when installed, else how to get one)
→ topology → store migration (once here, so the children never race to migrate) → gateway,
orchestrator and one process per AIService under a ``Supervisor`` that restarts them → wait
for the gateway → summary → stream warnings and errors until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.text import Text

from aiso.cli.app import app, fail
from aiso.devenv import broker, store
from aiso.devenv.output import LineFilter, tail
from aiso.devenv.secrets import SECRET_FILE, webhook_secret
from aiso.devenv.settings import load_settings, store_url_option
from aiso.devenv.summary import ProcessRow, example_commands, pipeline_lines, summary
from aiso.errors import ManifestError
from aiso.resources import AIService, Catalog, load_manifests
from aiso.supervisor import ProcessSpec, Supervisor, aiso_command

__all__ = ["dev"]

LOG_DIR = Path(".aiso/logs")
READY_TIMEOUT = 60.0
_T = TypeVar("_T")
_STYLES = ("cyan", "magenta", "blue", "green", "yellow", "bright_cyan", "bright_magenta")


@dataclass(frozen=True)
class _Config:
    host: str
    port: int
    manifests: Path
    database_url: str
    amqp_url: str
    api_key_needed: bool
    verbose: bool
    webhook_secret: str | None
    """Set when ``aiso dev`` supplies the secret (``AISO_WEBHOOK_SECRET`` was not set)."""

    @property
    def gateway(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://[{shown}]:{self.port}" if ":" in shown else f"http://{shown}:{self.port}"


@app.command("dev")
def dev(
    port: int = typer.Option(8080, help="Port of the gateway."),
    host: str = typer.Option("127.0.0.1", help="Interface of the gateway (0.0.0.0: all)."),
    manifests: Path | None = typer.Option(
        None,
        help="AIService/Pipeline YAML directory or file (default: AISO_MANIFESTS or manifests/).",
    ),
    database_url: str | None = typer.Option(
        None, help="Task store URL (default: AISO_DATABASE_URL or SQLite in .aiso/)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Stream every line the processes print, not only problems."
    ),
) -> None:
    """Run RabbitMQ (if needed), the gateway, the orchestrator and every service locally."""
    settings = load_settings()
    config = _Config(
        host=host,
        port=port,
        manifests=manifests or settings.manifests,
        database_url=store_url_option(database_url, settings),
        amqp_url=settings.amqp_url,
        api_key_needed=bool(settings.api_keys),
        verbose=verbose,
        webhook_secret=None if settings.webhook_secret is not None else webhook_secret(),
    )
    console = Console(highlight=False, soft_wrap=True)
    try:
        asyncio.run(_run(config, console))
    except KeyboardInterrupt:  # Ctrl-C before the children were started
        console.print("stopped")


async def _run(config: _Config, console: Console) -> None:
    catalog = _load(config.manifests, console)
    problem = _unbindable(config.host, config.port)
    if problem is not None:
        raise fail(problem)
    await _ensure_broker(config.amqp_url, console)
    try:
        await broker.declare_topology(config.amqp_url, catalog.services)
    except Exception as exc:  # any AMQP failure here means the broker cannot be used
        raise fail(f"declaring queues on {broker.redact(config.amqp_url)} failed: {exc}") from None
    try:
        await store.migrate(config.database_url)
    except store.StoreError as exc:
        raise fail(str(exc)) from None

    specs, ports = _processes(config, catalog)
    _rotate_logs(LOG_DIR)
    names = [spec.name for spec in specs]
    supervisor = Supervisor(
        specs,
        log_dir=LOG_DIR,
        on_output=_Printer(console, LineFilter(log_dir=LOG_DIR, verbose=config.verbose), names),
    )
    supervisor_log = logging.getLogger("aiso.supervisor")
    supervisor_log.addHandler(_RestartNotices(console))
    supervisor_log.propagate = False
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await supervisor.start()
        await _serve(config, catalog, supervisor, ports, stop, console)
    finally:
        console.print("stopping…")
        await supervisor.stop()
    console.print("stopped")


async def _serve(
    config: _Config,
    catalog: Catalog,
    supervisor: Supervisor,
    ports: dict[str, int],
    stop: asyncio.Event,
    console: Console,
) -> None:
    """Wait for the gateway, print the summary, then run until ``stop`` is set."""
    with console.status(f"starting {len(supervisor.names())} processes…"):
        ready = await _until(stop, _wait_ready(config.gateway, ports))
    if ready is None:
        return
    if not ready["wrapper"]:
        console.print(Text("\n".join(tail(LOG_DIR / "wrapper.log")), style="dim"))
        raise fail(
            f"the gateway did not answer {config.gateway}/readyz within {READY_TIMEOUT:g}s; "
            f"its log is above and in {LOG_DIR / 'wrapper.log'}"
        )
    rows = [_row(supervisor, name, ports.get(name), ready) for name in supervisor.names()]
    examples = example_commands(catalog, config.gateway, config.api_key_needed)
    for line in summary(
        gateway=config.gateway,
        broker=broker.redact(config.amqp_url),
        store=store.redact(config.database_url),
        log_dir=LOG_DIR,
        processes=rows,
        examples=examples,
        extra={"manifests": str(config.manifests), **_secret_line(config)},
    ):
        console.print(line)
    await stop.wait()


def _secret_line(config: _Config) -> dict[str, str]:
    """Where the webhook secret comes from; never the secret itself."""
    if config.webhook_secret is None:
        return {"webhooks": "signed with AISO_WEBHOOK_SECRET"}
    return {"webhooks": f"signed with the secret in {SECRET_FILE}"}


def _load(path: Path, console: Console) -> Catalog:
    try:
        catalog = load_manifests(path)
    except ManifestError as exc:
        raise fail(str(exc), 2) from None
    console.print(
        f"manifests {path}: {len(catalog.services)} services, {len(catalog.pipelines)} pipelines"
    )
    for line in pipeline_lines(catalog):
        console.print(line)
    return catalog


def _unbindable(host: str, port: int) -> str | None:
    """Why the gateway could not listen on ``host:port``, found before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another `aiso dev`?); choose --port"
            return f"the gateway cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _ensure_broker(url: str, console: Console) -> None:
    try:
        await broker.check(url)
        return
    except broker.BrokerDown as exc:
        if not broker.is_local(url):
            raise fail(str(exc)) from None
    except broker.BrokerError as exc:
        raise fail(str(exc)) from None
    server = broker.find_rabbitmq_server()
    if server is None:
        raise fail(broker.install_hint(url))
    reason = await asyncio.to_thread(broker.misdirected, url)
    if reason is not None:
        raise fail(reason)
    if not console.is_terminal:
        console.print("starting RabbitMQ…")
    with console.status("starting RabbitMQ…"):
        try:
            await broker.start_rabbitmq(server, url, up_within=READY_TIMEOUT)
        except broker.BrokerError as exc:
            raise fail(str(exc)) from None
    console.print("started RabbitMQ; it keeps running after `aiso dev` ends (`rabbitmqctl stop`)")


def _processes(config: _Config, catalog: Catalog) -> tuple[list[ProcessSpec], dict[str, int]]:
    """The children and the HTTP port of each that has one."""
    env = {
        "AISO_AMQP_URL": config.amqp_url,
        "AISO_DATABASE_URL": config.database_url,
        "AISO_MANIFESTS": str(config.manifests.resolve()),
        "AISO_REGISTRY": "files",
        "AISO_SERVICE_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",  # lines reach the console as they are written
    }
    if config.webhook_secret is not None:
        env["AISO_WEBHOOK_SECRET"] = config.webhook_secret
    wrapper = aiso_command(
        "wrapper",
        "--host", config.host,
        "--port", str(config.port),
        "--manifests", str(config.manifests),
    )  # fmt: skip
    specs = [
        ProcessSpec("wrapper", wrapper, env),
        ProcessSpec("orchestrator", aiso_command("orchestrator"), env),
    ]
    ports = {"wrapper": config.port}
    for name, service in sorted(catalog.services.items()):
        port = ports[f"svc-{name}"] = _free_port()
        argv = aiso_command(
            "service", "run", service.spec.handler,
            "--port", str(port),
            "--concurrency", str(service.spec.concurrency),
        )  # fmt: skip
        specs.append(ProcessSpec(f"svc-{name}", argv, {**env, **_literal_env(service)}))
    return specs, ports


def _literal_env(service: AIService) -> dict[str, str]:
    """The AIService's ``env`` entries that carry a plain ``value``, as a cluster would set
    them; ``valueFrom`` (Secrets, ConfigMaps) has no local meaning and is left out."""
    return {
        str(item["name"]): str(item["value"])
        for item in service.spec.env
        if "name" in item and "value" in item
    }


def _rotate_logs(log_dir: Path) -> None:
    """Keep the previous run's logs as ``*.log.1``, so each file holds one run."""
    for log in log_dir.glob("*.log"):
        log.replace(log.with_name(log.name + ".1"))


class _Printer:
    """Prints the lines worth showing, prefixed by their process's name in its own colour."""

    def __init__(self, console: Console, keep: LineFilter, names: list[str]) -> None:
        self.console = console
        self.keep = keep
        self.width = max(map(len, names), default=0)
        self.styles = {name: _STYLES[i % len(_STYLES)] for i, name in enumerate(names)}

    def __call__(self, name: str, line: str) -> None:
        shown = self.keep(name, line)
        if shown is not None:
            prefix = (f"{name:<{self.width}} │ ", self.styles.get(name, ""))
            self.console.print(Text.assemble(prefix, shown))


class _RestartNotices(logging.Handler):
    """Shows the Supervisor's restart warnings, which start with the process name."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(Text(record.getMessage(), style="yellow"))


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, _T]) -> _T | None:
    """``work``'s result, or None when ``stop`` is set first (``work`` is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _wait_ready(gateway: str, ports: dict[str, int]) -> dict[str, bool]:
    """Poll each HTTP process's ``/readyz`` until all answer 200 or the time is up."""
    urls = {name: f"http://127.0.0.1:{port}/readyz" for name, port in ports.items()}
    urls["wrapper"] = f"{gateway}/readyz"
    ready = dict.fromkeys(urls, False)
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient(timeout=2.0) as client:
        while not all(ready.values()) and time.monotonic() < deadline:
            for name, url in urls.items():
                if not ready[name]:
                    with contextlib.suppress(httpx.HTTPError):
                        ready[name] = (await client.get(url)).status_code == 200
            await asyncio.sleep(0.3)
    return ready


def _row(supervisor: Supervisor, name: str, port: int | None, ready: dict[str, bool]) -> ProcessRow:
    try:
        pid: int | None = supervisor.pid(name)
    except LookupError:
        pid = None
    if name not in ready:
        state = "running" if pid is not None else "restarting"
    else:
        state = "ready" if ready[name] else "starting"
    return ProcessRow(name, pid, port, state)
