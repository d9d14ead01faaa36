"""The gateway's REST API against real RabbitMQ and a real store (SQLite and PostgreSQL).

No orchestrator runs here: tasks stay pending unless a test moves them on through the store,
as the orchestrator would, which is enough to exercise ``?wait=`` and live event streams.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage
from fastapi import FastAPI

from aiso import topology
from aiso.contracts import Data, PayloadType, ResultMessage, TaskMessage, parse_task
from aiso.orchestrator import Engine
from aiso.registry import FileRegistry, PipelineState
from aiso.resources import Catalog
from aiso.settings import Settings
from aiso.store import OutboxMessage
from aiso.wrapper import create_app
from aiso.wrapper.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent
TEXT = {"payload_type": "text", "payload": {"text": "Hello there.  General Kenobi."}}
SUBMIT = {"pipeline": "text-stats", "input": TEXT}


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    amqp: aio_pika.abc.AbstractChannel

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    async def tasks_queued(self) -> int:
        queue = await self.amqp.declare_queue(topology.TASKS_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def submit(self, body: Any = SUBMIT, **kwargs: Any) -> httpx.Response:
        return await self.client.post("/v1/tasks", json=body, **kwargs)


@asynccontextmanager
async def running(
    settings: Settings, registry: Any = None, *, raise_app_exceptions: bool = True
) -> AsyncIterator[Api]:
    app = create_app(settings, registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, raise_app_exceptions=raise_app_exceptions)
        connection = await aio_pika.connect(settings.amqp_url)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                channel = await connection.channel()
                await (await channel.declare_queue(topology.TASKS_QUEUE, passive=True)).purge()
                yield Api(app, client, channel)
        finally:
            await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def settings(amqp_url: str, database_url: str) -> Settings:
    return Settings(amqp_url=amqp_url, database_url=database_url, manifests=ROOT / "manifests")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running(settings) as api:
        yield api


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem of this status and type; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == f"https://aiso.dev/problems/{slug}"
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    assert problem["instance"] == response.request.url.path
    return problem


def fields(problem: dict[str, Any]) -> list[str]:
    return [e["field"] for e in problem["errors"]]


# --- submitting ------------------------------------------------------------------------------


async def test_submit_answers_202_and_announces_the_task(api: Api) -> None:
    response = await api.submit({**SUBMIT, "parameters": {"stats": {"top": 3}}})
    assert response.status_code == 202, response.text
    body = response.json()
    task_id = body["task_id"]
    assert uuid.UUID(task_id)
    assert body["status"] == "pending"
    assert body["links"] == {
        "self": f"/v1/tasks/{task_id}",
        "events": f"/v1/tasks/{task_id}/events",
    }
    assert response.headers["location"] == f"/v1/tasks/{task_id}"

    view = (await api.client.get(response.headers["location"])).json()
    assert view["task_id"] == task_id
    assert view["pipeline"] == "text-stats"
    assert view["status"] == "pending"
    assert view["steps"] == [] and view["result"] is None and view["error"] is None
    assert view["deadline_at"] > view["created_at"]

    queue = await api.amqp.declare_queue(topology.TASKS_QUEUE, passive=True)
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None, "the task was not published to aiso.tasks"
    assert message.message_id == task_id
    task = parse_task(message.body)
    assert str(task.task_id) == task_id and str(task.data.original_message_id) == task_id
    assert task.pipeline == "text-stats" and task.step == "*"
    assert task.source_service == "wrapper" and task.target_services == ["orchestrator"]
    assert task.data.payload == TEXT["payload"]
    assert task.data.parameters == {"stats": {"top": 3}}


async def test_unknown_pipeline_is_404(api: Api) -> None:
    problem = assert_problem(
        await api.submit({**SUBMIT, "pipeline": "nope"}), 404, "pipeline-not-found"
    )
    assert "nope" in problem["detail"]


async def test_wrong_payload_type_names_the_field(api: Api) -> None:
    body = {**SUBMIT, "input": {"payload_type": "url", "payload": {"url": "http://x"}}}
    problem = assert_problem(await api.submit(body), 422, "invalid-request")
    assert fields(problem) == ["input.payload_type"]


async def test_missing_payload_field_is_named(api: Api) -> None:
    body = {**SUBMIT, "input": {"payload_type": "text", "payload": {"words": "hi"}}}
    problem = assert_problem(await api.submit(body), 422, "invalid-request")
    assert fields(problem) == ["input.payload.text"]


async def test_schema_errors_name_the_field(api: Api) -> None:
    problem = assert_problem(await api.submit({"input": TEXT}), 422, "invalid-request")
    assert fields(problem) == ["pipeline"]
    body = {**SUBMIT, "input": {"payload_type": "smell", "payload": {}}}
    problem = assert_problem(await api.submit(body), 422, "invalid-request")
    assert fields(problem) == ["input.payload_type"]
    problem = assert_problem(
        await api.submit({**SUBMIT, "callback_url": "ftp://x/y"}), 422, "invalid-request"
    )
    assert fields(problem) == ["callback_url"]


async def test_malformed_json_is_422(api: Api) -> None:
    response = await api.client.post(
        "/v1/tasks",
        content=b'{"pipeline": "text-stats",',
        headers={"content-type": "application/json"},
    )
    problem = assert_problem(response, 422, "malformed-json")
    assert fields(problem) == ["body"]


async def test_unknown_parameter_key_is_422(api: Api) -> None:
    body = {**SUBMIT, "parameters": {"stats": {}, "translate": {"to": "fr"}}}
    problem = assert_problem(await api.submit(body), 422, "invalid-request")
    assert fields(problem) == ["parameters.translate"]
    assert "normalize, stats" in problem["errors"][0]["message"]


async def test_wait_above_the_limit_is_422(api: Api) -> None:
    problem = assert_problem(await api.submit(params={"wait": 3600}), 422, "invalid-request")
    assert fields(problem) == ["query.wait"]


async def test_oversize_body_is_413_by_length_and_by_stream(settings: Settings) -> None:
    small = settings.model_copy(update={"max_body_bytes": 200})
    big = {**SUBMIT, "input": {"payload_type": "text", "payload": {"text": "x" * 500}}}
    async with running(small) as api:
        problem = assert_problem(await api.submit(big), 413, "body-too-large")
        assert problem["limit_bytes"] == 200

        async def chunks() -> AsyncIterator[bytes]:
            data = json.dumps(big).encode()
            for i in range(0, len(data), 64):
                yield data[i : i + 64]

        response = await api.client.post(
            "/v1/tasks", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert_problem(response, 413, "body-too-large")
        assert (await api.submit()).status_code == 202  # a small body still passes
        assert await api.tasks_queued() == 1


async def test_routing_errors_are_problems_too(api: Api) -> None:
    assert_problem(await api.client.get("/v2/nothing"), 404, "not-found")
    response = await api.client.put("/v1/tasks")
    assert_problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


async def test_unhandled_errors_are_500_problems_without_traceback(settings: Settings) -> None:
    class Broken:
        def catalog(self) -> Catalog:
            raise RuntimeError("secret internals")

        def pipeline(self, name: str) -> PipelineState | None:
            raise RuntimeError("secret internals")

    async with running(settings, Broken(), raise_app_exceptions=False) as api:
        response = await api.submit()
        problem = assert_problem(response, 500, "internal-error")
        assert "secret" not in response.text and "Traceback" not in response.text
        assert set(problem) == {"type", "title", "status", "detail", "instance"}


# --- idempotency -----------------------------------------------------------------------------


async def test_idempotency_key_replays_the_same_task(api: Api) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await api.submit(headers=key)
    assert first.status_code == 202
    assert "idempotency-replayed" not in first.headers
    # The same request in another key order and spacing is the same request.
    same = json.dumps({"input": TEXT, "pipeline": "text-stats"}, indent=2)
    second = await api.client.post(
        "/v1/tasks", content=same, headers={**key, "content-type": "application/json"}
    )
    assert second.status_code == 202
    assert second.json()["task_id"] == first.json()["task_id"]
    assert second.headers["idempotency-replayed"] == "true"
    assert second.headers["location"] == first.headers["location"]
    assert await api.tasks_queued() == 1

    other = {**SUBMIT, "input": {"payload_type": "text", "payload": {"text": "else"}}}
    problem = assert_problem(await api.submit(other, headers=key), 422, "idempotency-key-reused")
    assert fields(problem) == ["header.Idempotency-Key"]
    assert await api.tasks_queued() == 1


async def test_concurrent_requests_with_one_key_make_one_task(api: Api) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    responses = await asyncio.gather(*(api.submit(headers=key) for _ in range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["task_id"] for r in responses}) == 1
    assert sum("idempotency-replayed" in r.headers for r in responses) == 7
    assert await api.tasks_queued() == 1


async def test_replay_of_a_finished_task_is_200_with_the_view(api: Api) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    task_id = (await api.submit(headers=key)).json()["task_id"]
    await api.client.delete(f"/v1/tasks/{task_id}")
    replay = await api.submit(headers=key)
    assert replay.status_code == 200
    assert replay.json()["status"] == "cancelled" and replay.json()["task_id"] == task_id


# --- reading, cancelling, waiting ------------------------------------------------------------


async def test_unknown_or_malformed_task_id_is_404(api: Api) -> None:
    for path in (f"/v1/tasks/{uuid.uuid4()}", "/v1/tasks/not-a-uuid"):
        assert_problem(await api.client.get(path), 404, "task-not-found")
        assert_problem(await api.client.get(path + "/events"), 404, "task-not-found")
        assert_problem(await api.client.delete(path), 404, "task-not-found")


async def test_cancel_then_cancel_again_is_409(api: Api) -> None:
    task_id = (await api.submit()).json()["task_id"]
    response = await api.client.delete(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "cancelled"
    assert view["error"]["code"] == "Cancelled"
    assert view["finished_at"] is not None
    problem = assert_problem(
        await api.client.delete(f"/v1/tasks/{task_id}"), 409, "task-already-finished"
    )
    assert problem["task_status"] == "cancelled"
    assert "cancelled" in problem["detail"]


async def test_wait_returns_202_with_the_view_when_time_runs_out(api: Api) -> None:
    response = await api.submit(params={"wait": 0.3})
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert response.json()["steps"] == []


async def test_wait_returns_200_with_the_result_when_the_task_ends(api: Api) -> None:
    waiting = asyncio.create_task(api.submit(params={"wait": 20}))
    # Play the orchestrator: take the task off aiso.tasks and run it with the engine.
    queue = await api.amqp.declare_queue(topology.TASKS_QUEUE, passive=True)
    for _ in range(200):
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the task never reached aiso.tasks")
    task_id = str(parse_task(message.body).task_id)
    engine = Engine(api.gateway.store)

    async def apply(fn: Any, *args: Any) -> list[OutboxMessage]:
        _, messages = await engine.commit(lambda unit: fn(unit, *args))
        return messages

    # Each step answers with the same text; the last answer is the task's result.
    result = {"payload_type": "text", "payload": {"text": "2 sentences"}}
    messages = await apply(engine.start, task_id)
    while dispatched := [m for m in messages if m.exchange == topology.SERVICES_EXCHANGE]:
        [dispatch] = [TaskMessage.model_validate_json(m.body) for m in dispatched]
        answer = ResultMessage(
            source_service=dispatch.target_services[0],
            task_id=dispatch.task_id,
            step=dispatch.step,
            attempt=dispatch.attempt,
            data=Data(payload_type=PayloadType.TEXT, payload=result["payload"]),
        )
        messages = await apply(engine.apply_result, answer)
    await api.gateway.relay.publish(messages)
    response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["task_id"] == task_id
    assert view["status"] == "succeeded"
    assert view["result"] == result


# --- events ----------------------------------------------------------------------------------


def parse_sse(text: str) -> list[dict[str, Any]]:
    frames = []
    for block in text.strip().split("\n\n"):
        fields_ = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields_:
            frames.append(fields_)
    return frames


async def test_events_replay_after_cancel_and_end(api: Api) -> None:
    task_id = (await api.submit()).json()["task_id"]
    await api.client.delete(f"/v1/tasks/{task_id}")
    response = await api.client.get(f"/v1/tasks/{task_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(response.text)
    assert [f["event"] for f in frames] == ["created", "cancelled"]
    data = [json.loads(f["data"]) for f in frames]
    assert [d["kind"] for d in data] == ["created", "cancelled"]
    assert all(d["task_id"] == task_id for d in data)
    assert [int(f["id"]) for f in frames] == [d["id"] for d in data]

    resumed = await api.client.get(
        f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": frames[0]["id"]}
    )
    assert [f["event"] for f in parse_sse(resumed.text)] == ["cancelled"]
    done = await api.client.get(
        f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": frames[1]["id"]}
    )
    assert parse_sse(done.text) == []  # nothing after the end: the stream closes at once


async def test_events_follow_live(api: Api) -> None:
    task_id = (await api.submit()).json()["task_id"]
    stream = asyncio.create_task(api.client.get(f"/v1/tasks/{task_id}/events"))
    for _ in range(200):
        if api.gateway.hub.watching(task_id):
            break
        await asyncio.sleep(0.02)
    assert api.gateway.hub.watching(task_id)
    await asyncio.sleep(0.1)  # let the replay of 'created' pass; 'cancelled' must come live
    await api.client.delete(f"/v1/tasks/{task_id}")
    response = await asyncio.wait_for(stream, 10)
    assert [f["event"] for f in parse_sse(response.text)] == ["created", "cancelled"]
    assert not api.gateway.hub.watching(task_id)


async def test_shutdown_ends_streams_and_waits(api: Api) -> None:
    task_id = (await api.submit()).json()["task_id"]
    stream = asyncio.create_task(api.client.get(f"/v1/tasks/{task_id}/events"))
    waiting = asyncio.create_task(api.submit(params={"wait": 30}))
    for _ in range(200):
        if api.gateway.hub.watching(task_id) and len(api.gateway.hub._watchers) == 2:
            break
        await asyncio.sleep(0.02)
    api.gateway.hub.close()
    response = await asyncio.wait_for(stream, 5)
    assert [f["event"] for f in parse_sse(response.text)] == ["created"]
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.status_code == 202 and answer.json()["status"] == "pending"


# --- catalog ---------------------------------------------------------------------------------


async def test_pipelines_list_text_stats_ready(api: Api) -> None:
    response = await api.client.get("/v1/pipelines")
    assert response.status_code == 200
    pipelines = {p["name"]: p for p in response.json()}
    text_stats = pipelines["text-stats"]
    assert text_stats["ready"] is True
    assert text_stats["reason"] is None and text_stats["message"] is None
    assert text_stats["input"] == "text" and text_stats["output"] == "text"
    assert text_stats["timeout_seconds"] == 60
    assert text_stats["steps"] == [
        {"name": "normalize", "service": "normalize", "input": "text", "output": "text"},
        {"name": "stats", "service": "stats", "input": "text", "output": "text"},
    ]
    one = await api.client.get("/v1/pipelines/text-stats")
    assert one.json() == text_stats
    assert_problem(await api.client.get("/v1/pipelines/nope"), 404, "pipeline-not-found")


async def test_pipeline_with_a_missing_service_is_not_ready(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "stats.yaml").write_text((ROOT / "manifests" / "stats.yaml").read_text())
    (tmp_path / "broken.yaml").write_text(
        """
apiVersion: aiso.dev/v1alpha1
kind: Pipeline
metadata: {name: broken}
spec:
  input: text
  steps:
    - {name: count, service: stats}
    - {name: translate, service: ghost}
"""
    )
    async with running(settings, FileRegistry(tmp_path)) as api:
        pipelines = {p["name"]: p for p in (await api.client.get("/v1/pipelines")).json()}
        broken = pipelines["broken"]
        assert broken["ready"] is False
        assert broken["reason"] == "ServiceNotFound"
        assert "ghost" in broken["message"]
        assert broken["output"] is None
        assert broken["steps"] == [
            {"name": "count", "service": "stats", "input": None, "output": "text"},
            {"name": "translate", "service": "ghost", "input": None, "output": None},
        ]
        problem = assert_problem(
            await api.submit({**SUBMIT, "pipeline": "broken"}), 409, "pipeline-not-ready"
        )
        assert problem["reason"] == "ServiceNotFound"
        assert "ghost" in problem["detail"]
        assert await api.tasks_queued() == 0


async def test_services_show_contracts_and_queues(api: Api) -> None:
    for name in ("stats", "normalize"):
        await api.amqp.queue_delete(topology.service_queue(name))
        await api.amqp.queue_delete(topology.dead_queue(name))
    services = {s["name"]: s for s in (await api.client.get("/v1/services")).json()}
    assert {"normalize", "stats"} <= set(services)
    assert services["stats"]["input"] == ["text"] and services["stats"]["output"] == "text"
    assert services["stats"]["concurrency"] == 8 and services["stats"]["timeout_seconds"] == 10
    assert services["stats"]["queue"] is None  # not declared yet
    assert services["stats"]["dead_letters"] is None
    assert services["stats"]["breaker"] == {
        "state": "closed",
        "consecutive_failures": 0,
        "opened_at": None,
    }
    assert services["stats"]["health"] == {"ready_replicas": 0, "replicas": []}

    queue = await topology.declare_service(api.amqp, "stats")
    await api.amqp.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)

    async def hold(message: AbstractIncomingMessage) -> None:
        """Never acks: a replica busy with its message."""

    await queue.consume(hold)
    # 'normalize' is still missing, so the inspecting channel is closed and reopened each time.
    for _ in range(2):
        services = {s["name"]: s for s in (await api.client.get("/v1/services")).json()}
        assert services["normalize"]["queue"] is None
        assert services["stats"]["queue"]["name"] == "aiso.svc.stats"
        assert services["stats"]["queue"]["consumers"] == 1
        assert services["stats"]["queue"]["messages"] == 0  # delivered, unacked: not ready
        assert services["stats"]["dead_letters"] == 0
    await api.amqp.queue_delete(queue.name)


# --- operations ------------------------------------------------------------------------------


async def test_health_ready_and_metrics(api: Api) -> None:
    health = await api.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "broker": "ok"}}

    await api.submit()
    await api.client.get(f"/v1/tasks/{uuid.uuid4()}")
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'aiso_gateway_tasks_submitted_total{pipeline="text-stats"} 1.0' in text
    assert 'aiso_gateway_requests_total{method="POST",route="/v1/tasks",status="202"} 1.0' in text
    assert (
        'aiso_gateway_requests_total{method="GET",route="/v1/tasks/{task_id}",status="404"} 1.0'
        in text
    )
    assert 'aiso_gateway_request_seconds_count{route="/v1/tasks"} 1.0' in text


async def test_readyz_names_what_is_down(api: Api) -> None:
    await api.gateway.connection.close()
    problem = assert_problem(await api.client.get("/readyz"), 503, "not-ready")
    assert any(d.startswith("broker") for d in problem["down"])


async def test_openapi_documents_problems(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()
    assert "Problem" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    post = schema["paths"]["/v1/tasks"]["post"]
    assert set(post["responses"]) >= {"200", "202", "404", "409", "413", "422"}
    assert "application/problem+json" in post["responses"]["422"]["content"]
    assert (await api.client.get("/docs")).status_code == 200
