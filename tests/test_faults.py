"""Fault-injection suite: real processes, real RabbitMQ, faults injected from outside.

Every case checks that each task reaches a terminal state, none is lost, each step is applied
once, and the final states are the expected ones. ``docs/reliability.md`` lists what each proves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiso.store import tables as t
from aiso.webhooks import verify
from harness import Platform, free_port, start_platform, stop_platform, submit_many

HERE = Path(__file__).resolve().parent
SECRET = "whsec_" + base64.b64encode(b"fault-suite-secret-key-0123456789").decode()

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
async def platform(
    amqp_url: str, sqlite_url: str, tmp_path: Path, state_dir: Path
) -> AsyncIterator[Platform]:
    p = await start_platform(
        amqp_url=amqp_url,
        database_url=sqlite_url,
        log_dir=tmp_path / "logs",
        manifests=HERE / "fault_manifests",
        env={
            "AISO_TEST_STATE_DIR": state_dir,
            "PYTHONPATH": HERE,
            "AISO_WEBHOOK_SECRET": SECRET,
            "AISO_ALLOW_PRIVATE_URLS": "true",
            "AISO_WEBHOOK_TIMEOUT_SECONDS": "1",
            "AISO_WEBHOOK_BACKOFF_SECONDS": "[1, 2, 3]",
            "AISO_SHUTDOWN_GRACE_SECONDS": "30",
        },
    )
    yield p
    await stop_platform(p)


def calls(state_dir: Path, service: str) -> list[tuple[str, int, float]]:
    path = state_dir / f"{service}.calls"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(r[0], int(r[1]), float(r[2])) for r in rows]


async def submit(
    client: httpx.AsyncClient, url: str, pipeline: str, text: str = "hello there.", **extra: Any
) -> str:
    body = {"pipeline": pipeline, "input": {"payload_type": "text", "payload": {"text": text}}}
    response = await client.post(f"{url}/v1/tasks", json={**body, **extra})
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


async def wait_for(client: httpx.AsyncClient, url: str, task_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = (await client.get(f"{url}/v1/tasks/{task_id}")).json()
        if view["status"] not in ("pending", "running"):
            return view
        await asyncio.sleep(0.3)
    raise TimeoutError(f"task {task_id} still running after {timeout}s")


async def test_retries_with_backoff_until_success(platform: Platform, state_dir: Path) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        task_id = await submit(client, platform.url, "p-flaky")
        view = await wait_for(client, platform.url, task_id)
    assert view["status"] == "succeeded"
    assert [(s["attempt"], s["status"]) for s in view["steps"]] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    times = [at for tid, _attempt, at in calls(state_dir, "flaky") if tid == task_id]
    assert len(times) == 3
    # Backoff of the flaky service: 1 s before attempt 2, 2 s before attempt 3.
    assert times[1] - times[0] >= 1.0
    assert times[2] - times[1] >= 2.0


async def test_permanent_failure_dead_letters_and_replays(
    platform: Platform, state_dir: Path
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        task_id = await submit(client, platform.url, "p-broken")
        view = await wait_for(client, platform.url, task_id)
        assert view["status"] == "failed"
        assert view["error"]["code"] == "Broken"
        assert len(view["steps"]) == 1  # permanent: not retried

        listed = subprocess.run(
            [*aiso(), "dead", "list", "broken", "--json"],
            capture_output=True,
            text=True,
            env=platform_env(platform),
            check=True,
        )
        entries = json.loads(listed.stdout)
        assert [e["task_id"] for e in entries] == [task_id]
        assert "Broken" in entries[0]["reason"]

        (state_dir / "broken.fixed").touch()
        subprocess.run(
            [*aiso(), "dead", "replay", "broken", "--all"],
            capture_output=True,
            env=platform_env(platform),
            check=True,
        )
        view = await wait_for(client, platform.url, task_id)
    assert view["status"] == "succeeded"
    assert [s["status"] for s in view["steps"]] == ["failed", "succeeded"]


def aiso() -> list[str]:
    from aiso.supervisor import aiso_command

    return aiso_command()


def platform_env(platform: Platform) -> dict[str, str]:
    return {**os.environ, "AISO_URL": platform.url}


async def test_hanging_service_is_timed_out_and_its_late_result_ignored(
    platform: Platform, state_dir: Path
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        task_id = await submit(client, platform.url, "p-hang")
        view = await wait_for(client, platform.url, task_id)
        assert view["status"] == "succeeded"
        assert [(s["attempt"], s["status"]) for s in view["steps"]] == [
            (1, "timed_out"),
            (2, "succeeded"),
        ]
        assert view["result"]["payload"]["attempt"] == 2
        await asyncio.sleep(4)  # attempt 1 finishes its 4 s sleep and publishes a late result
        again = (await client.get(f"{platform.url}/v1/tasks/{task_id}")).json()
    assert [c[1] for c in calls(state_dir, "hang")] == [1, 2]
    assert again["steps"] == view["steps"] and again["result"] == view["result"]


async def test_breaker_opens_holds_dispatches_and_recovers(
    platform: Platform, state_dir: Path
) -> None:
    (state_dir / "sick.down").touch()
    async with httpx.AsyncClient(timeout=30) as client:
        failing = [await submit(client, platform.url, "p-sick") for _ in range(3)]
        for task_id in failing:
            assert (await wait_for(client, platform.url, task_id))["status"] == "failed"
        services = {s["name"]: s for s in (await client.get(f"{platform.url}/v1/services")).json()}
        assert services["sick"]["breaker"]["state"] == "open"

        held = [await submit(client, platform.url, "p-sick") for _ in range(5)]
        degraded = await submit(client, platform.url, "p-degraded", "  a   b. c!  ")
        await asyncio.sleep(2)
        assert len(calls(state_dir, "sick")) == 3  # nothing dispatched while open
        view = await wait_for(client, platform.url, degraded)
        assert view["status"] == "succeeded"
        work = next(s for s in view["steps"] if s["step"] == "work")
        assert work["status"] == "skipped"
        assert view["result"]["payload"]["words"] == 3

        (state_dir / "sick.down").unlink()
        for task_id in held:
            assert (await wait_for(client, platform.url, task_id, timeout=60))["status"] == (
                "succeeded"
            )
        services = {s["name"]: s for s in (await client.get(f"{platform.url}/v1/services")).json()}
        assert services["sick"]["breaker"]["state"] == "closed"
    # One probe after the cool-down, then the five held tasks: no pile-up while open.
    assert len(calls(state_dir, "sick")) == 3 + 5


async def test_broker_restart_during_a_run(platform: Platform) -> None:
    async def restart_broker() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "stop_app"], check=True)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "start_app"], check=True)

    restart = asyncio.create_task(restart_broker())
    try:
        tasks = await submit_many(platform.gateways, 300)
    finally:
        await restart  # the broker comes back even if a submission failed: later tests need it
    counts = await platform.wait_terminal(len(tasks), timeout=300)
    assert counts == {"succeeded": len(tasks)}
    applied = await platform.step_applications()
    assert all(count == 1 for _task, _step, count in applied)
    assert len(applied) == 2 * len(tasks)


async def test_webhooks_reach_a_receiver_that_was_down(platform: Platform) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    first_seen: set[str] = set()

    async def receive(request: Request) -> Response:
        body = await request.body()
        event = verify(SECRET, dict(request.headers), body)
        webhook_id = request.headers["webhook-id"]
        seen.append((webhook_id, event))
        if webhook_id not in first_seen and len(first_seen) % 4 == 0:
            first_seen.add(webhook_id)
            await asyncio.sleep(2)  # slower than the sender's timeout: it will send again
        first_seen.add(webhook_id)
        return Response(status_code=204)

    port = free_port()
    callback = f"http://127.0.0.1:{port}/hook"
    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [
            await submit(client, platform.url, "text-stats", f"task {i}.", callback_url=callback)
            for i in range(20)
        ]
        await platform.wait_terminal(20, timeout=60)
        await asyncio.sleep(20 - 1)  # the receiver is down for the first 20 s
        async with webhook_receiver(port, receive):
            deadline = time.monotonic() + 60
            while {e["data"]["task_id"] for _, e in seen} != set(tasks):
                assert time.monotonic() < deadline, "webhooks not delivered"
                await asyncio.sleep(0.5)
            while await delivery_states(platform) != ["delivered"] * 20:
                assert time.monotonic() < deadline, "webhooks not confirmed"
                await asyncio.sleep(0.5)
    ids_by_task: dict[str, set[str]] = {}
    for webhook_id, event in seen:
        ids_by_task.setdefault(event["data"]["task_id"], set()).add(webhook_id)
        assert event["type"] == "task.succeeded"
    assert all(len(ids) == 1 for ids in ids_by_task.values())  # duplicates share the id
    assert len(seen) > len(tasks)  # the slow answers were sent again


@contextlib.asynccontextmanager
async def webhook_receiver(
    port: int, receive: Callable[[Request], Awaitable[Response]]
) -> AsyncIterator[None]:
    """Serve ``receive`` at ``http://127.0.0.1:<port>/hook`` for as long as the block runs."""
    app = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, port=port))
    serving = asyncio.create_task(server.serve())
    try:
        yield
    finally:
        server.should_exit = True
        await serving


async def delivery_states(platform: Platform) -> list[str]:
    async with platform.store.engine.connect() as conn:
        rows = (await conn.execute(select(t.webhook_deliveries.c.status))).all()
    return [r.status for r in rows]


async def test_sigterm_lets_in_flight_work_finish(platform: Platform, state_dir: Path) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [await submit(client, platform.url, "p-slow", f"t{i}.") for i in range(4)]
        while len(calls(state_dir, "slow")) < 4:
            await asyncio.sleep(0.05)
        os.kill(platform.supervisor.pid("svc-slow"), signal.SIGTERM)
        views = [await wait_for(client, platform.url, task_id) for task_id in tasks]
    assert [v["status"] for v in views] == ["succeeded"] * 4
    assert all(len(v["steps"]) == 1 for v in views)
    handled = calls(state_dir, "slow")
    assert sorted(c[0] for c in handled) == sorted(tasks)  # each ran once: no redelivery


async def test_progress_webhooks_report_every_step(platform: Platform) -> None:
    received: list[dict[str, Any]] = []

    async def receive(request: Request) -> Response:
        received.append(verify(SECRET, dict(request.headers), await request.body()))
        return Response(status_code=200)

    port = free_port()
    async with webhook_receiver(port, receive), httpx.AsyncClient(timeout=30) as client:
        task_id = await submit(
            client,
            platform.url,
            "text-stats",
            callback_url=f"http://127.0.0.1:{port}/hook",
            callback_progress=True,
        )
        assert (await wait_for(client, platform.url, task_id))["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while not any(e["type"] == "task.succeeded" for e in received):
            assert time.monotonic() < deadline, "final webhook not delivered"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
    kinds = sorted(e["type"] for e in received)
    assert kinds.count("task.step.succeeded") == 2
    assert kinds.count("task.step.dispatched") == 2
    assert kinds.count("task.succeeded") == 1
