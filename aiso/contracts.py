"""Message contracts on the wire.

The seed's models and field names are kept (``PayloadType``, ``MessageType``, ``Data``,
``BaseMessage``, ``TaskMessage``, ``ResultMessage``) and extended with what the flow needs:
the task's pipeline, step and attempt, a deadline, trace context and a typed ``ErrorInfo``.
``Data.original_message_id`` is the task id through the whole task.

Per-payload-type schemas (``TextPayload``, ``AudioPayload``, …) are checked by
``validate_payload`` at the gateway and in the service runtime.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aiso.errors import InvalidMessage, InvalidPayload

__all__ = [
    "PROTOCOL_VERSION",
    "AudioPayload",
    "BaseMessage",
    "Data",
    "ErrorInfo",
    "ErrorPayload",
    "FilePayload",
    "MessageType",
    "PayloadType",
    "ReplayRequest",
    "ResultMessage",
    "TaskMessage",
    "TextPayload",
    "UrlPayload",
    "VideoPayload",
    "dispatch_id",
    "parse_result",
    "parse_task",
    "result_id",
    "validate_payload",
]

PROTOCOL_VERSION = "2.0"

# A fixed namespace makes dispatch and result ids deterministic across processes.
_ID_NAMESPACE = uuid.UUID("6f1e8d5c-4b7a-4c1e-9d3e-a150a1500000")


class PayloadType(str, Enum):
    TEXT = "text"
    URL = "url"
    AUDIO = "audio"
    VIDEO = "video"
    FILE = "file"
    ERROR = "error"


class MessageType(str, Enum):
    TASK = "task"
    RESULT = "result"
    ERROR = "error"
    STATUS = "status"


# --- payload schemas -------------------------------------------------------------------------


class _Payload(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPayload(_Payload):
    text: str


class UrlPayload(_Payload):
    url: str = Field(min_length=1)


class _BinaryPayload(_Payload):
    """Inline base64 data or a URL to fetch, plus the MIME type."""

    url: str | None = None
    mime: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _BinaryPayload:
        inline = self._inline()
        if (inline is None) == (self.url is None):
            raise ValueError(f"give exactly one of '{self._inline_field()}' or 'url'")
        return self

    def _inline_field(self) -> str:
        raise NotImplementedError

    def _inline(self) -> str | None:
        value = getattr(self, self._inline_field(), None)
        return value if isinstance(value, str) else None


class AudioPayload(_BinaryPayload):
    audio_b64: str | None = None

    def _inline_field(self) -> str:
        return "audio_b64"


class VideoPayload(_BinaryPayload):
    video_b64: str | None = None

    def _inline_field(self) -> str:
        return "video_b64"


class FilePayload(_BinaryPayload):
    data_b64: str | None = None
    filename: str | None = None

    def _inline_field(self) -> str:
        return "data_b64"


class ErrorPayload(_Payload):
    code: str
    message: str


_PAYLOAD_SCHEMAS: dict[PayloadType, type[_Payload]] = {
    PayloadType.TEXT: TextPayload,
    PayloadType.URL: UrlPayload,
    PayloadType.AUDIO: AudioPayload,
    PayloadType.VIDEO: VideoPayload,
    PayloadType.FILE: FilePayload,
    PayloadType.ERROR: ErrorPayload,
}


def validate_payload(payload_type: PayloadType, payload: Any) -> dict[str, Any]:
    """Check ``payload`` against the schema of ``payload_type``; return it as a plain dict.

    Raises ``InvalidPayload`` whose ``field`` names the first offending field.
    """
    schema = _PAYLOAD_SCHEMAS[payload_type]
    try:
        return schema.model_validate(payload).model_dump(exclude_none=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise InvalidPayload(
            f"{payload_type.value} payload: {where}: {first['msg']}", field=where
        ) from None


# --- messages --------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    """A failure, typed: ``retryable`` decides whether the orchestrator tries again."""

    code: str = Field(description="Stable machine-readable code, e.g. 'InvalidInput'.")
    message: str = Field(description="Human-readable explanation.")
    retryable: bool = Field(default=True, description="False for permanent failures.")
    details: dict[str, Any] = Field(default_factory=dict)


class Data(BaseModel):
    """Universal data container for tasks and results (seed model)."""

    task_type: str | None = None
    payload_type: PayloadType = PayloadType.TEXT
    payload: dict[str, Any] = Field(default_factory=dict)
    wrapper_callback_url: str | None = None
    callback_url: str | None = None
    original_message_id: uuid.UUID | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    execution_metadata: dict[str, Any] = Field(default_factory=dict)


class BaseMessage(BaseModel):
    """Base of every message in the system (seed model, extended)."""

    message_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    message_type: MessageType
    source_service: str
    target_services: list[str] = Field(default_factory=list)
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    version: str = PROTOCOL_VERSION
    data: Data

    # Extensions: where this message sits in a task.
    task_id: uuid.UUID | None = None
    pipeline: str | None = None
    step: str | None = None
    attempt: int = Field(default=1, ge=1)
    deadline: datetime | None = None
    trace: dict[str, str] = Field(
        default_factory=dict, description="W3C trace context ('traceparent', 'tracestate')."
    )

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class TaskMessage(BaseMessage):
    """A unit of work for a service (seed model)."""

    message_type: Literal[MessageType.TASK] = MessageType.TASK


class ResultMessage(BaseMessage):
    """The outcome of a task message (seed model, plus a typed ``error``)."""

    message_type: Literal[MessageType.RESULT] = MessageType.RESULT
    data: Data | None = None  # type: ignore[assignment]  # absent on failure, as in the seed
    success: bool = True
    error_message: str | None = None
    error: ErrorInfo | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ResultMessage:
        if self.success and self.data is None:
            raise ValueError("a successful result carries data")
        if not self.success and self.error is None:
            self.error = ErrorInfo(code="Failed", message=self.error_message or "failed")
        if self.error is not None and self.error_message is None:
            self.error_message = self.error.message
        return self


class ReplayRequest(BaseModel):
    """Asks the orchestrator to re-run a failed task from ``step`` (``aiso dead replay``)."""

    task_id: uuid.UUID
    step: str
    requested_by: str = "aiso"


def dispatch_id(task_id: uuid.UUID, step: str, attempt: int) -> uuid.UUID:
    """Message id of a step dispatch: the same for a re-sent copy of the same attempt."""
    return uuid.uuid5(_ID_NAMESPACE, f"dispatch:{task_id}:{step}:{attempt}")


def result_id(task_id: uuid.UUID, step: str, attempt: int) -> uuid.UUID:
    """Message id of a step result: duplicates of the same outcome share it."""
    return uuid.uuid5(_ID_NAMESPACE, f"result:{task_id}:{step}:{attempt}")


_M = TypeVar("_M", bound=BaseMessage)


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise InvalidMessage(f"{model.__name__}: {where}: {first['msg']}") from None


def parse_task(body: bytes) -> TaskMessage:
    """Decode a task message; ``InvalidMessage`` says what is wrong."""
    message = _parse(TaskMessage, body)
    if message.task_id is None or message.step is None:
        raise InvalidMessage("TaskMessage: task_id and step are required")
    return message


def parse_result(body: bytes) -> ResultMessage:
    """Decode a result message; ``InvalidMessage`` says what is wrong."""
    message = _parse(ResultMessage, body)
    if message.task_id is None or message.step is None:
        raise InvalidMessage("ResultMessage: task_id and step are required")
    return message
