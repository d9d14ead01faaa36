"""``create_app``: the gateway's FastAPI application and the lifespan that wires it up.

At start: open (and migrate) the store, connect to RabbitMQ (a robust connection that
reconnects by itself), declare the core topology, start the outbox relay's loop, and consume
task events into the in-process hub and service heartbeats into the replica book. At shutdown
the same in reverse, after one last flush of the relay, so published rows are not published
again by a sweep. The API keys are loaded before any of that: a malformed one stops the
gateway at once instead of locking every client out later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI

import aiso
from aiso import topology
from aiso.orchestrator.engine import Engine
from aiso.registry import Registry, registry_from_settings
from aiso.settings import Settings, get_settings
from aiso.store import OutboxRelay, open_store

from . import routes_catalog, routes_dead, routes_health, routes_tasks
from .auth import BearerAuth, KeyRing
from .events import EventHub
from .gateway import Gateway, QueueInspector
from .heartbeats import ReplicaBook
from .limits import BodySizeLimit
from .metrics import Metrics, MetricsMiddleware
from .problems import install_problem_handlers

__all__ = ["EVENT_BINDINGS", "create_app"]

log = logging.getLogger("aiso.wrapper")

EVENT_BINDINGS = ["task.#", topology.heartbeat_routing_key("*")]
"""Every task's events (any gateway replica may be serving any task's stream) and every
service replica's heartbeats."""

DESCRIPTION = """\
Submit work to aiso pipelines and follow it.

`POST /v1/tasks` answers 202 with a task id at once (or waits with `?wait=`);
`GET /v1/tasks/{id}` shows status, every step attempt and the result;
`GET /v1/tasks/{id}/events` streams progress as Server-Sent Events.
Errors are RFC 9457 problem details (`application/problem+json`).
When the gateway has API keys, every `/v1` route needs `Authorization: Bearer <key>`;
the dead-letter routes need an operator key.
"""


def _route_events(
    hub: EventHub, heartbeats: ReplicaBook
) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """One consumer for the gateway's events queue: task events to the hub, the rest (only
    heartbeats are bound) to the replica book."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        if (message.routing_key or "").startswith("task."):
            await hub.on_message(message)
        else:
            await heartbeats.on_message(message)

    return on_message


async def _stop_relay(task: asyncio.Task[None], relay: OutboxRelay) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        await relay.flush_deletes()
    except Exception as exc:  # the rows stay; a sweep republishes them, consumers dedupe
        log.warning("final outbox flush failed: %s", exc)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The gateway app; ``registry`` defaults to the one ``settings.registry`` names."""
    settings = settings or get_settings()
    source: Registry = registry or registry_from_settings(settings)
    metrics = Metrics()
    keys = KeyRing.from_settings(settings)
    if not keys.enabled:
        log.warning("no API keys configured: /v1 is open to anyone who can reach the gateway")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if registry is None:  # made here, so closed here: its watch threads end with us
                stack.push_async_callback(asyncio.to_thread, source.close)
            store = await open_store(settings.database_url)
            stack.push_async_callback(store.close)
            connection = await aio_pika.connect_robust(settings.amqp_url)
            stack.push_async_callback(connection.close)
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare_core(channel)
            relay = OutboxRelay(store, channel, grace_seconds=settings.outbox_grace_seconds)
            relay_task = asyncio.create_task(
                relay.run(settings.outbox_sweep_seconds), name="outbox-relay"
            )
            stack.push_async_callback(_stop_relay, relay_task, relay)
            hub = EventHub()
            heartbeats = ReplicaBook(settings.heartbeat_seconds)
            events = await topology.declare_events_queue(await connection.channel(), EVENT_BINDINGS)
            await events.consume(_route_events(hub, heartbeats), no_ack=True)
            app.state.gateway = Gateway(
                settings=settings,
                registry=source,
                store=store,
                connection=connection,
                relay=relay,
                hub=hub,
                queues=QueueInspector(await connection.channel()),
                metrics=metrics,
                heartbeats=heartbeats,
                engine=Engine(store),
            )
            yield

    app = FastAPI(
        title="aiso gateway",
        version=aiso.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.include_router(routes_tasks.router)
    app.include_router(routes_catalog.router)
    app.include_router(routes_dead.router)
    app.include_router(routes_health.router)
    # Outermost last: metrics see every answer, including the size limit's 413s; keys are
    # checked before a body is read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BearerAuth, keys=keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
