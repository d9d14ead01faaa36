"""Message contracts: the seed's fields survive a JSON round trip; bad messages say why."""

from __future__ import annotations

import json
import uuid

import pytest

from aiso.contracts import (
    Data,
    ErrorInfo,
    MessageType,
    PayloadType,
    ReplayRequest,
    ResultMessage,
    TaskMessage,
    dispatch_id,
    parse_result,
    parse_task,
    result_id,
    validate_payload,
)
from aiso.errors import InvalidMessage, InvalidPayload

TASK = uuid.uuid4()


def task_message(**extra: object) -> TaskMessage:
    return TaskMessage(
        source_service="orchestrator",
        target_services=["stt"],
        task_id=TASK,
        pipeline="voice-to-voice",
        step="transcribe",
        attempt=2,
        data=Data(
            task_type="voice-to-voice",
            payload_type=PayloadType.AUDIO,
            payload={"audio_b64": "UklGRg==", "mime": "audio/wav"},
            callback_url="https://example.com/hook",
            original_message_id=TASK,
            parameters={"language": "en"},
        ),
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        **extra,  # type: ignore[arg-type]
    )


def test_task_message_round_trips_with_the_seed_fields() -> None:
    message = task_message()
    body = message.to_bytes()
    decoded = json.loads(body)
    for field in ("message_id", "message_type", "source_service", "target_services"):
        assert field in decoded
    for field in ("timestamp", "version", "data"):
        assert field in decoded
    assert decoded["message_type"] == "task"
    assert decoded["data"]["original_message_id"] == str(TASK)
    assert parse_task(body) == message


def test_result_message_round_trips_success_and_failure() -> None:
    ok = ResultMessage(
        source_service="stt",
        task_id=TASK,
        step="transcribe",
        data=Data(payload_type=PayloadType.TEXT, payload={"text": "hi"}),
    )
    assert parse_result(ok.to_bytes()) == ok
    failed = ResultMessage(
        source_service="stt",
        task_id=TASK,
        step="transcribe",
        success=False,
        error=ErrorInfo(code="CorruptAudio", message="not audio", retryable=False),
    )
    again = parse_result(failed.to_bytes())
    assert again == failed
    assert again.message_type is MessageType.RESULT
    assert again.error_message == "not audio"  # the seed's field is kept in step


def test_a_successful_result_must_carry_data() -> None:
    with pytest.raises(ValueError, match="carries data"):
        ResultMessage(source_service="stt", task_id=TASK, step="s")


def test_dispatch_and_result_ids_are_deterministic() -> None:
    assert dispatch_id(TASK, "a", 1) == dispatch_id(TASK, "a", 1)
    assert dispatch_id(TASK, "a", 1) != dispatch_id(TASK, "a", 2)
    assert dispatch_id(TASK, "a", 1) != result_id(TASK, "a", 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "TaskMessage"),
        (b"{}", "source_service"),
        (json.dumps({"source_service": "x", "data": {}}).encode(), "task_id and step"),
        (
            json.dumps(
                {"source_service": "x", "data": {}, "message_type": "result", "step": "a"}
            ).encode(),
            "message_type",
        ),
    ],
)
def test_invalid_task_messages_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        parse_task(body)


@pytest.mark.parametrize(
    ("payload_type", "payload", "field"),
    [
        (PayloadType.TEXT, {}, "text"),
        (PayloadType.TEXT, {"text": 3}, "text"),
        (PayloadType.URL, {"url": ""}, "url"),
        (PayloadType.AUDIO, {"mime": "audio/wav"}, "payload"),
        (PayloadType.AUDIO, {"audio_b64": "eA==", "url": "https://x"}, "payload"),
        (PayloadType.ERROR, {"code": "X"}, "message"),
    ],
)
def test_payload_schemas_name_the_field(
    payload_type: PayloadType, payload: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidPayload) as caught:
        validate_payload(payload_type, payload)
    assert caught.value.field == field


def test_valid_payloads_keep_extra_fields() -> None:
    text = validate_payload(PayloadType.TEXT, {"text": "a", "words": 1})
    assert text == {"text": "a", "words": 1}
    audio = validate_payload(PayloadType.AUDIO, {"url": "https://x/a.wav", "mime": "audio/wav"})
    assert audio == {"url": "https://x/a.wav", "mime": "audio/wav"}


def test_replay_request_round_trips() -> None:
    request = ReplayRequest(task_id=TASK, step="transcribe")
    assert ReplayRequest.model_validate_json(request.model_dump_json()) == request
