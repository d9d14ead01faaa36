"""Timers that live on the broker, never in process memory.

Timers are small messages published to the delay tier that fits their remaining time; when the
tier's TTL expires RabbitMQ routes them to ``aiso.orchestrator.timers``. A timer that arrives
before it is due is sent on through the next tier, so long delays take a few hops and survive
any process dying in between.

The timers one transaction arms for the same tier travel in one message: under load every
dispatch arms a step deadline, and one message per batch instead of one per dispatch spares
the broker and the orchestrator most of that traffic. Timers are idempotent (each firing is a
compare-and-set), so a message delivered twice or a batch fired partly twice is harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field
from sqlalchemy import BindParameter, Connection, bindparam, select

from aiso import topology
from aiso.store import OutboxMessage, StepStatus, TaskStatus
from aiso.store import tables as t
from aiso.store.database import utcnow

__all__ = ["Timer", "TimerKind", "live_timers", "parse_timers", "timer_messages"]

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


class _TimerBatch(BaseModel):
    timers: list[Timer] = Field(min_length=1)


def parse_timers(body: bytes) -> list[Timer]:
    """The timers of one message; ``ValidationError`` if it is not a timer message."""
    return _TimerBatch.model_validate_json(body).timers


def timer_messages(timers: Sequence[Timer]) -> list[OutboxMessage]:
    """The messages that deliver ``timers`` (or their next hop): one per delay tier."""
    by_tier: dict[topology.DelayTier, list[Timer]] = {}
    for timer in timers:
        by_tier.setdefault(topology.delay_plan(timer.remaining()), []).append(timer)
    return [
        OutboxMessage(
            exchange=topology.delay_exchange(tier),
            routing_key=topology.TIMER_ROUTING_KEY,
            message_id=str(uuid.uuid5(_TIMER_NAMESPACE, ",".join(t.id for t in group))),
            body=_TimerBatch(timers=group).model_dump_json().encode(),
        )
        for tier, group in by_tier.items()
    ]


# What a timer waits for, by kind: the attempt status it acts on (None: the task's deadline).
_WAITS_FOR = {
    TimerKind.STEP_DEADLINE: StepStatus.DISPATCHED.value,
    TimerKind.RETRY: StepStatus.SCHEDULED.value,
    TimerKind.TASK_DEADLINE: None,
}
_IDS: BindParameter[list[str]] = bindparam("ids", expanding=True)
_TASK_STATUS = select(t.tasks.c.id, t.tasks.c.status).where(t.tasks.c.id.in_(_IDS))
_ATTEMPT_STATUS = select(
    t.step_attempts.c.task_id,
    t.step_attempts.c.step,
    t.step_attempts.c.attempt,
    t.step_attempts.c.status,
).where(t.step_attempts.c.task_id.in_(_IDS))


def live_timers(conn: Connection, timers: Sequence[Timer]) -> list[Timer]:
    """The timers that may still act, read without locks: most step deadlines come back long
    after their step ended, and dropping those here saves their next hop or a transaction.

    Safe without a lock because the states it drops for never come back: an attempt leaves
    ``dispatched`` or ``scheduled`` for good (a replay makes a new attempt), and a task
    that ends and is replayed arms a new deadline timer.
    """
    ids = sorted({timer.task_id for timer in timers})
    tasks = {row.id: TaskStatus(row.status) for row in conn.execute(_TASK_STATUS, {"ids": ids})}
    attempts = {
        (row.task_id, row.step, row.attempt): row.status
        for row in conn.execute(_ATTEMPT_STATUS, {"ids": ids})
    }

    def live(timer: Timer) -> bool:
        status = tasks.get(timer.task_id)
        if status is None or status.terminal:
            return False
        waits_for = _WAITS_FOR[timer.kind]
        if waits_for is None:
            return True
        found = attempts.get((timer.task_id, timer.step, timer.attempt or 1))
        return found is None or found == waits_for

    return [timer for timer in timers if live(timer)]
