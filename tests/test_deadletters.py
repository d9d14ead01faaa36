"""Operating failing services: dead letters (list without taking, replay after a fix), the
services view (circuit breaker, heartbeats, queue and dead-letter counts) and its gauges.

Dead letters are made the real way: a platform (gateway, orchestrator, services as processes,
``tests/harness.py``) runs a pipeline whose second step is ``tests/failing_service.py``, which
fails for good until the test rewrites its mode file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from failing_service import MODE_FILE_ENV
from sqlalchemy import insert
from test_wrapper_api import running

from aiso import topology
from aiso.contracts import Data, TaskMessage, dispatch_id
from aiso.deadletters import ORCHESTRATOR, NoDeadQueue, list_dead, list_parked, replay_dead
from aiso.settings import Settings
from aiso.store import tables as t
from aiso.supervisor import aiso_command
from harness import ROOT, Platform, start_platform, stop_platform

pytestmark = pytest.mark.timeout(300)

CLIENT = "dead-letter-client-key"
OPERATOR = "dead-letter-operator-key"
CLIENT_AUTH = {"Authorization": f"Bearer {CLIENT}"}
OPERATOR_AUTH = {"Authorization": f"Bearer {OPERATOR}"}
HEARTBEAT_SECONDS = 1.0

MANIFESTS = """
apiVersion: aiso.dev/v1alpha1
kind: AIService
metadata: {name: failing}
spec:
  handler: tests.failing_service:service
  input: [text]
  output: text
  concurrency: 4
  timeoutSeconds: 10
  retry: {maxAttempts: 2, backoffSeconds: [1]}
---
apiVersion: aiso.dev/v1alpha1
kind: Pipeline
metadata: {name: fragile}
spec:
  input: text
  timeoutSeconds: 120
  steps:
    - {name: tidy, service: normalize}
    - {name: repair, service: failing}
"""

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dead")


@pytest.fixture(scope="module")
def mode_file(root: Path) -> Path:
    """What ``failing_service`` does: write ``permanent`` to break it, ``ok`` to fix it."""
    return root / "mode"


def set_mode(mode_file: Path, mode: str) -> None:
    mode_file.write_text(mode)


@pytest.fixture(scope="module")
async def platform(amqp_url: str, root: Path, mode_file: Path) -> AsyncIterator[Platform]:
    manifests = root / "manifests"
    manifests.mkdir()
    (manifests / "normalize.yaml").write_text((ROOT / "manifests" / "normalize.yaml").read_text())
    (manifests / "fragile.yaml").write_text(MANIFESTS)
    p = await start_platform(
        amqp_url=amqp_url,
        database_url=f"sqlite+aiosqlite:///{root / 'aiso.db'}",
        log_dir=root / "logs",
        manifests=manifests,
        env={
            MODE_FILE_ENV: mode_file,
            "AISO_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
            "AISO_API_KEYS": json.dumps([CLIENT]),
            "AISO_ADMIN_API_KEYS": json.dumps([OPERATOR]),
        },
    )
    yield p
    await stop_platform(p)


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def channel(broker: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    channel = await broker.channel()
    yield channel
    await channel.close()


@pytest.fixture
async def client(
    platform: Platform, channel: AbstractChannel, mode_file: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the platform's gateway; the failing service is broken and its dead queue
    empty."""
    await topology.declare_service(channel, "failing")
    await (await channel.declare_queue(topology.dead_queue("failing"), passive=True)).purge()
    set_mode(mode_file, "permanent")
    async with httpx.AsyncClient(base_url=platform.url, timeout=60) as c:
        yield c


async def eventually(
    probe: Callable[[], Awaitable[_T]], accept: Callable[[_T], bool], timeout: float = 30
) -> _T:
    """``probe()`` until ``accept`` takes its value; the last value is in the failure."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout}s; last: {value!r}")
        await asyncio.sleep(0.2)


async def fail_tasks(client: httpx.AsyncClient, n: int) -> list[str]:
    """Submit ``n`` tasks to the broken pipeline and wait until each has failed."""

    async def one(i: int) -> str:
        body = {
            "pipeline": "fragile",
            "input": {"payload_type": "text", "payload": {"text": f"  task   {i} "}},
        }
        response = await client.post("/v1/tasks?wait=30", json=body, headers=CLIENT_AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "failed"
        assert response.json()["error"]["code"] == "ModelBroken"
        return str(response.json()["task_id"])

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def dead_letters(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/v1/services/failing/dead-letters", headers=OPERATOR_AUTH)
    assert response.status_code == 200, response.text
    letters: list[dict[str, Any]] = response.json()
    return letters


async def task_status(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/tasks/{task_id}", headers=CLIENT_AUTH)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def succeeded(view: dict[str, Any]) -> bool:
    return view["status"] == "succeeded"


async def aiso(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *aiso_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AISO_LOG_LEVEL": "WARNING"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- dead letters ----------------------------------------------------------------------------


async def test_failed_step_is_listed_and_replays_once_fixed(
    client: httpx.AsyncClient, broker: AbstractRobustConnection, mode_file: Path
) -> None:
    [task_id] = await fail_tasks(client, 1)
    [letter] = await eventually(lambda: dead_letters(client), lambda found: len(found) == 1)
    assert letter["message_id"] == str(dispatch_id(uuid.UUID(task_id), "repair", 1))
    assert (letter["task_id"], letter["step"], letter["service"]) == (task_id, "repair", "failing")
    assert letter["reason"] == "ModelBroken: the model is broken"
    assert [(a["attempt"], a["status"]) for a in letter["attempts"]] == [(1, "failed")]
    assert letter["attempts"][0]["error"]["code"] == "ModelBroken"
    assert letter["size"] > 0 and letter["first_death_reason"] is None

    # Looking takes nothing: the letter is still there, for REST and for the module alike.
    assert await dead_letters(client) == [letter]
    listed = await list_dead(broker, "failing")
    assert [d.model_dump(mode="json") for d in listed] == [letter]
    services = (await client.get("/v1/services", headers=CLIENT_AUTH)).json()
    assert {s["name"]: s["dead_letters"] for s in services}["failing"] == 1

    # Clients may not replay; operators may.
    replay = "/v1/services/failing/dead-letters/replay"
    forbidden = await client.post(replay, json={"all": True}, headers=CLIENT_AUTH)
    assert forbidden.status_code == 403
    for selection in ({"all": True, "message_ids": ["x"]}, {}, {"message_ids": []}):
        refused = await client.post(replay, json=selection, headers=OPERATOR_AUTH)
        assert refused.status_code == 422, selection
    unknown = await client.post(
        "/v1/services/ghost/dead-letters/replay", json={"all": True}, headers=OPERATOR_AUTH
    )
    assert unknown.status_code == 404
    assert await dead_letters(client) == [letter]

    set_mode(mode_file, "ok")
    response = await client.post(
        replay, json={"message_ids": [letter["message_id"], "no-such-id"]}, headers=OPERATOR_AUTH
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "replayed": [
            {
                "message_id": letter["message_id"],
                "action": "replay",
                "task_id": task_id,
                "step": "repair",
            }
        ],
        "not_found": ["no-such-id"],
    }
    view = await eventually(lambda: task_status(client, task_id), succeeded)
    assert view["result"]["payload"]["text"] == "fixed: task 0"
    # Revived from the failed step: the first step ran once, the failed one got attempt 2.
    assert [(s["step"], s["attempt"], s["status"]) for s in view["steps"]] == [
        ("tidy", 1, "succeeded"),
        ("repair", 1, "failed"),
        ("repair", 2, "succeeded"),
    ]
    assert await dead_letters(client) == []


async def test_cli_replays_by_id_and_leaves_the_others_in_place(
    client: httpx.AsyncClient, mode_file: Path
) -> None:
    tasks = await fail_tasks(client, 3)
    await eventually(lambda: dead_letters(client), lambda found: len(found) == 3)

    ids = {str(dispatch_id(uuid.UUID(task), "repair", 1)) for task in tasks}
    code, out, err = await aiso("dead", "list", "failing", "--limit", "2")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["MESSAGE", "ID", "TASK"] and header.rstrip().endswith("REASON")
    assert len(rows) == 2
    assert all(row.split()[0] in ids and "ModelBroken: the model is broken" in row for row in rows)
    code, out, err = await aiso("dead", "list", "failing", "--json")
    assert code == 0, err
    before = json.loads(out)
    assert {d["message_id"] for d in before} == ids

    set_mode(mode_file, "ok")
    chosen = before[1]
    code, out, err = await aiso("dead", "replay", "failing", chosen["message_id"])
    assert code == 0, err
    assert f"task {chosen['task_id']} replays from step repair" in out
    await eventually(lambda: task_status(client, chosen["task_id"]), succeeded)

    # The others stay, in their order, and their tasks stay failed.
    code, out, err = await aiso("dead", "list", "failing", "--json")
    assert [d["message_id"] for d in json.loads(out)] == [
        before[0]["message_id"],
        before[2]["message_id"],
    ]
    for other in (before[0], before[2]):
        assert (await task_status(client, other["task_id"]))["status"] == "failed"

    code, out, err = await aiso("dead", "replay", "failing", "--all")
    assert code == 0, err
    assert "2 dead letter(s) of failing replayed" in out
    for other in (before[0], before[2]):
        await eventually(lambda o=other: task_status(client, o["task_id"]), succeeded)
    assert await dead_letters(client) == []

    code, _, err = await aiso("dead", "replay", "failing", "no-such-id")
    assert code == 1 and "not in the dead queue: no-such-id" in err and "Traceback" not in err
    code, _, err = await aiso("dead", "replay", "failing")
    assert code == 2 and "--all" in err
    code, _, err = await aiso("dead", "list", "ghost")
    assert code == 1 and "no dead-letter queue" in err and "Traceback" not in err


async def test_unreadable_and_broker_dead_lettered_messages(
    client: httpx.AsyncClient, broker: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    # An unreadable message, parked by a replica: no task.
    dead = await channel.get_exchange(topology.DEAD_EXCHANGE)
    await dead.publish(
        aio_pika.Message(
            b"not json", message_id="garbage-1", headers={"x-aiso-reason": "unreadable"}
        ),
        routing_key="failing",
    )
    # A task message RabbitMQ itself dead-lettered (here: expired in a queue with a TTL).
    orphan = uuid.uuid4()
    message = TaskMessage(
        source_service="test",
        task_id=orphan,
        step="repair",
        data=Data(payload={"text": "x"}, original_message_id=orphan),
    )
    expiring = await channel.declare_queue(
        exclusive=True,
        arguments={
            "x-message-ttl": 1,
            "x-dead-letter-exchange": topology.DEAD_EXCHANGE,
            "x-dead-letter-routing-key": "failing",
        },
    )
    await channel.default_exchange.publish(
        aio_pika.Message(message.to_bytes(), message_id="expired-1"), routing_key=expiring.name
    )
    letters = await eventually(lambda: list_dead(broker, "failing"), lambda found: len(found) == 2)
    unreadable, expired = sorted(letters, key=lambda d: d.message_id != "garbage-1")
    assert unreadable.message_id == "garbage-1" and unreadable.task_id is None
    assert unreadable.reason == "unreadable" and unreadable.size == len(b"not json")
    assert expired.message_id == "expired-1" and expired.first_death_reason == "expired"
    assert (expired.task_id, expired.step) == (str(orphan), "repair")
    assert expired.reason == "dead-lettered by the broker: expired"

    with pytest.raises(NoDeadQueue):
        await list_dead(broker, "ghost")
    result = await replay_dead(broker, "failing", [unreadable.message_id])
    assert [(r.action, r.task_id) for r in result.replayed] == [("republish", None)]
    # Back through the service queue: the replica refuses it again, with its own reason; the
    # broker's letter stayed.
    after = await eventually(
        lambda: list_dead(broker, "failing"),
        lambda found: sorted(d.reason[:11] for d in found) == ["TaskMessage", "dead-letter"],
    )
    assert {d.message_id for d in after} == {"garbage-1", "expired-1"}

    replayed = await replay_dead(broker, "failing", None, requested_by="test")
    assert sorted(r.action for r in replayed.replayed) == ["replay", "republish"]

    # A replay no queue takes fails, and its dead letter stays.
    lonely = await channel.declare_queue(
        topology.dead_queue("lonely"), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await lonely.bind(dead, "lonely")
    await dead.publish(aio_pika.Message(b"?", message_id="lost-1"), routing_key="lonely")
    await eventually(lambda: list_dead(broker, "lonely"), lambda found: len(found) == 1)
    with pytest.raises(aio_pika.exceptions.PublishError):
        await replay_dead(broker, "lonely", None)
    assert [d.message_id for d in await list_dead(broker, "lonely")] == ["lost-1"]
    await channel.queue_delete(lonely.name)


async def test_messages_the_orchestrator_parked_are_listed_and_sent_back(
    client: httpx.AsyncClient, broker: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    await (await channel.declare_queue(topology.ORCHESTRATOR_DEAD_QUEUE, passive=True)).purge()
    # Parked the real way: the running orchestrator cannot read this "result".
    results = await channel.get_exchange(topology.RESULTS_EXCHANGE)
    await results.publish(
        aio_pika.Message(b'{"not": "a result"}', message_id="bad-result-1"),
        routing_key=topology.RESULT_ROUTING_KEY,
    )
    (letter,) = await eventually(lambda: list_parked(broker), lambda found: len(found) == 1)
    assert letter.message_id == "bad-result-1" and letter.service == ORCHESTRATOR
    assert letter.reason.startswith("malformed message on aiso.orchestrator.results")
    assert letter.task_id is None and letter.first_death_reason is None
    # And one headed for a queue of the test's own, published straight to it.
    inbox = await channel.declare_queue(exclusive=True)
    dead = await channel.get_exchange(topology.DEAD_EXCHANGE)
    headers = {"x-aiso-reason": "test", "x-aiso-exchange": "", "x-aiso-routing-key": inbox.name}
    await dead.publish(
        aio_pika.Message(b"{}", message_id="direct-1", headers=headers),
        routing_key=topology.ORCHESTRATOR_DEAD_ROUTING_KEY,
    )
    await eventually(lambda: list_parked(broker), lambda found: len(found) == 2)

    code, out, err = await aiso("dead", "list", "--orchestrator")
    assert code == 0 and "bad-result-1" in out and "direct-1" in out, err
    assert "malformed message on aiso.orchestrator.results" in out
    code, _, err = await aiso("dead", "list", "failing", "--orchestrator")
    assert code == 2 and "either a service or --orchestrator" in err
    code, _, err = await aiso("dead", "replay", "--orchestrator", "no-such-id")
    assert code == 1 and "not in the dead queue: no-such-id" in err and "Traceback" not in err

    code, out, err = await aiso("dead", "replay", "--orchestrator", "--all")
    assert code == 0 and "2 dead letter(s) of the orchestrator replayed" in out, err
    # Each went back where it was headed, as it was: the test's queue got its message
    # without aiso's headers; the orchestrator read the other again and parked it again.
    got = await inbox.get(timeout=10)
    assert got.message_id == "direct-1" and got.body == b"{}"
    assert not any(k.startswith("x-aiso-") for k in got.headers)
    await got.ack()
    again = await eventually(lambda: list_parked(broker), lambda found: len(found) == 1)
    assert [d.message_id for d in again] == ["bad-result-1"]
    await (await channel.declare_queue(topology.ORCHESTRATOR_DEAD_QUEUE, passive=True)).purge()


# --- the services view -----------------------------------------------------------------------


async def services(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/v1/services", headers=CLIENT_AUTH)
    assert response.status_code == 200, response.text
    return {s["name"]: s for s in response.json()}


async def test_running_replicas_report_by_heartbeat(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    # Until the earlier tests' last messages are settled a heartbeat may still count one in
    # flight: wait for the idle state.
    view = await eventually(
        lambda: services(client),
        lambda found: (
            all(found[n]["health"]["ready_replicas"] >= 1 for n in found)
            and found["failing"]["health"]["replicas"][0]["in_flight"] == 0
        ),
    )
    [replica] = view["failing"]["health"]["replicas"]
    assert replica["ready"] is True and replica["in_flight"] == 0
    assert replica["version"] == "0.1.0"
    assert view["failing"]["queue"]["consumers"] == 1
    assert view["failing"]["breaker"]["state"] == "closed"
    metrics = (await client.get("/metrics")).text
    assert 'aiso_service_ready_replicas{service="failing"} 1.0' in metrics
    assert 'aiso_service_consumers{service="failing"} 1.0' in metrics

    # A stopping replica says so at once; the supervisor's restart reports ready again.
    os.kill(platform.supervisor.pid("svc-failing"), signal.SIGTERM)
    await eventually(
        lambda: services(client),
        lambda found: any(
            r["replica"] == replica["replica"] and not r["ready"]
            for r in found["failing"]["health"]["replicas"]
        ),
        timeout=10,
    )
    await platform.wait_running("svc-failing")
    view = await eventually(
        lambda: services(client),
        lambda found: [r["ready"] for r in found["failing"]["health"]["replicas"]] == [True],
    )
    assert view["failing"]["health"]["replicas"][0]["replica"] != replica["replica"]


async def test_services_view_shows_breaker_rows_and_heard_heartbeats(
    amqp_url: str, sqlite_url: str, channel: AbstractChannel
) -> None:
    settings = Settings(
        amqp_url=amqp_url,
        database_url=sqlite_url,
        manifests=ROOT / "manifests",
        heartbeat_seconds=0.5,
    )
    async with running(settings) as api:
        opened = datetime.now(UTC) - timedelta(seconds=5)
        rows = [("stats", "open", 5, opened), ("normalize", "half_open", 0, opened)]
        async with api.gateway.store.transaction() as conn:
            for service, state, failures, at in rows:
                await conn.execute(
                    insert(t.service_health).values(
                        service=service,
                        breaker=state,
                        consecutive_failures=failures,
                        window_total=failures,
                        window_failures=failures,
                        opened_at=at,
                        updated_at=at,
                    )
                )
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        beat = {
            "service": "stats",
            "replica": "stats-a",
            "ready": True,
            "in_flight": 2,
            "version": "1.2.3",
            "at": datetime.now(UTC).isoformat(),
        }
        for body in (beat, {**beat, "replica": "stats-b", "ready": False}, {"service": "x"}):
            await events.publish(
                aio_pika.Message(json.dumps(body).encode()),
                routing_key=topology.heartbeat_routing_key(str(body["service"])),
            )

        view = await eventually(
            lambda: api_services(api),
            lambda found: len(found["stats"]["health"]["replicas"]) == 2,
            timeout=5,
        )
        stats = view["stats"]
        assert stats["breaker"]["state"] == "open"
        assert stats["breaker"]["consecutive_failures"] == 5
        assert datetime.fromisoformat(stats["breaker"]["opened_at"]) == opened
        assert view["normalize"]["breaker"]["state"] == "half_open"
        without_rows = set(view) - {"stats", "normalize"}
        assert all(view[n]["breaker"]["state"] == "closed" for n in without_rows)
        assert stats["health"]["ready_replicas"] == 1
        replicas = stats["health"]["replicas"]
        assert [(r["replica"], r["ready"], r["in_flight"], r["version"]) for r in replicas] == [
            ("stats-a", True, 2, "1.2.3"),
            ("stats-b", False, 2, "1.2.3"),
        ]

        metrics = (await api.client.get("/metrics")).text
        assert 'aiso_service_breaker_state{service="stats"} 2.0' in metrics
        assert 'aiso_service_breaker_state{service="normalize"} 1.0' in metrics
        assert 'aiso_service_ready_replicas{service="stats"} 1.0' in metrics

        # Silent replicas are forgotten after three intervals.
        await eventually(
            lambda: api_services(api),
            lambda found: found["stats"]["health"] == {"ready_replicas": 0, "replicas": []},
            timeout=5,
        )
        metrics = (await api.client.get("/metrics")).text
        assert 'aiso_service_ready_replicas{service="stats"} 0.0' in metrics


async def api_services(api: Any) -> dict[str, dict[str, Any]]:
    response = await api.client.get("/v1/services")
    assert response.status_code == 200, response.text
    return {s["name"]: s for s in response.json()}
