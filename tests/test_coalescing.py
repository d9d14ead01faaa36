"""The orchestrator's timers and progress wake-ups wait a tick and go out merged.

On a real broker and store: what is urgent (a dispatch, the event that ends a task) goes out
at once; timers of one delay tier and progress wake-ups leave as one message each when the
relay flushes, every row is deleted only after that, and rows held by a relay that died are
published one by one by another relay's sweep. The gateway's event hub reads the merged
progress message.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from sqlalchemy import Connection, func, select

from aiso import topology
from aiso.orchestrator import Timer, TimerKind
from aiso.orchestrator.coalescing import OrchestratorCoalescing
from aiso.orchestrator.timers import parse_timers, timer_messages
from aiso.store import OutboxMessage, OutboxRelay, Store
from aiso.store import tables as t
from aiso.store.writes import event_message, insert_outbox, utcnow
from aiso.wrapper.events import EventHub


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await topology.declare_core(channel)
    yield channel
    await connection.close()


async def listen(channel: AbstractChannel, exchange: str, key: str) -> AbstractQueue:
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, key)
    return queue


async def drain(queue: AbstractQueue, settle: float = 0.3) -> list[aio_pika.abc.AbstractMessage]:
    await asyncio.sleep(settle)
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


async def stored(store: Store, messages: list[OutboxMessage]) -> list[OutboxMessage]:
    """The messages written to the outbox (with their row ids), as a transaction would."""
    async with store.sync_transaction() as tx:
        return await tx.run(lambda conn: insert_outbox(conn, messages), last=True)


async def outbox_rows(store: Store) -> int:
    def count(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(t.outbox)).scalar_one())

    return await store.read(count)


def progress(task_id: str, event_id: int, kind: str = "step.dispatched") -> OutboxMessage:
    return event_message(event_id, task_id, kind, {"step": "a"}, utcnow())


def deadline(task_id: str) -> Timer:
    due = utcnow() + timedelta(seconds=60)
    return Timer(kind=TimerKind.STEP_DEADLINE, task_id=task_id, step="a", attempt=1, due=due)


async def test_urgent_messages_go_now_the_rest_merged_on_flush(
    channel: AbstractChannel, store: Store
) -> None:
    tasks = [str(uuid.uuid4()) for _ in range(3)]
    tier = topology.delay_plan(60)
    events = await listen(channel, topology.EVENTS_EXCHANGE, "task.#")
    delayed = await listen(channel, topology.delay_exchange(tier), "")
    dispatched = await listen(channel, topology.SERVICES_EXCHANGE, "coalescing-test")
    rows = await stored(
        store,
        [
            *(progress(task_id, n) for n, task_id in enumerate(tasks, start=1)),
            *(timer_messages([deadline(task_id)])[0] for task_id in tasks),
            OutboxMessage(topology.SERVICES_EXCHANGE, "coalescing-test", "d-1", b"dispatch"),
            progress(tasks[0], 99, kind="succeeded"),
        ],
    )
    relay = OutboxRelay(store, channel, grace_seconds=60, coalescing=OrchestratorCoalescing())

    await relay.publish(rows)
    now = await drain(events)
    assert [m.routing_key for m in now] == [topology.event_routing_key(tasks[0], "succeeded")]
    assert [m.body for m in await drain(dispatched)] == [b"dispatch"]
    assert await drain(delayed) == []

    await relay.flush_coalesced()
    [merged] = await drain(events)
    assert merged.routing_key == topology.PROGRESS_ROUTING_KEY
    assert [e["task_id"] for e in json.loads(merged.body)["events"]] == tasks
    [timers] = await drain(delayed)
    assert sorted(timer.task_id for timer in parse_timers(timers.body)) == sorted(tasks)

    assert await outbox_rows(store) == len(rows)  # deleted only by the flush of deletes
    await relay.flush_deletes()
    assert await outbox_rows(store) == 0


async def test_rows_held_by_a_relay_that_died_are_swept_one_by_one(
    channel: AbstractChannel, store: Store
) -> None:
    tasks = [str(uuid.uuid4()) for _ in range(2)]
    events = await listen(channel, topology.EVENTS_EXCHANGE, "task.#")
    rows = await stored(store, [progress(task_id, n) for n, task_id in enumerate(tasks, 1)])
    dead = OutboxRelay(store, channel, grace_seconds=0, coalescing=OrchestratorCoalescing())
    await dead.publish(rows)  # held, and never flushed: its process is gone
    assert await drain(events) == []

    other = OutboxRelay(store, channel, grace_seconds=0, coalescing=OrchestratorCoalescing())
    assert await other.sweep() == 2
    swept = await drain(events)
    assert sorted(m.routing_key for m in swept) == sorted(
        topology.event_routing_key(task_id, "step.dispatched") for task_id in tasks
    )
    assert await outbox_rows(store) == 0


async def test_the_event_hub_reads_a_merged_progress_message() -> None:
    hub = EventHub()
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    [merged] = OrchestratorCoalescing().merge(
        "progress", [progress(first, 1), progress(second, 2), progress(first, 3, "started")]
    )

    class Delivery:
        body = merged.body
        message_id = merged.message_id

    delivery: Any = Delivery()
    with hub.subscribe(first) as watching_first, hub.subscribe(second) as watching_second:
        await hub.on_message(delivery)
        assert [(e.id, e.kind) for e in _all(watching_first)] == [
            (1, "step.dispatched"),
            (3, "started"),
        ]
        assert [e.id for e in _all(watching_second)] == [2]


def _all(queue: asyncio.Queue[Any]) -> list[Any]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
