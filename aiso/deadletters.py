"""A service's dead letters: read them without taking them, and replay them once it is fixed.

``aiso.svc.<svc>.dead`` receives three kinds of message: steps the orchestrator failed for
good (``x-aiso-reason``, ``x-aiso-task-id``, ``x-aiso-step``, ``x-aiso-attempts``), poison
messages the service queue gave up on after its delivery limit (RabbitMQ's ``x-death``), and
messages a replica could not read at all (``x-aiso-reason`` only).

Nothing consumes a dead queue. Reading uses ``basic.get`` without acknowledging on a channel
of its own, then hands every message back in the order it was taken. A walk over the whole
queue (a replay, a listing at least as long as the queue) therefore leaves it in its order; a
shorter listing may move the listed messages behind the others on brokers that requeue at the
back (RabbitMQ 3.x quorum queues do). Messages are handed back with ``basic.nack``, which
RabbitMQ 4.3 and later do not count as a failed delivery; 4.0 to 4.2 count every return and
give quorum queues a default delivery limit of 20, so there a message listed that many times
would be dropped. A replay acknowledges only what it replayed, after the
broker confirmed the replay, so a crash half-way loses nothing (a message replayed twice asks
the orchestrator twice to revive a task that is running again; the second request changes
nothing).

Both walks stop after the messages that were in the queue when they began: a replayed task
that fails again comes back to the dead queue and is not replayed in a loop. A walk running
while another one holds messages does not see those.

``aiso.orchestrator.dead`` holds what the orchestrator could not read or apply (tasks,
results, timers; ``x-aiso-reason``, and where it was headed in ``x-aiso-exchange`` and
``x-aiso-routing-key``). ``list_parked`` reads it the same way; ``replay_parked`` sends each
message back where it was headed, as it was, once the cause is fixed.

The command line (``aiso dead``) and the gateway (``/v1/services/{name}/dead-letters``) both
use this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any, Literal

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import BaseModel, Field

from aiso import topology
from aiso.contracts import ReplayRequest, parse_result, parse_task
from aiso.errors import InvalidMessage

__all__ = [
    "ORCHESTRATOR",
    "DeadLetter",
    "NoDeadQueue",
    "ReplayResult",
    "Replayed",
    "list_dead",
    "list_parked",
    "replay_dead",
    "replay_parked",
]

_BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-delivery-count",
    }
)
"""Set by RabbitMQ when it dead-letters or redelivers; a republished message starts afresh."""

ORCHESTRATOR = "orchestrator"
"""``DeadLetter.service`` of the messages the orchestrator parked."""

SETTLE_SECONDS = 2.0
"""Longest wait for unacknowledged messages to be back in the queue after a walk."""


class NoDeadQueue(LookupError):
    """The dead-letter queue does not exist (it was never declared)."""


class DeadLetter(BaseModel):
    """One message of a dead-letter queue, as an operator needs to judge it."""

    message_id: str = Field(
        description="The message's id; 'sha256:<hex>' of its body when it has none."
    )
    reason: str = Field(description="Why it is here (x-aiso-reason, or the broker's reason).")
    service: str
    task_id: str | None = Field(description="The failed task; null for an unreadable message.")
    step: str | None
    attempts: list[dict[str, Any]] = Field(
        description="Every attempt of the step: {attempt, status, error} (x-aiso-attempts)."
    )
    size: int = Field(description="Body size in bytes.")
    first_death_reason: str | None = Field(
        description="Why RabbitMQ first dead-lettered it, e.g. 'delivery_limit' for a message "
        "that crashed its consumers; null when aiso parked it."
    )


class Replayed(BaseModel):
    message_id: str
    action: Literal["replay", "republish"] = Field(
        description="'replay': the orchestrator was asked to re-run the task from the step; "
        "'republish': the message went back where it was headed, as it was (an unreadable "
        "one to the service queue, a parked one to the orchestrator)."
    )
    task_id: str | None
    step: str | None


class ReplayResult(BaseModel):
    replayed: list[Replayed]
    not_found: list[str] = Field(description="Requested message ids not in the dead queue.")


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _message_id(message: AbstractIncomingMessage) -> str:
    return message.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()[:16]


def _task_of(message: AbstractIncomingMessage) -> tuple[str | None, str | None]:
    """(task id, step) from aiso's headers, else from a well-formed task or result body."""
    headers = message.headers or {}
    task_id, step = _text(headers.get("x-aiso-task-id")), _text(headers.get("x-aiso-step"))
    if task_id and step:
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(task_id)), step
    for parse in (parse_task, parse_result):
        with contextlib.suppress(InvalidMessage):
            parsed = parse(message.body)
            return str(parsed.task_id), parsed.step
    return None, None


def _first_death_reason(headers: Mapping[str, Any]) -> str | None:
    first = _text(headers.get("x-first-death-reason"))
    if first:
        return first
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], Mapping):
        return _text(deaths[-1].get("reason"))  # the list is newest first
    return None


def _attempts(raw: object) -> list[dict[str, Any]]:
    text = _text(raw)
    if not text:
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    return [a for a in parsed if isinstance(a, dict)] if isinstance(parsed, list) else []


def _describe(message: AbstractIncomingMessage, service: str) -> DeadLetter:
    headers = message.headers or {}
    task_id, step = _task_of(message)
    first = _first_death_reason(headers)
    reason = _text(headers.get("x-aiso-reason")) or (
        f"dead-lettered by the broker: {first}" if first else "no reason recorded"
    )
    return DeadLetter(
        message_id=_message_id(message),
        reason=reason,
        service=_text(headers.get("x-aiso-service")) or service,
        task_id=task_id,
        step=step,
        attempts=_attempts(headers.get("x-aiso-attempts")),
        size=len(message.body),
        first_death_reason=first,
    )


class _Peek:
    """``basic.get`` without acknowledging, on a channel of its own.

    On leaving, the messages not acknowledged are handed back one by one in the order they
    were taken, so the queue keeps its order (a closing channel returns them too, but in no
    promised order), and the walk waits until they are back in the queue (up to
    ``SETTLE_SECONDS``): a quorum queue takes them back a moment after the channel is closed,
    and a listing right after this one must see the whole queue.
    """

    def __init__(
        self, connection: AbstractConnection, queue: str, missing: str, *, confirms: bool
    ) -> None:
        self.connection = connection
        self.queue_name = queue
        self.missing = missing
        """What ``NoDeadQueue`` says when the queue does not exist."""
        self.confirms = confirms
        self.count = 0
        """Messages in the queue when the walk began; it never goes past them."""
        self._held: dict[int, AbstractIncomingMessage] = {}
        self._acked = 0

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        try:
            return await channel.declare_queue(self.queue_name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise NoDeadQueue(self.missing) from None

    async def _count(self, channel: AbstractChannel) -> int:
        return int((await self._declare(channel)).declaration_result.message_count or 0)

    async def __aenter__(self) -> tuple[AbstractChannel, AbstractQueue]:
        # With confirms, a message no queue takes raises instead of vanishing: a replay must
        # not remove a dead letter whose replay went nowhere.
        self.channel = await self.connection.channel(
            publisher_confirms=self.confirms, on_return_raises=self.confirms
        )
        try:
            self.queue = await self._declare(self.channel)
        except BaseException:
            if not self.channel.is_closed:
                await self.channel.close()
            raise
        self.count = int(self.queue.declaration_result.message_count or 0)
        return self.channel, self.queue

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if not self.channel.is_closed:
            for message in self._held.values():
                await message.nack(requeue=True)
            await self.channel.close()
        if exc_type is None:  # after a failure the caller has other worries than order
            await self._settle(self.count - self._acked)

    async def _settle(self, expected: int) -> None:
        if expected <= 0:
            return
        channel = await self.connection.channel()
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                while True:  # polling: the broker announces no such moment
                    if await self._count(channel) >= expected:
                        return
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pass  # someone else took messages meanwhile: nothing more to wait for
        finally:
            await channel.close()

    async def messages(self, limit: int | None = None) -> AsyncIterator[AbstractIncomingMessage]:
        """The first ``limit`` (default: all) of the ``count`` messages, unacknowledged."""
        for _ in range(self.count if limit is None else min(limit, self.count)):
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                return
            assert message.delivery_tag is not None
            self._held[message.delivery_tag] = message
            yield message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        assert message.delivery_tag is not None
        del self._held[message.delivery_tag]
        self._acked += 1


async def list_dead(
    connection: AbstractConnection, service: str, limit: int = 50
) -> list[DeadLetter]:
    """The first ``limit`` dead letters of ``service`` from the head of its dead queue; all
    stay in the queue.

    Raises ``NoDeadQueue`` when the service's dead queue does not exist.
    """
    async with (peek := _service_peek(connection, service, confirms=False)):
        return [_describe(m, service) async for m in peek.messages(limit)]


async def list_parked(connection: AbstractConnection, limit: int = 50) -> list[DeadLetter]:
    """The first ``limit`` messages the orchestrator parked, from the head of
    ``aiso.orchestrator.dead``; all stay in the queue."""
    async with (peek := _parked_peek(connection, confirms=False)):
        return [_describe(m, ORCHESTRATOR) async for m in peek.messages(limit)]


def _service_peek(connection: AbstractConnection, service: str, *, confirms: bool) -> _Peek:
    missing = f"service {service!r} has no dead-letter queue"
    return _Peek(connection, topology.dead_queue(service), missing, confirms=confirms)


def _parked_peek(connection: AbstractConnection, *, confirms: bool) -> _Peek:
    missing = "the orchestrator's dead queue does not exist (no orchestrator has run yet)"
    return _Peek(connection, topology.ORCHESTRATOR_DEAD_QUEUE, missing, confirms=confirms)


def _republished(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if k not in _BROKER_HEADERS and not k.startswith("x-aiso-")
    }
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _outcome(replayed: list[Replayed], wanted: set[str] | None) -> ReplayResult:
    found = {r.message_id for r in replayed}
    not_found = sorted(wanted - found) if wanted is not None else []
    return ReplayResult(replayed=replayed, not_found=not_found)


async def replay_dead(
    connection: AbstractConnection,
    service: str,
    message_ids: Collection[str] | None,
    *,
    requested_by: str = "aiso",
) -> ReplayResult:
    """Replay the dead letters named by ``message_ids`` (``None``: every one).

    A message that names its task and step becomes a ``ReplayRequest`` to the orchestrator,
    which revives the failed task from that step (once per task and step, however many of
    its messages are selected); an unreadable one is republished to the service queue as it
    was. Each is acknowledged — removed — once the broker confirmed its replay; the others
    stay where they were. Raises ``NoDeadQueue`` when the dead queue does not exist.
    """
    wanted = None if message_ids is None else set(message_ids)
    replayed: list[Replayed] = []
    requested: set[tuple[str, str]] = set()
    async with (peek := _service_peek(connection, service, confirms=True)) as (channel, _):
        tasks = await channel.get_exchange(topology.TASKS_EXCHANGE, ensure=False)
        services = await channel.get_exchange(topology.SERVICES_EXCHANGE, ensure=False)
        async for message in peek.messages():
            message_id = _message_id(message)
            if wanted is not None and message_id not in wanted:
                continue  # left unacknowledged: handed back, in order, when the walk ends
            task_id, step = _task_of(message)
            if task_id is not None and step is not None:
                if (task_id, step) not in requested:
                    request = ReplayRequest(
                        task_id=uuid.UUID(task_id), step=step, requested_by=requested_by
                    )
                    await tasks.publish(
                        aio_pika.Message(
                            request.model_dump_json().encode(),
                            content_type="application/json",
                            message_id=f"replay-{message_id}",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=topology.REPLAY_ROUTING_KEY,
                    )
                    requested.add((task_id, step))
                action: Literal["replay", "republish"] = "replay"
            else:
                await services.publish(_republished(message), routing_key=service)
                action = "republish"
            await peek.ack(message)
            replayed.append(
                Replayed(message_id=message_id, action=action, task_id=task_id, step=step)
            )
    return _outcome(replayed, wanted)


async def replay_parked(
    connection: AbstractConnection, message_ids: Collection[str] | None
) -> ReplayResult:
    """Send the parked messages named by ``message_ids`` (``None``: every one) back where
    they were headed (``x-aiso-exchange``, ``x-aiso-routing-key``), as they were; run it once
    what made the orchestrator park them is fixed. Each is acknowledged — removed — once the
    broker confirmed it; a message without a destination stays and is reported not found.
    """
    wanted = None if message_ids is None else set(message_ids)
    replayed: list[Replayed] = []
    async with (peek := _parked_peek(connection, confirms=True)) as (channel, _):
        async for message in peek.messages():
            message_id = _message_id(message)
            if wanted is not None and message_id not in wanted:
                continue
            headers = message.headers or {}
            exchange = _text(headers.get("x-aiso-exchange"))
            routing_key = _text(headers.get("x-aiso-routing-key"))
            if exchange is None or routing_key is None:
                continue  # nowhere to send it: it stays, and counts as not found
            destination = (
                await channel.get_exchange(exchange, ensure=False)
                if exchange
                else channel.default_exchange  # it was published straight to the queue
            )
            await destination.publish(_republished(message), routing_key=routing_key)
            await peek.ack(message)
            task_id, step = _task_of(message)
            replayed.append(
                Replayed(message_id=message_id, action="republish", task_id=task_id, step=step)
            )
    return _outcome(replayed, wanted)
