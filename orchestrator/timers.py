"""Timers that live on the broker, never in process memory.

A timer is a small message published to the delay tier that fits its remaining time; when the
tier's TTL expires RabbitMQ routes it to ``aiso.orchestrator.timers``. A timer that arrives
before it is due is sent on through the next tier (``hop``), so long delays take a few hops and
survive any process dying in between.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel

from aiso import topology
from aiso.store import OutboxMessage
from aiso.store.database import utcnow

__all__ = ["Timer", "TimerKind", "timer_message"]

_TIMER_NAMESPACE = uuid.UUID("8d2f0c3e-7a41-4f0b-b0a5-71e3e2a15000")


class TimerKind(StrEnum):
    STEP_DEADLINE = "step_deadline"  # the attempt has not answered in time
    RETRY = "retry"  # the backoff before the next attempt has passed
    TASK_DEADLINE = "task_deadline"  # the whole task ran out of time


class Timer(BaseModel):
    kind: TimerKind
    task_id: str
    due: datetime
    step: str | None = None
    attempt: int | None = None

    @property
    def id(self) -> str:
        key = f"{self.kind}:{self.task_id}:{self.step}:{self.attempt}"
        return str(uuid.uuid5(_TIMER_NAMESPACE, key))

    def remaining(self) -> float:
        return (self.due - utcnow()).total_seconds()


def timer_message(timer: Timer) -> OutboxMessage:
    """The message that delivers ``timer`` (or its next hop) through a delay tier."""
    tier = topology.delay_plan(timer.remaining())
    return OutboxMessage(
        exchange=topology.delay_exchange(tier),
        routing_key=topology.TIMER_ROUTING_KEY,
        message_id=timer.id,
        body=timer.model_dump_json().encode(),
    )
