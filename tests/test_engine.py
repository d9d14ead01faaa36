"""Orchestrator state transitions against a real database (SQLite and PostgreSQL).

The engine returns the messages a transition causes instead of publishing them, so these tests
check both the stored state and the outgoing messages without a broker.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from aiso import topology
from aiso.contracts import Data, ErrorInfo, PayloadType, ResultMessage, TaskMessage
from aiso.orchestrator import Engine, Timer, TimerKind
from aiso.orchestrator.timers import live_timers, parse_timers, timer_messages
from aiso.resources import ResolvedPipeline, load_manifests
from aiso.store import OutboxMessage, StepStatus, Store, TaskStatus, open_store
from aiso.store.database import utcnow
from aiso.store.tables import tasks

ROOT = Path(__file__).resolve().parent.parent


def plan(name: str = "text-stats") -> ResolvedPipeline:
    resolved = load_manifests(ROOT / "manifests").resolve(name)
    assert isinstance(resolved, ResolvedPipeline)
    return resolved


async def submit(store: Store, p: ResolvedPipeline, timeout: float = 60) -> str:
    task_id = str(uuid.uuid4())
    now = utcnow()
    row = {
        "id": task_id,
        "pipeline": p.name,
        "status": "pending",
        "input": {"payload_type": "text", "payload": {"text": " a  b "}},
        "parameters": {},
        "callback_url": None,
        "plan": p.model_dump(mode="json"),
        "created_at": now,
        "updated_at": now,
        "deadline_at": now + timedelta(seconds=timeout),
    }
    announce = OutboxMessage(topology.TASKS_EXCHANGE, topology.TASK_ROUTING_KEY, task_id, b"{}")
    await store.create_task(row, announce)
    return task_id


async def run(fn: Any, *args: Any) -> list[OutboxMessage]:
    """Apply one transition of ``fn``'s engine in its own unit of work; the messages sent."""
    _, messages = await fn.__self__.commit(lambda unit: fn(unit, *args))
    return list(messages)


def dispatches(messages: list[OutboxMessage]) -> list[TaskMessage]:
    return [
        TaskMessage.model_validate_json(m.body)
        for m in messages
        if m.exchange == topology.SERVICES_EXCHANGE
    ]


def timers(messages: list[OutboxMessage]) -> list[Timer]:
    return [
        timer
        for m in messages
        if m.routing_key == topology.TIMER_ROUTING_KEY
        for timer in parse_timers(m.body)
    ]


def success(d: TaskMessage, payload: dict[str, Any]) -> ResultMessage:
    return ResultMessage(
        source_service=d.target_services[0],
        task_id=d.task_id,
        step=d.step,
        attempt=d.attempt,
        data=Data(payload_type=PayloadType.TEXT, payload=payload),
    )


def failure(d: TaskMessage, *, retryable: bool) -> ResultMessage:
    return ResultMessage(
        source_service=d.target_services[0],
        task_id=d.task_id,
        step=d.step,
        attempt=d.attempt,
        success=False,
        error=ErrorInfo(code="Boom", message="boom", retryable=retryable),
    )


async def test_chain_runs_to_success_and_duplicates_change_nothing(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    out = await run(engine.start, task_id)
    [first] = dispatches(out)
    assert (first.step, first.attempt, first.data.payload) == ("normalize", 1, {"text": " a  b "})
    assert {t.kind for t in timers(out)} == {TimerKind.TASK_DEADLINE, TimerKind.STEP_DEADLINE}
    assert await run(engine.start, task_id) == []  # a re-delivered start is a no-op

    out = await run(engine.apply_result, success(first, {"text": "a b"}))
    [second] = dispatches(out)
    assert (second.step, second.data.payload) == ("stats", {"text": "a b"})
    assert await run(engine.apply_result, success(first, {"text": "X"})) == []

    await run(engine.apply_result, success(second, {"text": "a b", "words": 2}))
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.SUCCEEDED
    assert task.result == {"payload_type": "text", "payload": {"text": "a b", "words": 2}}
    steps = await store.get_steps(task_id)
    assert [(s.step, s.attempt, s.status) for s in steps] == [
        ("normalize", 1, StepStatus.SUCCEEDED),
        ("stats", 1, StepStatus.SUCCEEDED),
    ]
    kinds = [e.kind for e in await store.events_since(task_id)]
    assert kinds == [
        "created", "started", "step.dispatched", "step.succeeded",
        "step.dispatched", "step.succeeded", "succeeded",
    ]  # fmt: skip
    assert await run(engine.apply_result, success(second, {"text": "late"})) == []


async def test_retryable_failure_schedules_next_attempt_through_a_timer(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    [first] = dispatches(await run(engine.start, task_id))
    out = await run(engine.apply_result, failure(first, retryable=True))
    assert dispatches(out) == []
    [retry] = timers(out)
    assert (retry.kind, retry.step, retry.attempt) == (TimerKind.RETRY, "normalize", 2)
    assert retry.remaining() > 0.5  # the normalize service's first backoff is 1 s
    [again] = dispatches(await run(engine.fire, retry))
    assert (again.step, again.attempt) == ("normalize", 2)
    assert again.message_id != first.message_id
    assert await run(engine.fire, retry) == []  # a duplicate timer does nothing


async def test_permanent_failure_fails_the_task(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    [first] = dispatches(await run(engine.start, task_id))
    await run(engine.apply_result, failure(first, retryable=False))
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.error is not None
    assert task.error["code"] == "Boom" and task.error["step"] == "normalize"


async def test_exhausted_attempts_fail_the_task(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    [d] = dispatches(await run(engine.start, task_id))
    for _ in range(2):
        [retry] = timers(await run(engine.apply_result, failure(d, retryable=True)))
        [d] = dispatches(await run(engine.fire, retry))
    await run(engine.apply_result, failure(d, retryable=True))
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert [s.attempt for s in await store.get_steps(task_id)] == [1, 2, 3]


async def test_step_timeout_retries_and_ignores_the_late_result(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    out = await run(engine.start, task_id)
    [first] = dispatches(out)
    deadline = next(t for t in timers(out) if t.kind is TimerKind.STEP_DEADLINE)
    out = await run(engine.fire, deadline)
    [retry] = timers(out)
    assert retry.attempt == 2
    assert await run(engine.apply_result, success(first, {"text": "late"})) == []
    steps = await store.get_steps(task_id)
    assert [(s.attempt, s.status) for s in steps] == [
        (1, StepStatus.TIMED_OUT),
        (2, StepStatus.SCHEDULED),
    ]


async def test_task_deadline_times_out_and_cancel_stops_results(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    out = await run(engine.start, task_id)
    deadline = next(t for t in timers(out) if t.kind is TimerKind.TASK_DEADLINE)
    await run(engine.fire, deadline)
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.TIMED_OUT
    assert [s.status for s in await store.get_steps(task_id)] == [StepStatus.CANCELLED]

    other = await submit(store, plan())
    [d] = dispatches(await run(engine.start, other))
    messages = await run(engine.cancel, other)
    assert json.loads(messages[0].body)["kind"] == "cancelled"
    assert await run(engine.cancel, other) == []  # a second cancel changes nothing
    assert await run(engine.apply_result, success(d, {"text": "x"})) == []
    cancelled = await store.get_task(other)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED


def test_timers_of_one_transaction_share_a_message_per_tier() -> None:
    now = utcnow()
    soon = [
        Timer(
            kind=TimerKind.STEP_DEADLINE,
            task_id=str(uuid.uuid4()),
            step="a",
            attempt=1,
            due=now + timedelta(seconds=40),
        )
        for _ in range(3)
    ]
    later = Timer(
        kind=TimerKind.TASK_DEADLINE, task_id=soon[0].task_id, due=now + timedelta(seconds=900)
    )
    messages = timer_messages([*soon, later])
    assert len(messages) == 2
    by_exchange = {m.exchange: parse_timers(m.body) for m in messages}
    assert by_exchange[topology.delay_exchange(topology.delay_plan(40))] == soon
    assert by_exchange[topology.delay_exchange(topology.delay_plan(900))] == [later]
    assert timer_messages(soon)[0].message_id == messages[0].message_id  # stable per content


async def test_timers_that_can_no_longer_act_are_dropped_before_they_fire(store: Store) -> None:
    engine = Engine(store)
    task_id = await submit(store, plan())
    out = await run(engine.start, task_id)
    [first] = dispatches(out)
    armed = timers(out)
    assert await store.read(lambda c: live_timers(c, armed)) == armed  # all still waiting

    out = await run(engine.apply_result, failure(first, retryable=True))
    [retry] = timers(out)
    live = await store.read(lambda c: live_timers(c, [*armed, retry]))
    # attempt 1 answered: its deadline is moot; the retry and the task deadline are not
    assert {t.kind for t in live} == {TimerKind.TASK_DEADLINE, TimerKind.RETRY}

    [again] = dispatches(await run(engine.fire, retry))
    await run(engine.apply_result, success(again, {"text": "a b"}))
    assert await store.read(lambda c: live_timers(c, [retry])) == []  # dispatched already
    unknown = retry.model_copy(update={"task_id": str(uuid.uuid4())})
    assert await store.read(lambda c: live_timers(c, [unknown])) == []
    await run(engine.cancel, task_id)
    assert await store.read(lambda c: live_timers(c, armed)) == []  # the task has ended


async def test_reads_do_not_wait_for_a_writer(store: Store) -> None:
    task_id = await submit(store, plan())
    other = await open_store(str(store.engine.url.render_as_string(hide_password=False)))
    try:
        async with store.sync_transaction() as tx:
            await tx.run(lambda c: c.execute(update(tasks).values(parameters={"held": True})))
            # The writer holds its lock between statements: a reader in this process and one
            # in another (a gateway beside the orchestrator) both still read at once.
            for reader in (store, other):
                task = await asyncio.wait_for(reader.get_task(task_id), 5)
                assert task is not None and task.parameters == {}
        task = await other.get_task(task_id)
        assert task is not None and task.parameters == {"held": True}
    finally:
        await other.close()


async def test_reads_do_not_queue_behind_a_writer_waiting_for_the_lock(sqlite_url: str) -> None:
    """On SQLite a writer whose lock another process holds waits in SQLite's busy handler,
    on the store's transaction thread; reads of the same process go on meanwhile."""
    store = await open_store(sqlite_url)
    task_id = await submit(store, plan())
    holder = sqlite3.connect(sqlite_url.split("///", 1)[1], isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction

        async def write() -> None:
            async with store.sync_transaction() as tx:
                await tx.run(lambda c: c.execute(update(tasks).values(parameters={"w": 1})))

        writing = asyncio.create_task(write())
        await asyncio.sleep(0.3)  # the writer is now waiting for the lock
        assert not writing.done()
        task = await asyncio.wait_for(store.get_task(task_id), 5)
        assert task is not None and task.parameters == {}
        assert not writing.done()
        holder.execute("COMMIT")
        await asyncio.wait_for(writing, 10)
        task = await store.get_task(task_id)
        assert task is not None and task.parameters == {"w": 1}
    finally:
        holder.close()
        await store.close()
