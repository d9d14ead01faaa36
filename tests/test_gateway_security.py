"""The gateway's guards: bearer API keys (401 vs 403), per-client idempotency, and the refusal
of URLs that would make the platform call into private networks (SSRF).

Real RabbitMQ and SQLite, the gateway in-process (``running`` from the API tests); no
orchestrator is needed, as every check happens at submission.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from test_wrapper_api import ROOT, SUBMIT, Api, assert_problem, fields, running

from aiso import topology
from aiso.registry import FileRegistry
from aiso.settings import Settings
from aiso.store import tables as t
from aiso.wrapper import create_app
from aiso.wrapper.auth import KeyRing, Role

CLIENT = "client-key-0123456789"
OTHER_CLIENT = "client-key-abcdefghij"
OPERATOR = "operator-key-0123456789"
OPERATOR_DIGEST = "sha256:" + hashlib.sha256(OPERATOR.encode()).hexdigest().upper()
PUBLIC_HOOK = "http://93.184.216.34/hook"  # a public address literal: no DNS needed

URL_PIPELINES = """
apiVersion: aiso.dev/v1alpha1
kind: AIService
metadata: {name: fetch}
spec: {handler: "tests.failing_service:service", input: [url, audio, video, file], output: text}
"""
for _kind in ("url", "audio", "video", "file"):
    URL_PIPELINES += f"""---
apiVersion: aiso.dev/v1alpha1
kind: Pipeline
metadata: {{name: from-{_kind}}}
spec: {{input: {_kind}, steps: [{{name: fetch, service: fetch}}]}}
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def settings(amqp_url: str, sqlite_url: str) -> Settings:
    return Settings(amqp_url=amqp_url, database_url=sqlite_url, manifests=ROOT / "manifests")


def with_keys(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "api_keys": [SecretStr(CLIENT), SecretStr(OTHER_CLIENT)],
            "admin_api_keys": [SecretStr(OPERATOR_DIGEST)],
        }
    )


@pytest.fixture
async def secured(settings: Settings) -> AsyncIterator[Api]:
    async with running(with_keys(settings)) as api:
        yield api


@pytest.fixture
def url_manifests(tmp_path: Path) -> Path:
    (tmp_path / "fetch.yaml").write_text(URL_PIPELINES)
    return tmp_path


# --- API keys --------------------------------------------------------------------------------


ROUTES = [
    ("GET", "/v1/pipelines"),
    ("GET", "/v1/services"),
    ("POST", "/v1/tasks"),
    ("GET", f"/v1/tasks/{uuid.uuid4()}"),
    ("GET", "/v1/services/stats/dead-letters"),
    ("GET", "/v1/no-such-route"),  # unknown routes are not revealed either
]
BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": f"Basic {CLIENT}"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": CLIENT},
    bearer("not-a-key"),
    bearer(OPERATOR_DIGEST),  # the configured digest is not itself a key
]


async def test_v1_routes_need_a_known_key(secured: Api) -> None:
    for method, path in ROUTES:
        for headers in BAD_CREDENTIALS:
            response = await secured.client.request(method, path, json=SUBMIT, headers=headers)
            problem = assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert CLIENT not in response.text and "not-a-key" not in response.text
            assert problem["detail"]
    assert await secured.tasks_queued() == 0


async def test_client_keys_reach_client_routes(secured: Api) -> None:
    assert (await secured.client.get("/v1/pipelines", headers=bearer(CLIENT))).status_code == 200
    assert (await secured.client.get("/v1/services", headers=bearer(CLIENT))).status_code == 200
    submitted = await secured.submit(headers=bearer(OTHER_CLIENT))
    assert submitted.status_code == 202, submitted.text
    task = await secured.client.get(submitted.headers["location"], headers=bearer(CLIENT))
    assert task.status_code == 200
    assert await secured.tasks_queued() == 1


async def test_operator_routes_refuse_client_keys(secured: Api) -> None:
    listing = "/v1/services/stats/dead-letters"
    replay = listing + "/replay"
    problem = assert_problem(
        await secured.client.get(listing, headers=bearer(CLIENT)), 403, "forbidden"
    )
    assert "operator" in problem["detail"]
    response = await secured.client.post(replay, json={"all": True}, headers=bearer(CLIENT))
    assert_problem(response, 403, "forbidden")
    # The operator key — configured as an upper-case digest — opens them, and client routes.
    assert (await secured.client.get(listing, headers=bearer(OPERATOR))).status_code == 200
    response = await secured.client.post(replay, json={"all": True}, headers=bearer(OPERATOR))
    assert response.status_code == 200, response.text
    assert response.json() == {"replayed": [], "not_found": []}
    assert (await secured.submit(headers=bearer(OPERATOR))).status_code == 202
    unknown = "/v1/services/ghost/dead-letters"
    assert_problem(
        await secured.client.get(unknown, headers=bearer(OPERATOR)), 404, "service-not-found"
    )


async def test_probes_metrics_and_docs_stay_open(secured: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        response = await secured.client.get(path)
        assert response.status_code == 200, (path, response.text)
    schema = (await secured.client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/tasks"]["post"]["security"] == [{"HTTPBearer": []}]
    replay = schema["paths"]["/v1/services/{name}/dead-letters/replay"]["post"]
    assert {"401", "403", "404"} <= set(replay["responses"])


def test_keys_are_held_as_digests_only() -> None:
    digest = hashlib.sha256(b"second-operator").hexdigest()
    ring = KeyRing([SecretStr(CLIENT)], [SecretStr(OPERATOR_DIGEST), SecretStr(f"sha256:{digest}")])
    assert ring.enabled
    held = repr(vars(ring))
    assert CLIENT not in held and OPERATOR not in held
    caller = ring.identify(CLIENT)
    assert caller is not None and caller.role is Role.CLIENT
    assert caller.key_id == hashlib.sha256(CLIENT.encode()).hexdigest()[:16]
    assert CLIENT not in repr(caller)
    operator = ring.identify("second-operator")
    assert operator is not None and operator.role is Role.OPERATOR
    assert ring.identify(OPERATOR_DIGEST) is None
    assert not KeyRing([], []).enabled

    with pytest.raises(ValueError, match=r"admin_api_keys\[0\]") as refused:
        KeyRing([], [SecretStr("sha256:my-real-key-typed-wrong")])
    assert "my-real-key" not in str(refused.value)
    with pytest.raises(ValueError, match=r"api_keys\[1\] is empty"):
        KeyRing([SecretStr(CLIENT), SecretStr(" ")], [])


def test_a_malformed_key_stops_the_gateway_at_creation(settings: Settings) -> None:
    broken = settings.model_copy(update={"api_keys": [SecretStr("sha256:abc")]})
    with pytest.raises(ValueError, match=r"api_keys\[0\]"):
        create_app(broken)


async def stored_keys(api: Api) -> list[str]:
    async with api.gateway.store.engine.connect() as conn:
        return list((await conn.execute(select(t.idempotency_keys.c.key))).scalars())


async def test_idempotency_keys_are_per_client(secured: Api) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    mine = await secured.submit(headers={**key, **bearer(CLIENT)})
    theirs = await secured.submit(headers={**key, **bearer(OTHER_CLIENT)})
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["task_id"] != theirs.json()["task_id"]
    again = await secured.submit(headers={**key, **bearer(CLIENT)})
    assert again.json()["task_id"] == mine.json()["task_id"]
    assert again.headers["idempotency-replayed"] == "true"
    # Another body under a client's key conflicts for that client only.
    other = {**SUBMIT, "input": {"payload_type": "text", "payload": {"text": "else"}}}
    conflict = await secured.submit(other, headers={**key, **bearer(CLIENT)})
    assert_problem(conflict, 422, "idempotency-key-reused")
    assert key["Idempotency-Key"] not in conflict.text

    longest = {"Idempotency-Key": "k" * 255}
    first = await secured.submit(headers={**longest, **bearer(CLIENT)})
    second = await secured.submit(headers={**longest, **bearer(CLIENT)})
    assert first.status_code == 202 and second.json()["task_id"] == first.json()["task_id"]

    prefix = hashlib.sha256(CLIENT.encode()).hexdigest()[:16] + ":"
    stored = await stored_keys(secured)
    assert f"{prefix}{key['Idempotency-Key']}" in stored
    assert all(len(k) <= 255 for k in stored) and len(stored) == 3
    assert await secured.tasks_queued() == 3


async def test_without_keys_idempotency_keys_are_stored_as_given(settings: Settings) -> None:
    async with running(settings) as api:
        key = f"order-{uuid.uuid4()}"
        assert (await api.submit(headers={"Idempotency-Key": key})).status_code == 202
        assert await stored_keys(api) == [key]


async def test_keys_payloads_and_callback_queries_are_never_logged(
    secured: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiso")  # everything aiso logs, at any level
    secret_text = "the-payload-is-private"
    body = {
        **SUBMIT,
        "input": {"payload_type": "text", "payload": {"text": secret_text}},
        "callback_url": f"{PUBLIC_HOOK}?token=callback-secret",
    }
    assert (await secured.submit(body, headers=bearer(CLIENT))).status_code == 202
    await secured.client.get("/v1/pipelines", headers=bearer("wrong-key-value"))
    private = {**body, "callback_url": "http://127.0.0.1/hook?token=callback-secret"}
    assert (await secured.submit(private, headers=bearer(CLIENT))).status_code == 422
    await topology.declare_service(secured.amqp, "stats")
    replay = "/v1/services/stats/dead-letters/replay"
    await secured.client.post(replay, json={"all": True}, headers=bearer(OPERATOR))
    logged = caplog.text
    assert "replayed 0 dead letter(s) of stats" in logged  # by the key's id, not the key
    for secret in (CLIENT, OPERATOR, "wrong-key-value", secret_text, "callback-secret"):
        assert secret not in logged


# --- outbound URLs (SSRF) --------------------------------------------------------------------

PRIVATE_URLS = [
    ("http://127.0.0.1/hook", "127.0.0.1"),
    ("http://10.1.2.3:8080/hook", "10.1.2.3"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ("http://localhost:9000/hook", "localhost"),
    ("https://[::1]/hook", "::1"),
]


@pytest.mark.parametrize(("url", "shown"), PRIVATE_URLS)
async def test_private_callback_urls_are_refused(settings: Settings, url: str, shown: str) -> None:
    async with running(settings) as api:
        problem = assert_problem(
            await api.submit({**SUBMIT, "callback_url": url}), 422, "unsafe-url"
        )
        assert fields(problem) == ["callback_url"]
        message = problem["errors"][0]["message"]
        assert shown in message and "AISO_ALLOW_PRIVATE_URLS" in message
        assert await api.tasks_queued() == 0


def url_task(kind: str, url: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"url": url}
    if kind != "url":
        payload["mime"] = "application/octet-stream"
    return {"pipeline": f"from-{kind}", "input": {"payload_type": kind, "payload": payload}}


@pytest.mark.parametrize("kind", ["url", "audio", "video", "file"])
async def test_private_payload_urls_are_refused(
    settings: Settings, url_manifests: Path, kind: str
) -> None:
    async with running(settings, FileRegistry(url_manifests)) as api:
        for url, shown in PRIVATE_URLS:
            problem = assert_problem(await api.submit(url_task(kind, url)), 422, "unsafe-url")
            assert fields(problem) == ["input.payload.url"]
            assert shown in problem["errors"][0]["message"]
        both = {**url_task(kind, "http://10.0.0.1/x"), "callback_url": "http://127.0.0.1/"}
        problem = assert_problem(await api.submit(both), 422, "unsafe-url")
        assert fields(problem) == ["callback_url", "input.payload.url"]
        accepted = await api.submit(url_task(kind, "https://93.184.216.34/clip"))
        assert accepted.status_code == 202, accepted.text
        assert await api.tasks_queued() == 1


async def test_unresolvable_and_non_http_urls_are_refused(
    settings: Settings, url_manifests: Path
) -> None:
    async with running(settings, FileRegistry(url_manifests)) as api:
        problem = assert_problem(
            await api.submit(url_task("url", "http://no-such-host.invalid/x")), 422, "unsafe-url"
        )
        assert "cannot resolve" in problem["errors"][0]["message"]
        problem = assert_problem(
            await api.submit(url_task("url", "file:///etc/passwd")), 422, "unsafe-url"
        )
        assert "http" in problem["errors"][0]["message"]


async def test_private_urls_pass_when_allowed(settings: Settings, url_manifests: Path) -> None:
    allowing = settings.model_copy(update={"allow_private_urls": True})
    async with running(allowing, FileRegistry(url_manifests)) as api:
        for url, _ in PRIVATE_URLS:
            response = await api.submit({**url_task("audio", url), "callback_url": url})
            assert response.status_code == 202, response.text
        assert await api.tasks_queued() == len(PRIVATE_URLS)


# --- progress webhooks -----------------------------------------------------------------------


async def callback_progress(api: Api, task_id: str) -> bool:
    async with api.gateway.store.engine.connect() as conn:
        query = select(t.tasks.c.callback_progress).where(t.tasks.c.id == task_id)
        return bool((await conn.execute(query)).scalar_one())


async def test_callback_progress_is_stored(settings: Settings) -> None:
    async with running(settings) as api:
        body = {**SUBMIT, "callback_url": PUBLIC_HOOK}
        with_progress = await api.submit({**body, "callback_progress": True})
        assert with_progress.status_code == 202, with_progress.text
        assert await callback_progress(api, with_progress.json()["task_id"]) is True
        without = await api.submit(body)
        assert await callback_progress(api, without.json()["task_id"]) is False

        problem = assert_problem(
            await api.submit({**SUBMIT, "callback_progress": True}), 422, "invalid-request"
        )
        assert fields(problem) == ["callback_progress"]
        problem = assert_problem(
            await api.submit({**SUBMIT, "callback_progress": "sometimes"}), 422, "invalid-request"
        )
        assert fields(problem) == ["callback_progress"]


async def test_no_keys_means_open_v1(settings: Settings) -> None:
    async with running(settings) as api:
        response = await api.client.get("/v1/services/stats/dead-letters")
        assert response.status_code == 200, response.text
        bogus = await api.client.get("/v1/pipelines", headers=bearer("anything"))
        assert bogus.status_code == 200


async def test_openapi_documents_callback_progress(secured: Api) -> None:
    schema = (await secured.client.get("/openapi.json")).json()
    submission = schema["components"]["schemas"]["TaskSubmission"]["properties"]
    assert submission["callback_progress"]["default"] is False
