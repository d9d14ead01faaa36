"""The platform end to end: real gateway, orchestrator and service processes, real broker/db."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from sqlalchemy import func, select

from aiso import topology
from aiso.resources import ResolvedPipeline, load_manifests
from aiso.store import tables as t
from aiso.wrapper.schemas import TaskSubmission
from aiso.wrapper.submission import new_task
from harness import MANIFESTS, Platform, start_platform, stop_platform, submit_many

EXAMPLE = "  Hello   World. Second sentence!  "

pytestmark = pytest.mark.timeout(900)


def body(text: str = EXAMPLE) -> dict[str, Any]:
    return {"pipeline": "text-stats", "input": {"payload_type": "text", "payload": {"text": text}}}


def assert_applied_once(applied: list[tuple[str, str, int]], tasks: list[str], steps: int) -> None:
    per_task: dict[str, int] = {}
    for task_id, _step, count in applied:
        assert count == 1, f"task {task_id} step {_step} applied {count} times"
        per_task[task_id] = per_task.get(task_id, 0) + 1
    missing = [tid for tid in tasks if per_task.get(tid) != steps]
    assert not missing, f"{len(missing)} task(s) without all {steps} steps applied"


@pytest.fixture(params=["sqlite", "postgres"])
async def platform(
    request: pytest.FixtureRequest, amqp_url: str, tmp_path: Path
) -> AsyncIterator[Platform]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    p = await start_platform(amqp_url=amqp_url, database_url=url, log_dir=tmp_path / "logs")
    yield p
    await stop_platform(p)


async def test_smoke_pipeline_through_the_gateway(platform: Platform) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(f"{platform.url}/v1/tasks?wait=30", json=body())
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["status"] == "succeeded"
        payload = task["result"]["payload"]
        assert (payload["words"], payload["sentences"]) == (4, 2)
        assert payload["text"] == "Hello World. Second sentence!"
        again = (await client.get(f"{platform.url}/v1/tasks/{task['task_id']}")).json()
        assert [(s["step"], s["status"]) for s in again["steps"]] == [
            ("normalize", "succeeded"),
            ("stats", "succeeded"),
        ]


async def test_500_tasks_succeed_while_processes_are_killed(
    amqp_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    p = await start_platform(amqp_url=amqp_url, database_url=sqlite_url, log_dir=tmp_path / "logs")
    try:
        calm = await submit_many(p.gateways, 500)
        counts = await p.wait_terminal(500, timeout=180)
        assert counts == {"succeeded": 500}
        assert_applied_once(await p.step_applications(), calm, steps=2)

        async def chaos() -> None:
            await asyncio.sleep(0.5)
            p.kill("orchestrator-0")
            await p.wait_running("orchestrator-0")
            await asyncio.sleep(1.5)
            p.kill("svc-normalize")
            await asyncio.sleep(1.0)
            p.kill("orchestrator-0")

        chaos_task = asyncio.create_task(chaos())
        stormy = await submit_many(p.gateways, 500)
        await chaos_task
        counts = await p.wait_terminal(1000, timeout=300)
        assert counts == {"succeeded": 1000}
        assert p.supervisor.restarts("orchestrator-0") == 2
        assert p.supervisor.restarts("svc-normalize") == 1
        assert_applied_once(await p.step_applications(), calm + stormy, steps=2)
    finally:
        await stop_platform(p)


async def test_two_orchestrators_and_two_gateways_on_postgres(
    amqp_url: str, postgres_url: str, tmp_path: Path
) -> None:
    p = await start_platform(
        amqp_url=amqp_url,
        database_url=postgres_url,
        log_dir=tmp_path / "logs",
        orchestrators=2,
        gateways=2,
    )
    try:
        tasks = await submit_many(p.gateways, 500)
        counts = await p.wait_terminal(500, timeout=300)
        assert counts == {"succeeded": 500}
        assert_applied_once(await p.step_applications(), tasks, steps=2)
        async with httpx.AsyncClient(timeout=30) as client:
            for task_id in tasks[::25]:
                for gateway in p.gateways:
                    view = (await client.get(f"{gateway}/v1/tasks/{task_id}")).json()
                    assert view["status"] == "succeeded"
        # Both orchestrators took a share of the work.
        async with p.store.engine.connect() as conn:
            rows = await conn.execute(select(func.count()).select_from(t.step_attempts))
            assert rows.scalar_one() == 1000
    finally:
        await stop_platform(p)


async def test_republished_results_change_nothing(
    amqp_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    await topology.declare_core(channel)
    tap = await channel.declare_queue(exclusive=True)
    await tap.bind(topology.RESULTS_EXCHANGE, topology.RESULT_ROUTING_KEY)
    p = await start_platform(amqp_url=amqp_url, database_url=sqlite_url, log_dir=tmp_path / "logs")
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            task = (await client.post(f"{p.url}/v1/tasks?wait=30", json=body())).json()
            assert task["status"] == "succeeded"
            before = (await client.get(f"{p.url}/v1/tasks/{task['task_id']}")).json()
            events_before = len(await p.store.events_since(task["task_id"]))

            results = []
            while (message := await tap.get(no_ack=True, fail=False)) is not None:
                results.append(message)
            assert len(results) == 2
            exchange = await channel.get_exchange(topology.RESULTS_EXCHANGE)
            for _ in range(3):
                for message in results:
                    await exchange.publish(
                        aio_pika.Message(message.body, message_id=message.message_id),
                        routing_key=topology.RESULT_ROUTING_KEY,
                    )
            await asyncio.sleep(2)
            after = (await client.get(f"{p.url}/v1/tasks/{task['task_id']}")).json()
            assert after == before
            assert len(await p.store.events_since(task["task_id"])) == events_before
            results_queue = await channel.declare_queue(topology.RESULTS_QUEUE, passive=True)
            assert results_queue.declaration_result.message_count == 0
    finally:
        await stop_platform(p)
        await connection.close()


async def test_messages_that_cannot_apply_are_parked_and_the_rest_go_on(
    amqp_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    p = await start_platform(
        amqp_url=amqp_url,
        database_url=sqlite_url,
        log_dir=tmp_path / "logs",
        env={"AISO_ORCHESTRATOR_DELIVERY_LIMIT": 5},
    )
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        tasks = await channel.get_exchange(topology.TASKS_EXCHANGE)
        dead = await channel.declare_queue(topology.ORCHESTRATOR_DEAD_QUEUE, passive=True)
        parked: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}

        async def take_parked() -> None:
            while (message := await dead.get(no_ack=True, fail=False)) is not None:
                parked[str(message.message_id)] = message

        # A task whose stored plan is corrupt: starting it fails on every delivery.
        plan = load_manifests(MANIFESTS).resolve("text-stats")
        assert isinstance(plan, ResolvedPipeline)
        submission = TaskSubmission.model_validate(body())
        broken = new_task(submission, plan, {"text": "never runs"})
        broken.row["plan"] = {"steps": "not a plan"}
        await p.store.create_task(broken.row, broken.announce)
        await tasks.publish(
            aio_pika.Message(broken.announce.body, message_id=broken.id),
            routing_key=topology.TASK_ROUTING_KEY,
        )
        # A message that is not a task at all is parked at once.
        await tasks.publish(
            aio_pika.Message(b'{"not": "a task"}', message_id="junk"),
            routing_key=topology.TASK_ROUTING_KEY,
        )

        # While the broken task is retried (a pause of a second after each of its five
        # deliveries), other work is not held up behind it: tasks one after another all end
        # before it is parked.
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(5):
                meanwhile = (await client.post(f"{p.url}/v1/tasks?wait=30", json=body())).json()
                assert meanwhile["status"] == "succeeded"
        await take_parked()
        assert broken.id not in parked, "the healthy tasks waited for the broken one's retries"

        deadline = asyncio.get_running_loop().time() + 30
        while len(parked) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            await take_parked()
        assert set(parked) == {broken.id, "junk"}
        reason = str(parked[broken.id].headers["x-aiso-reason"])
        assert reason.startswith("failed 5 times: ValidationError"), reason
        assert "malformed message on aiso.orchestrator.tasks" in str(
            parked["junk"].headers["x-aiso-reason"]
        )
        assert parked[broken.id].body == broken.announce.body  # the raw message, for replay

        # The orchestrator went on: nothing left unacknowledged, and new work still runs.
        queue = await channel.declare_queue(topology.TASKS_QUEUE, passive=True)
        assert queue.declaration_result.message_count == 0
        async with httpx.AsyncClient(timeout=60) as client:
            done = (await client.post(f"{p.url}/v1/tasks?wait=30", json=body())).json()
            assert done["status"] == "succeeded"
    finally:
        await connection.close()
        await stop_platform(p)
