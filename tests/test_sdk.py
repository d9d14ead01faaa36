"""The service runtime against the real broker: results, input errors, dead letters, HTTP
API, metrics and the graceful SIGTERM drain (in a subprocess, as Kubernetes would run it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client.parser import text_string_to_metric_families

from aiso import topology
from aiso.contracts import (
    Data,
    PayloadType,
    ResultMessage,
    TaskMessage,
    dispatch_id,
    parse_result,
    result_id,
)
from aiso.errors import PermanentError, RetryableError
from aiso.sdk import Context, Runtime, Service
from aiso.services.normalize import service as normalize
from aiso.settings import Settings
from harness import make_runtime, running

ROOT = Path(__file__).resolve().parent.parent

# --- services under test -------------------------------------------------------------------

probe = Service(
    name="sdk-probe", input=[PayloadType.TEXT], output=PayloadType.TEXT, version="2.1.0"
)


@probe.handler
async def probe_handler(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> Any:
    action = params.get("do")
    if action == "permanent":
        raise PermanentError("unsupported language", code="Unsupported")
    if action == "retry":
        raise RetryableError("model busy", delay=7)
    if action == "crash":
        raise ValueError("boom")
    if action == "bad-output":
        return {"txt": 1}
    if action == "sleep":
        await asyncio.sleep(float(params["seconds"]))
    if action == "context":
        ctx.logger.info("echoing the context")
        fields = ("task_id", "message_id", "pipeline", "step", "attempt", "deadline")
        return {"text": "ctx", "ctx": {f: str(getattr(ctx, f)) for f in fields}}
    return {"text": payload["text"].upper()}


# --- helpers -------------------------------------------------------------------------------


def make_task(
    service: str,
    payload: dict[str, Any],
    *,
    payload_type: PayloadType = PayloadType.TEXT,
    parameters: dict[str, Any] | None = None,
    **fields: Any,
) -> TaskMessage:
    task_id = uuid.uuid4()
    return TaskMessage(
        message_id=dispatch_id(task_id, service, 1),
        source_service="orchestrator",
        target_services=[service],
        task_id=task_id,
        pipeline="test",
        step=service,
        data=Data(
            payload_type=payload_type,
            payload=payload,
            original_message_id=task_id,
            parameters=parameters or {},
        ),
        **fields,
    )


async def publish(channel: AbstractChannel, routing_key: str, body: bytes, **props: Any) -> None:
    exchange = await channel.get_exchange(topology.SERVICES_EXCHANGE)
    await exchange.publish(aio_pika.Message(body, **props), routing_key=routing_key)


async def send(channel: AbstractChannel, task: TaskMessage) -> None:
    assert task.step is not None
    await publish(channel, task.step, task.to_bytes(), message_id=str(task.message_id))


async def next_message(queue: AbstractQueue, seconds: float = 15) -> AbstractIncomingMessage:
    async with asyncio.timeout(seconds):
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.02)


async def result_for(
    queue: AbstractQueue, task: TaskMessage
) -> tuple[ResultMessage, AbstractIncomingMessage]:
    """The result of ``task`` (results of other tasks on the queue are skipped)."""
    async with asyncio.timeout(15):
        while True:
            message = await next_message(queue)
            result = parse_result(message.body)
            if result.task_id == task.task_id:
                return result, message


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def messages(runtime: Runtime, outcome: str) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.port}") as client:
        text = (await client.get("/metrics")).text
    return metric(
        text, "aiso_service_messages_total", service=runtime.service.name, outcome=outcome
    )


async def wait_messages(runtime: Runtime, outcome: str, at_least: float) -> None:
    async with asyncio.timeout(15):
        while True:
            if await messages(runtime, outcome) >= at_least:
                return
            await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def lonely_vhost() -> Iterator[str]:
    """URL of a vhost of its own, for a test that cuts every connection to it."""
    vhost = f"aiso-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    async with await aio_pika.connect(amqp_url) as connection:
        ch = await connection.channel()
        await topology.declare_core(ch)
        for name in ("normalize", "sdk-probe", "slow"):
            await topology.declare_service(ch, name)
        yield ch


@pytest.fixture
async def results(channel: AbstractChannel) -> AbstractQueue:
    """A private queue receiving a copy of every result."""
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.RESULTS_EXCHANGE, topology.RESULT_ROUTING_KEY)
    return queue


@pytest.fixture(scope="module")
async def normalizer(amqp_url: str) -> AsyncIterator[Runtime]:
    async with running(make_runtime(normalize, amqp_url)) as runtime:
        yield runtime


@pytest.fixture(scope="module")
async def prober(amqp_url: str) -> AsyncIterator[Runtime]:
    async with running(make_runtime(probe, amqp_url)) as runtime:
        yield runtime


@pytest.fixture
async def http(prober: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{prober.port}") as client:
        yield client


# --- declaration ---------------------------------------------------------------------------


def test_service_declaration_is_checked() -> None:
    with pytest.raises(ValueError, match="invalid service name"):
        Service(name="Bad_Name", input=["text"], output="text")
    with pytest.raises(ValueError):
        Service(name="x", input=["sound"], output="text")
    with pytest.raises(ValueError, match="at least one"):
        Service(name="x", input=[], output="text")
    svc = Service(name="x", input=["text"], output="text")
    with pytest.raises(ValueError, match="no handler"):
        Runtime(svc, settings=Settings())
    svc.handler(probe_handler)
    with pytest.raises(ValueError, match="already has a handler"):
        svc.handler(probe_handler)


# --- HTTP ----------------------------------------------------------------------------------


async def test_http_before_start() -> None:
    """Alive at once, but neither ready nor processing until startup has finished."""
    runtime = Runtime(probe, settings=Settings())
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "running startup hooks"
        call = await client.post("/v1/process", json={"payload_type": "text", "payload": {}})
        assert call.status_code == 503
        assert call.headers["content-type"] == "application/problem+json"
        assert call.json()["code"] == "NotReady"


async def test_info_health_metrics(http: httpx.AsyncClient, prober: Runtime) -> None:
    info = (await http.get("/v1/info")).json()
    assert info == {
        "name": "sdk-probe",
        "version": "2.1.0",
        "description": "",
        "input": ["text"],
        "output": "text",
        "concurrency": 4,
        "replica": prober.replica,
    }
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.get("/readyz")).json() == {"status": "ready"}
    text = (await http.get("/metrics")).text
    assert metric(text, "aiso_service_in_flight", service="sdk-probe") == 0
    assert metric(text, "aiso_service_messages_total", service="sdk-probe", outcome="dead") == 0
    assert "aiso_service_handler_seconds_bucket" in text


async def test_process(http: httpx.AsyncClient) -> None:
    body = {"payload_type": "text", "payload": {"text": "hi"}, "parameters": {}}
    response = await http.post("/v1/process", json=body)
    assert response.status_code == 200
    assert response.json() == {"payload_type": "text", "payload": {"text": "HI"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"payload_type": "text", "payload": {"txt": "x"}}, "payload.text"),
        ({"payload_type": "audio", "payload": {"url": "http://a/b.wav"}}, "payload_type"),
        ({"payload_type": "banana", "payload": {}}, "payload_type"),
        ({"payload_type": "text"}, "payload"),
    ],
)
async def test_process_invalid_input(
    http: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await http.post("/v1/process", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "about:blank"
    assert problem["status"] == 422
    assert problem["code"] == "InvalidInput"
    assert problem["errors"][0]["field"] == field
    assert field.split(".")[-1] in problem["detail"]


@pytest.mark.parametrize(
    ("action", "status", "code", "detail"),
    [
        ("permanent", 422, "Unsupported", "unsupported language"),
        ("retry", 503, "RetryableError", "model busy"),
        ("crash", 503, "HandlerError", "boom"),
        ("bad-output", 422, "InvalidOutput", "handler returned invalid output: "),
    ],
)
async def test_process_failures(
    http: httpx.AsyncClient, action: str, status: int, code: str, detail: str
) -> None:
    body = {"payload_type": "text", "payload": {"text": "x"}, "parameters": {"do": action}}
    response = await http.post("/v1/process", json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    assert problem["detail"].startswith(detail)
    assert "Traceback" not in response.text
    if action == "retry":
        assert response.headers["retry-after"] == "7"


async def test_sync_handler_and_startup_hooks(amqp_url: str) -> None:
    """A plain-def handler runs in the pool; readiness waits for every startup hook."""
    svc = Service(name="sdk-sync", input=["text"], output="text")
    release = threading.Event()
    order: list[str] = []

    @svc.on_startup
    def load_model() -> None:  # blocks a pool thread, not the loop
        release.wait(10)
        order.append("sync")

    @svc.on_startup
    async def warm_up() -> None:
        order.append("async")

    @svc.handler
    def run(payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {"text": threading.current_thread().name}

    runtime = make_runtime(svc, amqp_url)
    task = asyncio.create_task(runtime.run())
    try:
        async with httpx.AsyncClient() as client:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        ready = await client.get(f"http://127.0.0.1:{runtime.port}/readyz")
                        break
                    await asyncio.sleep(0.02)
            assert ready.status_code == 503
            assert ready.json()["reason"] == "running startup hooks"
            release.set()
            async with asyncio.timeout(10):
                while True:
                    if runtime.not_ready() is None:
                        break
                    await asyncio.sleep(0.02)
            assert order == ["sync", "async"]
            url = f"http://127.0.0.1:{runtime.port}/v1/process"
            call = await client.post(url, json={"payload_type": "text", "payload": {"text": ""}})
            assert call.json()["payload"]["text"].startswith("aiso-sdk-sync")
    finally:
        release.set()
        runtime.stop()
        await asyncio.wait_for(task, 30)


# --- over the broker -----------------------------------------------------------------------


async def test_task_gets_result(
    normalizer: Runtime, channel: AbstractChannel, results: AbstractQueue
) -> None:
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    task = make_task(
        "normalize", {"text": "  a \n b  ", "lang": "en"}, parameters={"k": 1}, trace=trace
    )
    await send(channel, task)
    result, message = await result_for(results, task)

    assert task.task_id is not None
    assert result.success and result.error is None
    assert result.message_id == result_id(task.task_id, "normalize", 1)
    assert message.message_id == str(result.message_id)
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert result.source_service == "normalize"
    assert result.target_services == ["orchestrator"]
    assert (result.pipeline, result.step, result.attempt) == ("test", "normalize", 1)
    assert result.trace == trace
    assert result.data is not None
    assert result.data.payload_type == PayloadType.TEXT
    assert result.data.payload == {"text": "a b", "lang": "en"}
    assert result.data.original_message_id == task.task_id
    assert result.data.parameters == {"k": 1}
    meta = result.data.execution_metadata
    assert meta["service"] == "normalize"
    assert meta["version"] == "1.0.0"
    assert meta["replica"] == normalizer.replica
    assert meta["duration_ms"] >= 0
    assert datetime.fromisoformat(meta["finished_at"]) >= datetime.fromisoformat(meta["started_at"])
    await wait_messages(normalizer, "succeeded", 1)


@pytest.mark.parametrize(
    ("payload_type", "payload", "field"),
    [
        (PayloadType.TEXT, {"txt": "x"}, "data.payload.text"),
        (PayloadType.URL, {"url": "http://a/b"}, "data.payload_type"),
    ],
)
async def test_invalid_input_fails_permanently(
    normalizer: Runtime,
    channel: AbstractChannel,
    results: AbstractQueue,
    payload_type: PayloadType,
    payload: dict[str, Any],
    field: str,
) -> None:
    task = make_task("normalize", payload, payload_type=payload_type)
    await send(channel, task)
    result, _ = await result_for(results, task)
    assert not result.success
    assert result.error is not None
    assert result.error.code == "InvalidInput"
    assert result.error.retryable is False
    assert result.error.details == {"field": field}
    assert field.removeprefix("data.").removeprefix("payload.") in result.error.message
    assert result.error_message == result.error.message
    assert result.data is not None and result.data.payload_type == PayloadType.ERROR


async def test_handler_failures_become_results(
    prober: Runtime, channel: AbstractChannel, results: AbstractQueue
) -> None:
    retry = make_task("sdk-probe", {"text": "x"}, parameters={"do": "retry"})
    crash = make_task("sdk-probe", {"text": "x"}, parameters={"do": "crash"})
    permanent = make_task("sdk-probe", {"text": "x"}, parameters={"do": "permanent"})
    for task in (retry, crash, permanent):
        await send(channel, task)

    error = (await result_for(results, retry))[0].error
    assert error is not None
    assert (error.code, error.retryable, error.details) == ("RetryableError", True, {"delay": 7})
    error = (await result_for(results, crash))[0].error
    assert error is not None
    assert (error.code, error.message, error.retryable) == ("HandlerError", "boom", True)
    error = (await result_for(results, permanent))[0].error
    assert error is not None
    assert (error.code, error.retryable) == ("Unsupported", False)
    await wait_messages(prober, "failed", 3)


async def test_context(prober: Runtime, channel: AbstractChannel, results: AbstractQueue) -> None:
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    task = make_task("sdk-probe", {"text": "x"}, parameters={"do": "context"}, deadline=deadline)
    await send(channel, task)
    result, _ = await result_for(results, task)
    assert result.data is not None
    assert result.data.payload["ctx"] == {
        "task_id": str(task.task_id),
        "message_id": str(task.message_id),
        "pipeline": "test",
        "step": "sdk-probe",
        "attempt": "1",
        "deadline": str(deadline),
    }


async def test_malformed_messages_are_dead_lettered(
    normalizer: Runtime, channel: AbstractChannel, results: AbstractQueue
) -> None:
    dead = await channel.declare_queue(topology.dead_queue("normalize"), passive=True)
    await dead.purge()
    before = await messages(normalizer, "dead")
    no_task_id = make_task("normalize", {"text": "x"}).model_dump(mode="json")
    del no_task_id["task_id"]
    await publish(channel, "normalize", b"{not json", message_id="bad-json")
    await publish(
        channel, "normalize", TaskMessage.model_validate(no_task_id).to_bytes(), message_id="m2"
    )

    first = await next_message(dead)
    assert first.body == b"{not json"
    assert first.headers["x-aiso-service"] == "normalize"
    assert first.headers["x-aiso-original-message-id"] == "bad-json"
    assert "TaskMessage" in str(first.headers["x-aiso-reason"])
    second = await next_message(dead)
    assert "task_id" in str(second.headers["x-aiso-reason"])
    assert second.headers["x-aiso-original-message-id"] == "m2"

    task = make_task("normalize", {"text": "still  here"})  # the consumer kept running
    await send(channel, task)
    result, _ = await result_for(results, task)
    assert result.data is not None and result.data.payload["text"] == "still here"
    await wait_messages(normalizer, "dead", before + 2)


async def test_expired_tasks_are_dropped(
    prober: Runtime, channel: AbstractChannel, results: AbstractQueue
) -> None:
    """Past its deadline before or during the handler: no result, the orchestrator has moved on."""
    before = await messages(prober, "expired")
    late = make_task("sdk-probe", {"text": "x"}, deadline=datetime.now(UTC) - timedelta(seconds=1))
    slow = make_task(
        "sdk-probe",
        {"text": "x"},
        parameters={"do": "sleep", "seconds": 30},
        deadline=datetime.now(UTC) + timedelta(seconds=0.5),
    )
    on_time = make_task("sdk-probe", {"text": "ok"})
    for task in (late, slow, on_time):
        await send(channel, task)
    result, _ = await result_for(results, on_time)
    assert result.success
    await wait_messages(prober, "expired", before + 2)
    assert await results.get(fail=False) is None


async def test_reconnects_after_losing_the_broker(lonely_vhost: str) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{lonely_vhost}"
    async with running(make_runtime(normalize, url)) as runtime:
        await asyncio.to_thread(
            rabbitmqctl, "close_all_connections", "--vhost", lonely_vhost, "test"
        )
        async with asyncio.timeout(5):
            while True:
                if runtime.not_ready() == "broker connection lost, reconnecting":
                    break
                await asyncio.sleep(0.01)
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            results = await channel.declare_queue(exclusive=True)
            await results.bind(topology.RESULTS_EXCHANGE, topology.RESULT_ROUTING_KEY)
            task = make_task("normalize", {"text": "back  again"})
            await send(channel, task)  # waits in the queue until the replica is back
            result, _ = await result_for(results, task)
            assert result.data is not None and result.data.payload["text"] == "back again"
        assert runtime.not_ready() is None


async def test_sigterm_drains_in_flight_work(
    amqp_url: str, channel: AbstractChannel, results: AbstractQueue
) -> None:
    port = free_port()
    env = {**os.environ, "AISO_AMQP_URL": amqp_url, "AISO_SHUTDOWN_GRACE_SECONDS": "30"}
    aiso = str(Path(sys.executable).parent / "aiso")
    cmd = [aiso, "service", "run", "tests.slow_service:service", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    assert proc.returncode is None, "the service exited before it was ready"
                    await asyncio.sleep(0.05)
            tasks = [make_task("slow", {"text": f"t{i}"}) for i in range(4)]
            for task in tasks:
                await send(channel, task)
            async with asyncio.timeout(10):
                while True:
                    text = (await client.get("/metrics")).text
                    if metric(text, "aiso_service_in_flight", service="slow") == 4:
                        break
                    await asyncio.sleep(0.02)

            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(1.5):  # well before the handlers finish
                while True:
                    draining = await client.get("/readyz")
                    if draining.status_code != 200:
                        break
                    await asyncio.sleep(0.01)
            assert draining.status_code == 503
            assert draining.json()["reason"] == "shutting down"

        for task in tasks:
            result, _ = await result_for(results, task)
            assert result.success
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        stderr = err.decode()
        assert proc.returncode == 0, stderr
        assert "draining 4 in-flight" in stderr
        assert "stopped" in stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    queue = await channel.declare_queue(topology.service_queue("slow"), passive=True)
    assert queue.declaration_result.message_count == 0
    assert queue.declaration_result.consumer_count == 0
