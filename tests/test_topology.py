"""Topology on a real broker: idempotent declarations, delay tiers, poison messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from aiso import topology


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield await connection.channel(publisher_confirms=True)
    await connection.close()


async def wait_for_message(queue: aio_pika.abc.AbstractQueue, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            return message.body
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing on {queue.name} within {timeout}s")


async def test_declarations_are_idempotent(channel: AbstractChannel) -> None:
    for _ in range(2):
        await topology.declare_core(channel)
        queue = await topology.declare_service(channel, "echo")
    assert queue.name == topology.service_queue("echo")
    dead = await channel.declare_queue(topology.dead_queue("echo"), passive=True)
    assert dead.name == "aiso.svc.echo.dead"


async def test_service_names_that_could_collide_are_refused(channel: AbstractChannel) -> None:
    with pytest.raises(ValueError, match="invalid service name"):
        await topology.declare_service(channel, "aiso.orchestrator.timers")


async def test_a_delay_tier_returns_the_message_with_its_routing_key(
    channel: AbstractChannel,
) -> None:
    exchanges = await topology.declare_core(channel)
    queue = await topology.declare_service(channel, "delayed")
    tier = topology.delay_plan(1.0)
    started = time.monotonic()
    await exchanges[topology.delay_exchange(tier)].publish(
        aio_pika.Message(b"later"), routing_key="delayed"
    )
    assert await wait_for_message(queue, timeout=10) == b"later"
    assert time.monotonic() - started >= tier.seconds - 0.05


async def test_a_message_that_keeps_failing_its_consumer_is_dead_lettered(
    channel: AbstractChannel,
) -> None:
    exchanges = await topology.declare_core(channel)
    queue = await topology.declare_service(channel, "poison")
    await exchanges[topology.SERVICES_EXCHANGE].publish(
        aio_pika.Message(b"crash me"), routing_key="poison"
    )
    for _ in range(topology.SERVICE_QUEUE_DELIVERY_LIMIT + 1):
        message = await queue.get(fail=False, timeout=5)
        if message is None:
            break
        await message.nack(requeue=True)  # what a consumer dying mid-message amounts to
    dead = await channel.declare_queue(topology.dead_queue("poison"), passive=True)
    assert await wait_for_message(dead, timeout=10) == b"crash me"


def test_delay_plan_prefers_few_hops() -> None:
    assert topology.delay_plan(0).seconds == 1
    assert topology.delay_plan(29.99).seconds == 30
    assert topology.delay_plan(59.9).seconds == 30
    assert topology.delay_plan(4.2).seconds == 5
