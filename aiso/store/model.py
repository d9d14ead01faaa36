"""Records read from the store, and the states a task and a step attempt go through."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "TERMINAL_EVENT_KINDS",
    "EventRecord",
    "OutboxMessage",
    "StepRecord",
    "StepStatus",
    "TaskRecord",
    "TaskStatus",
]


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


TERMINAL_EVENT_KINDS = frozenset(s.value for s in TaskStatus if s.terminal)
"""Kinds of the event that ends a task: it is named after the status the task ends in."""


class StepStatus(StrEnum):
    SCHEDULED = "scheduled"  # a retry waiting for its backoff to pass
    DISPATCHED = "dispatched"  # sent to the service, no result applied yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # a fallback passed the step's input through

    @property
    def open(self) -> bool:
        return self in (StepStatus.SCHEDULED, StepStatus.DISPATCHED)


@dataclass(frozen=True)
class OutboxMessage:
    """A message to publish once its transaction commits."""

    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class TaskRecord:
    id: str
    pipeline: str
    status: TaskStatus
    input: dict[str, Any]
    parameters: dict[str, Any]
    callback_url: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StepRecord:
    task_id: str
    step: str
    attempt: int
    service: str
    status: StepStatus
    message_id: str
    output: dict[str, Any] | None
    error: dict[str, Any] | None
    replica: str | None
    dispatched_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class EventRecord:
    id: int
    task_id: str
    kind: str
    data: dict[str, Any]
    created_at: datetime
