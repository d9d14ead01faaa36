"""The floor: the same 3-step chain relayed with nothing but aio-pika.

Run as ``python bench/floor.py relay`` (stands in for the orchestrator) and ``python
bench/floor.py service NAME`` (a no-op service), with the broker URL in ``$BENCH_AMQP_URL``.
Each task makes the same 8 broker hops as an aiso task::

    client ─1─▶ tasks ─▶ relay ─2─▶ svc.a ─▶ a ─3─▶ results ─▶ relay ─4─▶ svc.b ─▶ b ─5─▶ results
    ─▶ relay ─6─▶ svc.c ─▶ c ─7─▶ results ─▶ relay ─8─▶ done ─▶ client

Persistent messages into quorum queues, publisher confirms on every publish, and each input
acknowledged only after its output was confirmed: aiso's delivery guarantees on the wire,
without its store, its envelopes, its events or its timers. The completion queue is, like
aiso's events queue, a private classic queue the client reads without acknowledgements.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

__all__ = ["DONE_EXCHANGE", "SERVICES", "TASKS_EXCHANGE", "declare", "publish"]

TASKS_EXCHANGE = "floor.tasks"
SERVICES_EXCHANGE = "floor.services"
RESULTS_EXCHANGE = "floor.results"
DONE_EXCHANGE = "floor.done"
SERVICES = ("a", "b", "c")
RELAY_PREFETCH = 64  # aiso's orchestrator_prefetch
SERVICE_PREFETCH = 16  # the no-op services' concurrency in bench/manifests


async def declare(channel: AbstractChannel) -> None:
    """Exchanges and quorum queues of the chain (idempotent)."""
    direct = aio_pika.ExchangeType.DIRECT
    quorum = {"x-queue-type": "quorum"}
    for exchange, queue, key in (
        (TASKS_EXCHANGE, "floor.tasks", "task"),
        (RESULTS_EXCHANGE, "floor.results", "result"),
        *((SERVICES_EXCHANGE, f"floor.svc.{s}", s) for s in SERVICES),
    ):
        ex = await channel.declare_exchange(exchange, direct, durable=True)
        q = await channel.declare_queue(queue, durable=True, arguments=quorum)
        await q.bind(ex, key)
    await channel.declare_exchange(DONE_EXCHANGE, direct, durable=True)


async def publish(exchange: AbstractExchange, body: bytes, key: str) -> None:
    """A persistent message; returns once the broker confirmed it."""
    message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await exchange.publish(message, routing_key=key)


async def _relay(channel: AbstractChannel, queue_name: str) -> None:
    services = await channel.get_exchange(SERVICES_EXCHANGE, ensure=False)
    done = await channel.get_exchange(DONE_EXCHANGE, ensure=False)

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = json.loads(message.body)
        step = task.get("step", -1) + 1
        if step < len(SERVICES):
            task["step"] = step
            await publish(services, json.dumps(task).encode(), SERVICES[step])
        else:
            await publish(done, json.dumps(task).encode(), task["reply_to"])
        await message.ack()

    await channel.set_qos(prefetch_count=RELAY_PREFETCH)
    queue = await channel.get_queue(queue_name, ensure=False)
    await queue.consume(on_message)


async def _service(channel: AbstractChannel, name: str) -> None:
    results = await channel.get_exchange(RESULTS_EXCHANGE, ensure=False)

    async def on_message(message: AbstractIncomingMessage) -> None:
        task = json.loads(message.body)  # a no-op handler: the payload goes back unchanged
        await publish(results, json.dumps(task).encode(), "result")
        await message.ack()

    await channel.set_qos(prefetch_count=SERVICE_PREFETCH)
    queue = await channel.get_queue(f"floor.svc.{name}", ensure=False)
    await queue.consume(on_message)


async def main(role: str, name: str = "") -> None:
    """Run one relay or service process until SIGTERM; the broker URL is $BENCH_AMQP_URL."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(os.environ["BENCH_AMQP_URL"])
    async with connection:
        if role == "relay":
            # One channel per input queue, as the orchestrator has.
            for queue in ("floor.tasks", "floor.results"):
                await _relay(await connection.channel(publisher_confirms=True), queue)
        else:
            await _service(await connection.channel(publisher_confirms=True), name)
        print(f"floor {role} {name} ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
