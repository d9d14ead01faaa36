"""The built-in ``normalize`` and ``stats`` services: their handlers, and both chained through
the real runtime and broker as the ``text-stats`` pipeline would run them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import httpx
import pytest

from aiso import topology
from aiso.contracts import Data, ResultMessage, TaskMessage, dispatch_id, parse_result
from aiso.errors import PermanentError
from aiso.sdk import Context
from aiso.services import normalize, stats
from harness import make_runtime, running

EXAMPLE = "  Hello   World. Second sentence!  "


def ctx(service: str) -> Context:
    return Context(task_id=uuid.uuid4(), message_id=uuid.uuid4(), service=service)


def run_normalize(text: str) -> dict[str, Any]:
    return normalize.run({"text": text}, {}, ctx("normalize"))


def run_stats(text: str) -> dict[str, Any]:
    return stats.run({"text": text}, {}, ctx("stats"))


# --- normalize -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (EXAMPLE, "Hello World. Second sentence!"),
        ("tabs\tand\nnew\r\nlines", "tabs and new lines"),
        # full-width letters and an ideographic space
        ("\uff46\uff55\uff4c\uff4c\u3000\uff57\uff49\uff44\uff54\uff48", "full width"),
        ("non\u00a0breaking \u2003 em", "non breaking em"),
        ("\ufb01ne ligature, x\u00b2", "fine ligature, x2"),
        ("Cafe\u0301", "Café"),  # combining accent composed
    ],
)
def test_normalize(raw: str, clean: str) -> None:
    assert run_normalize(raw) == {"text": clean}


def test_normalize_keeps_other_fields() -> None:
    out = normalize.run({"text": " a ", "language": "en"}, {}, ctx("normalize"))
    assert out == {"text": "a", "language": "en"}


@pytest.mark.parametrize("raw", ["", "   ", "\n\t\u3000"])
def test_normalize_rejects_empty_text(raw: str) -> None:
    with pytest.raises(PermanentError, match="empty text"):
        run_normalize(raw)


# --- stats ---------------------------------------------------------------------------------


def test_stats_of_the_example() -> None:
    text = run_normalize(EXAMPLE)["text"]
    assert run_stats(text) == {
        "text": "Hello World. Second sentence!",
        "words": 4,
        "sentences": 2,
        "characters": len(text),
    }


@pytest.mark.parametrize(
    ("text", "words", "sentences"),
    [
        ("no terminal punctuation", 3, 1),
        ("Wait... what?! Really…", 3, 3),
        ("naïve café 日本語 don't", 5, 1),
        ("...", 0, 0),
        ("", 0, 0),
    ],
)
def test_stats_counts(text: str, words: int, sentences: int) -> None:
    out = run_stats(text)
    assert (out["words"], out["sentences"], out["characters"]) == (words, sentences, len(text))


def test_declarations_match_the_manifests() -> None:
    for svc in (normalize.service, stats.service):
        assert [t.value for t in svc.input] == ["text"]
        assert svc.output.value == "text"
        assert svc.concurrency == 8


# --- through the runtime -------------------------------------------------------------------


async def call_step(
    channel: aio_pika.abc.AbstractChannel,
    results: aio_pika.abc.AbstractQueue,
    task_id: uuid.UUID,
    step: str,
    payload: dict[str, Any],
) -> ResultMessage:
    """Dispatch one step as the orchestrator does and wait for its result."""
    task = TaskMessage(
        message_id=dispatch_id(task_id, step, 1),
        source_service="orchestrator",
        task_id=task_id,
        pipeline="text-stats",
        step=step,
        data=Data(payload=payload, original_message_id=task_id),
    )
    exchange = await channel.get_exchange(topology.SERVICES_EXCHANGE)
    await exchange.publish(aio_pika.Message(task.to_bytes()), routing_key=step)
    async with asyncio.timeout(15):
        while True:
            message = await results.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            result = parse_result(message.body)
            if result.task_id == task_id and result.step == step:
                return result


async def test_text_stats_chain_over_the_broker(amqp_url: str) -> None:
    async with (
        await aio_pika.connect(amqp_url) as connection,
        running(make_runtime(normalize.service, amqp_url)),
        running(make_runtime(stats.service, amqp_url)),
    ):
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results.bind(topology.RESULTS_EXCHANGE, topology.RESULT_ROUTING_KEY)
        task_id = uuid.uuid4()

        first = await call_step(channel, results, task_id, "normalize", {"text": EXAMPLE})
        assert first.success and first.data is not None
        second = await call_step(channel, results, task_id, "stats", first.data.payload)
        assert second.success and second.data is not None
        assert second.data.payload == {
            "text": "Hello World. Second sentence!",
            "words": 4,
            "sentences": 2,
            "characters": 29,
        }

        empty = await call_step(channel, results, uuid.uuid4(), "normalize", {"text": "  "})
        assert not empty.success and empty.error is not None
        assert (empty.error.code, empty.error.message) == ("PermanentError", "empty text")
        assert empty.error.retryable is False


async def test_process_endpoint(amqp_url: str) -> None:
    async with running(make_runtime(stats.service, amqp_url)) as runtime:
        url = f"http://127.0.0.1:{runtime.port}/v1/process"
        async with httpx.AsyncClient() as client:
            body = {"payload_type": "text", "payload": {"text": "One. Two!"}}
            response = await client.post(url, json=body)
    assert response.status_code == 200
    assert response.json() == {
        "payload_type": "text",
        "payload": {"text": "One. Two!", "words": 2, "sentences": 2, "characters": 9},
    }
