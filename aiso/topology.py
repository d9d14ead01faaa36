"""Every exchange and queue aiso uses: names and declarations live here and nowhere else.

::

    aiso.tasks     (direct)  ──rk "task", "replay"──▶ aiso.orchestrator.tasks (quorum)
    aiso.services  (direct)  ──rk <svc>──▶   aiso.svc.<svc>             (quorum, delivery limit)
                             ──rk "aiso.orchestrator.timers"──▶ aiso.orchestrator.timers
    aiso.results   (direct)  ──rk "result"─▶ aiso.orchestrator.results  (quorum)
    aiso.events    (topic)   ──rk "task.<id>.<kind>", "task.progress", "service.<svc>.heartbeat"──▶
                             one exclusive queue per gateway process
    aiso.dead      (direct)  ──rk <svc>──▶   aiso.svc.<svc>.dead        (quorum)
                             ──rk "aiso.orchestrator"──▶ aiso.orchestrator.dead (quorum)
    aiso.delay.<tier> (fanout) ──▶ aiso.delay.<tier> (classic, TTL) ──dead-letter──▶ aiso.services

A delay tier is one queue with one fixed TTL, so every message in it expires in arrival order
and none waits behind a longer one (per-message TTL in a shared queue blocks at its head). A
message is published to the tier's fanout exchange *with its final routing key*; when its TTL
expires RabbitMQ dead-letters it to ``aiso.services`` keeping that key, which routes it to the
service queue (a retry) or to the orchestrator's timer queue (a deadline). Service names are
DNS labels and cannot contain dots, so the timer key never collides with a service.

Declarations are idempotent: any component may run them at start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

__all__ = [
    "DEAD_EXCHANGE",
    "DELAY_TIERS",
    "DELAY_TOLERANCE_SECONDS",
    "EVENTS_EXCHANGE",
    "ORCHESTRATOR_DEAD_QUEUE",
    "ORCHESTRATOR_DEAD_ROUTING_KEY",
    "PROGRESS_ROUTING_KEY",
    "REPLAY_ROUTING_KEY",
    "RESULTS_EXCHANGE",
    "RESULTS_QUEUE",
    "RESULT_ROUTING_KEY",
    "SERVICES_EXCHANGE",
    "SERVICE_NAME_PATTERN",
    "SERVICE_QUEUE_DELIVERY_LIMIT",
    "TASKS_EXCHANGE",
    "TASKS_QUEUE",
    "TASK_ROUTING_KEY",
    "TIMERS_QUEUE",
    "TIMER_ROUTING_KEY",
    "DelayTier",
    "dead_queue",
    "declare_core",
    "declare_events_queue",
    "declare_service",
    "delay_exchange",
    "delay_plan",
    "event_kind",
    "event_routing_key",
    "heartbeat_routing_key",
    "service_queue",
]

TASKS_EXCHANGE = "aiso.tasks"
SERVICES_EXCHANGE = "aiso.services"
RESULTS_EXCHANGE = "aiso.results"
EVENTS_EXCHANGE = "aiso.events"
DEAD_EXCHANGE = "aiso.dead"

TASKS_QUEUE = "aiso.orchestrator.tasks"
RESULTS_QUEUE = "aiso.orchestrator.results"
TIMERS_QUEUE = "aiso.orchestrator.timers"
ORCHESTRATOR_DEAD_QUEUE = "aiso.orchestrator.dead"
"""Messages the orchestrator failed to apply too often, parked with the reason."""

TASK_ROUTING_KEY = "task"
REPLAY_ROUTING_KEY = "replay"
RESULT_ROUTING_KEY = "result"
TIMER_ROUTING_KEY = TIMERS_QUEUE
ORCHESTRATOR_DEAD_ROUTING_KEY = "aiso.orchestrator"

SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
"""DNS-1123 label: a Kubernetes object name, and free of dots (see the module docstring)."""

SERVICE_QUEUE_DELIVERY_LIMIT = 5
"""Deliveries of one message before the quorum queue dead-letters it. A message that kills
its consumer this many times is poison; retries of ordinary failures go through the
orchestrator with a fresh message and do not count here."""


@dataclass(frozen=True)
class DelayTier:
    name: str
    seconds: float


DELAY_TIERS: tuple[DelayTier, ...] = (
    DelayTier("1s", 1),
    DelayTier("5s", 5),
    DelayTier("30s", 30),
    DelayTier("5m", 300),
    DelayTier("30m", 1800),
)


DELAY_TOLERANCE_SECONDS = 1.0
"""How late a timer may fire, in seconds: the precision of retries and deadlines."""


def service_queue(service: str) -> str:
    return f"aiso.svc.{service}"


def dead_queue(service: str) -> str:
    return f"aiso.svc.{service}.dead"


def delay_exchange(tier: DelayTier) -> str:
    return f"aiso.delay.{tier.name}"


def event_routing_key(task_id: str, kind: str) -> str:
    return f"task.{task_id}.{kind}"


def event_kind(routing_key: str) -> str:
    """The event kind an ``event_routing_key`` carries (kinds may contain dots)."""
    return routing_key.split(".", 2)[-1]


PROGRESS_ROUTING_KEY = "task.progress"
"""Key of a message carrying several tasks' progress events at once (``{"events": [...]}``):
the orchestrator gathers the wake-ups that do not end a task for a tenth of a second."""


def heartbeat_routing_key(service: str) -> str:
    """Key of a service replica's heartbeats on ``aiso.events``; gateways bind
    ``heartbeat_routing_key("*")`` to hear every service's."""
    return f"service.{service}.heartbeat"


def delay_plan(seconds: float) -> DelayTier:
    """The tier for the next hop of a delay of ``seconds``.

    The largest tier that ends no more than ``DELAY_TOLERANCE_SECONDS`` after the due time, so
    a 60 s delay takes two 30 s hops rather than a 30 s hop plus a string of short ones. A
    delay longer than that tier is re-delayed by whoever receives it, hop by hop, so no timer
    is kept in process memory.
    """
    chosen = DELAY_TIERS[0]
    for tier in DELAY_TIERS:
        if tier.seconds <= seconds + DELAY_TOLERANCE_SECONDS:
            chosen = tier
    return chosen


def _check_service_name(service: str) -> None:
    if not re.match(SERVICE_NAME_PATTERN, service):
        raise ValueError(f"invalid service name {service!r}: must match {SERVICE_NAME_PATTERN}")


async def _quorum(
    channel: AbstractChannel, name: str, arguments: dict[str, object] | None = None
) -> AbstractQueue:
    args: dict[str, object] = {"x-queue-type": "quorum", **(arguments or {})}
    return await channel.declare_queue(name, durable=True, arguments=args)  # type: ignore[arg-type]


async def declare_core(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare the shared exchanges, orchestrator queues and delay tiers."""
    exchanges = {
        TASKS_EXCHANGE: await channel.declare_exchange(
            TASKS_EXCHANGE, ExchangeType.DIRECT, durable=True
        ),
        SERVICES_EXCHANGE: await channel.declare_exchange(
            SERVICES_EXCHANGE, ExchangeType.DIRECT, durable=True
        ),
        RESULTS_EXCHANGE: await channel.declare_exchange(
            RESULTS_EXCHANGE, ExchangeType.DIRECT, durable=True
        ),
        EVENTS_EXCHANGE: await channel.declare_exchange(
            EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True
        ),
        DEAD_EXCHANGE: await channel.declare_exchange(
            DEAD_EXCHANGE, ExchangeType.DIRECT, durable=True
        ),
    }
    tasks = await _quorum(channel, TASKS_QUEUE)
    await tasks.bind(exchanges[TASKS_EXCHANGE], TASK_ROUTING_KEY)
    await tasks.bind(exchanges[TASKS_EXCHANGE], REPLAY_ROUTING_KEY)
    results = await _quorum(channel, RESULTS_QUEUE)
    await results.bind(exchanges[RESULTS_EXCHANGE], RESULT_ROUTING_KEY)
    timers = await _quorum(channel, TIMERS_QUEUE)
    await timers.bind(exchanges[SERVICES_EXCHANGE], TIMER_ROUTING_KEY)
    parked = await _quorum(channel, ORCHESTRATOR_DEAD_QUEUE)
    await parked.bind(exchanges[DEAD_EXCHANGE], ORCHESTRATOR_DEAD_ROUTING_KEY)
    for tier in DELAY_TIERS:
        name = delay_exchange(tier)
        exchange = await channel.declare_exchange(name, ExchangeType.FANOUT, durable=True)
        exchanges[name] = exchange
        queue = await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-message-ttl": int(tier.seconds * 1000),
                "x-dead-letter-exchange": SERVICES_EXCHANGE,
            },
        )
        await queue.bind(exchange)
    return exchanges


async def declare_service(channel: AbstractChannel, service: str) -> AbstractQueue:
    """Declare a service's work queue and its dead-letter queue, with their bindings."""
    _check_service_name(service)
    services = await channel.declare_exchange(SERVICES_EXCHANGE, ExchangeType.DIRECT, durable=True)
    dead = await channel.declare_exchange(DEAD_EXCHANGE, ExchangeType.DIRECT, durable=True)
    dead_q = await _quorum(channel, dead_queue(service))
    await dead_q.bind(dead, service)
    queue = await _quorum(
        channel,
        service_queue(service),
        {
            "x-delivery-limit": SERVICE_QUEUE_DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
        },
    )
    await queue.bind(services, service)
    return queue


async def declare_events_queue(channel: AbstractChannel, bindings: Sequence[str]) -> AbstractQueue:
    """A private, auto-deleted queue receiving task events (one per gateway process)."""
    events = await channel.declare_exchange(EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for key in bindings:
        await queue.bind(events, key)
    return queue
