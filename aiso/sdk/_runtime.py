"""``Runtime``: one replica of a service — queue consumer and HTTP server in one event loop.

Lifecycle::

    HTTP up (/healthz 200, /readyz 503) → startup hooks → broker connected, consumer attached
    (/readyz 200), heartbeats every ``AISO_HEARTBEAT_SECONDS`` → … → SIGTERM → heartbeat with
    ready=false, consumer cancelled (no new deliveries, /readyz 503) → in-flight messages
    finish, results confirmed, messages acked (up to the grace period) → final heartbeat →
    connection closed → HTTP down → exit 0

Scale-in therefore kills no work: Kubernetes sends SIGTERM and waits
``terminationGracePeriodSeconds``, which should exceed ``AISO_SHUTDOWN_GRACE_SECONDS``.
Whatever is still running when the grace period ends is cancelled unacknowledged, so the
broker hands it to another replica. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import aio_pika
import uvicorn
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from fastapi import FastAPI

from aiso import topology
from aiso.sdk._consumer import Consumer
from aiso.sdk._executor import Executor
from aiso.sdk._heartbeat import Heartbeat
from aiso.sdk._http import create_app
from aiso.sdk._metrics import Metrics
from aiso.sdk._service import Service
from aiso.settings import Settings, get_settings

__all__ = ["Runtime"]

log = logging.getLogger("aiso.sdk")

_RECONNECT_MAX_SECONDS = 30.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime owns SIGTERM, because uvicorn
    would stop the HTTP server at once and re-raise the signal after, killing the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Runtime:
    """Run ``service`` until ``stop()`` or SIGTERM/SIGINT.

    ``port`` 0 binds an ephemeral port (read it back from ``port``); ``concurrency`` overrides
    the service's own; ``settings`` defaults to the process settings (``AISO_*``).
    """

    def __init__(
        self,
        service: Service,
        *,
        port: int | None = None,
        concurrency: int | None = None,
        settings: Settings | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.service = service
        self.concurrency = concurrency or service.concurrency
        self.replica = f"{socket.gethostname()}-{os.getpid()}"
        self._settings = settings or get_settings()
        self._host = self._settings.service_host
        self._port = self._settings.service_port if port is None else port
        self._handle_signals = handle_signals
        self._metrics = Metrics(service.name)
        self._executor = Executor(service, self.concurrency, self._metrics)
        self._consumer = Consumer(service, self._executor, self._metrics, replica=self.replica)
        self._heartbeat = Heartbeat(
            service,
            replica=self.replica,
            interval=self._settings.heartbeat_seconds,
            status=lambda: (self.not_ready() is None, self._consumer.in_flight),
        )
        self.app: FastAPI = create_app(
            service,
            self._executor,
            self._metrics,
            concurrency=self.concurrency,
            replica=self.replica,
            not_ready=self.not_ready,
        )
        self._connection: AbstractRobustConnection | None = None
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()

    @property
    def port(self) -> int:
        """The HTTP port; the one actually bound once ``run()`` has started."""
        return self._port

    def not_ready(self) -> str | None:
        """Why this replica should get no traffic now, or None when it is ready."""
        if self._stopping.is_set():
            return "shutting down"
        if not self._executor.started:
            return "running startup hooks"
        if self._connection is None or not self._consumer.attached:
            return "connecting to the broker"
        if not self._connection.connected.is_set():
            return "broker connection lost, reconnecting"
        return None

    def stop(self) -> None:
        """Begin the graceful shutdown; a second call stops waiting for in-flight work."""
        if self._stopping.is_set():
            log.warning("%s: second stop signal: not waiting any longer", self.service.name)
            self._hurry.set()
        self._stopping.set()
        self._heartbeat.nudge()  # tell the gateways now, not at the next interval

    async def run(self) -> None:
        """Serve until stopped. Raises ``OSError`` when the port cannot be bound and whatever
        a startup hook raised."""
        sock = self._bind()
        server = _Server(
            uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off")
        )
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if self._handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        http = asyncio.create_task(server.serve(sockets=[sock]), name="aiso-http")
        try:
            if await self._unless_stopped(self._start()):
                await self._stopping.wait()
        except Exception:
            log.exception("%s: failed to start", self.service.name)
            raise
        finally:
            await self._shutdown()
            server.should_exit = True
            await http
            sock.close()
            self._executor.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
        log.info("%s: stopped", self.service.name)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run ``work`` unless a stop comes first (then cancel it); True if it completed."""
        task = asyncio.create_task(work)
        stopped = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True

    async def _start(self) -> None:
        name = self.service.name
        log.info("%s %s: starting (replica %s)", name, self.service.version, self.replica)
        await self._executor.startup()
        self._connection = await self._connect()
        channel = await self._connection.channel(publisher_confirms=True)
        await self._consumer.attach(channel, prefetch=self.concurrency)
        await self._heartbeat.start(self._connection)
        log.info(
            "%s: ready: consuming %s with concurrency %d, http on %s:%d",
            name,
            topology.service_queue(name),
            self.concurrency,
            self._host,
            self._port,
        )

    async def _connect(self) -> AbstractRobustConnection:
        """Connect, retrying: a replica may start before the broker. Once connected,
        ``connect_robust`` reconnects and restores the consumer by itself."""
        delay = 1.0
        while True:
            try:
                return await aio_pika.connect_robust(
                    self._settings.amqp_url,
                    # Named, so the broker's connection list shows which replica is which.
                    client_properties={"connection_name": f"{self.service.name} {self.replica}"},
                )
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("broker unreachable (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_SECONDS)

    async def _shutdown(self) -> None:
        name = self.service.name
        if self._consumer.attached:
            log.info("%s: stopping: no new messages", name)
            await self._consumer.detach()
        if self._consumer.in_flight:
            log.info("%s: draining %d in-flight", name, self._consumer.in_flight)
            drained = asyncio.create_task(self._consumer.drain())
            hurry = asyncio.create_task(self._hurry.wait())
            await asyncio.wait(
                {drained, hurry},
                timeout=self._settings.shutdown_grace_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            drained.cancel()
            hurry.cancel()
        if self._consumer.in_flight:
            log.warning(
                "%s: abandoning %d in-flight; the broker will redeliver them",
                name,
                self._consumer.in_flight,
            )
            await self._consumer.abandon()
        await self._heartbeat.stop()
        if self._connection is not None:
            log.info("%s: closing the broker connection", name)
            await self._connection.close()
