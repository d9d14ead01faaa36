"""State transitions of a task, each applied once inside the caller's transaction.

Every function here locks the task row, checks that the transition is still valid
(compare-and-set on the task status or the step attempt status), writes the new state and
returns the messages it causes; the caller commits and then publishes them through the
outbox relay. A duplicate or late message fails the check and changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from aiso import topology
from aiso.contracts import Data, PayloadType, ResultMessage, TaskMessage, dispatch_id
from aiso.orchestrator.timers import Timer, TimerKind, timer_message
from aiso.resources import ResolvedPipeline, ResolvedStep
from aiso.store import OutboxMessage, StepStatus, Store, TaskStatus
from aiso.store import tables as t
from aiso.store.database import as_utc, utcnow

__all__ = ["Engine"]

log = logging.getLogger("aiso.orchestrator")

_DONE = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value)


class Engine:
    """Applies task starts, step results and timers to the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- helpers -----------------------------------------------------------------------------

    async def _lock_task(self, conn: AsyncConnection, task_id: str) -> Any:
        query = select(t.tasks).where(t.tasks.c.id == task_id)
        return (await conn.execute(self.store.for_update(query))).first()

    async def _step_input(
        self, conn: AsyncConnection, task: Any, step: ResolvedStep
    ) -> dict[str, Any]:
        if not step.depends_on:
            return dict(task.input)
        row = (
            await conn.execute(
                select(t.step_attempts.c.output).where(
                    t.step_attempts.c.task_id == task.id,
                    t.step_attempts.c.step == step.depends_on[0],
                    t.step_attempts.c.status.in_(_DONE),
                )
            )
        ).first()
        if row is None or row.output is None:
            raise RuntimeError(f"task {task.id}: step {step.depends_on[0]!r} has no output")
        return dict(row.output)

    async def _event(
        self, conn: AsyncConnection, task_id: str, kind: str, **data: Any
    ) -> OutboxMessage:
        return await self.store.add_event(conn, task_id, kind, data)

    async def _dispatch(
        self,
        conn: AsyncConnection,
        task: Any,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        *,
        scheduled: bool = False,
    ) -> list[OutboxMessage]:
        """Send one attempt of ``step`` to its service, with its deadline timer."""
        now = utcnow()
        task_deadline = _deadline(task)
        deadline = min(now + timedelta(seconds=step.timeout_seconds), task_deadline)
        message_id = dispatch_id(uuid.UUID(task.id), step.name, attempt)
        values = {
            "service": step.service,
            "status": StepStatus.DISPATCHED.value,
            "message_id": str(message_id),
            "dispatched_at": now,
        }
        if scheduled:
            await conn.execute(
                update(t.step_attempts)
                .where(
                    t.step_attempts.c.task_id == task.id,
                    t.step_attempts.c.step == step.name,
                    t.step_attempts.c.attempt == attempt,
                )
                .values(**values)
            )
        else:
            await conn.execute(
                insert(t.step_attempts).values(
                    task_id=task.id, step=step.name, attempt=attempt, **values
                )
            )
        incoming = await self._step_input(conn, task, step)
        parameters = {**step.parameters, **(task.parameters or {}).get(step.name, {})}
        message = TaskMessage(
            message_id=message_id,
            source_service="orchestrator",
            target_services=[step.service],
            task_id=uuid.UUID(task.id),
            pipeline=plan.name,
            step=step.name,
            attempt=attempt,
            deadline=deadline,
            data=Data(
                task_type=plan.name,
                payload_type=PayloadType(incoming["payload_type"]),
                payload=incoming["payload"],
                callback_url=task.callback_url,
                original_message_id=uuid.UUID(task.id),
                parameters=parameters,
            ),
        )
        deadline_timer = Timer(
            kind=TimerKind.STEP_DEADLINE,
            task_id=task.id,
            step=step.name,
            attempt=attempt,
            due=deadline,
        )
        return [
            OutboxMessage(
                exchange=topology.SERVICES_EXCHANGE,
                routing_key=step.service,
                message_id=str(message_id),
                body=message.to_bytes(),
            ),
            timer_message(deadline_timer),
            await self._event(
                conn,
                task.id,
                "step.dispatched",
                step=step.name,
                service=step.service,
                attempt=attempt,
            ),
        ]

    async def _advance(
        self, conn: AsyncConnection, task: Any, plan: ResolvedPipeline
    ) -> list[OutboxMessage]:
        """Dispatch every step that became ready, or finish the task when all are done."""
        rows = (
            await conn.execute(
                select(
                    t.step_attempts.c.step, t.step_attempts.c.status, t.step_attempts.c.output
                ).where(t.step_attempts.c.task_id == task.id)
            )
        ).all()
        done = {r.step for r in rows if r.status in _DONE}
        started = {r.step for r in rows}
        if len(done) == len(plan.steps):
            sink = plan.sinks()[0]
            output = next(r.output for r in rows if r.step == sink.name and r.status in _DONE)
            return await self.store.finish_task(conn, task.id, TaskStatus.SUCCEEDED, result=output)
        messages: list[OutboxMessage] = []
        for step in plan.ready_steps(done):
            if step.name not in started:
                messages += await self._dispatch(conn, task, plan, step, 1)
        return messages

    # --- transitions -------------------------------------------------------------------------

    async def start(self, conn: AsyncConnection, task_id: str) -> list[OutboxMessage]:
        """pending → running: dispatch the first steps and arm the task deadline."""
        task = await self._lock_task(conn, task_id)
        if task is None or task.status != TaskStatus.PENDING:
            return []
        now = utcnow()
        await conn.execute(
            update(t.tasks)
            .where(t.tasks.c.id == task_id)
            .values(status=TaskStatus.RUNNING.value, started_at=now, updated_at=now)
        )
        plan = ResolvedPipeline.model_validate(task.plan)
        deadline = Timer(kind=TimerKind.TASK_DEADLINE, task_id=task_id, due=_deadline(task))
        messages = [
            await self._event(conn, task_id, "started", status=TaskStatus.RUNNING.value),
            timer_message(deadline),
        ]
        return messages + await self._advance(conn, task, plan)

    async def apply_result(
        self, conn: AsyncConnection, result: ResultMessage
    ) -> list[OutboxMessage]:
        """dispatched → succeeded/failed for exactly one attempt; duplicates change nothing."""
        task_id = str(result.task_id)
        task = await self._lock_task(conn, task_id)
        if task is None or TaskStatus(task.status).terminal:
            return []
        step_name, attempt = result.step or "", result.attempt
        now = utcnow()
        meta = result.data.execution_metadata if result.data else {}
        if result.success and result.data is not None:
            values: dict[str, Any] = {
                "status": StepStatus.SUCCEEDED.value,
                "output": {
                    "payload_type": result.data.payload_type.value,
                    "payload": result.data.payload,
                },
            }
        else:
            error = result.error.model_dump() if result.error else {"message": "failed"}
            values = {"status": StepStatus.FAILED.value, "error": error}
        changed = await conn.execute(
            update(t.step_attempts)
            .where(
                t.step_attempts.c.task_id == task_id,
                t.step_attempts.c.step == step_name,
                t.step_attempts.c.attempt == attempt,
                t.step_attempts.c.status == StepStatus.DISPATCHED.value,
            )
            .values(finished_at=now, replica=meta.get("replica") or result.source_service, **values)
        )
        if changed.rowcount != 1:
            log.debug("ignored duplicate or late result %s", result.message_id)
            return []
        plan = ResolvedPipeline.model_validate(task.plan)
        step = plan.step(step_name)
        if values["status"] == StepStatus.SUCCEEDED.value:
            messages = [
                await self._event(
                    conn,
                    task_id,
                    "step.succeeded",
                    step=step_name,
                    service=step.service,
                    attempt=attempt,
                )
            ]
            return messages + await self._advance(conn, task, plan)
        return await self._failed(conn, task, plan, step, attempt, values["error"])

    async def _failed(
        self,
        conn: AsyncConnection,
        task: Any,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        error: dict[str, Any],
        kind: str = "step.failed",
    ) -> list[OutboxMessage]:
        """Retry the step if the error allows it and attempts remain; else fail the task."""
        base = {"step": step.name, "service": step.service, "attempt": attempt}
        messages = [await self._event(conn, task.id, kind, **base, error=error)]
        if error.get("retryable", True) and attempt < step.retry.max_attempts:
            delay = max(
                step.retry.delay_before(attempt + 1),
                float(error.get("details", {}).get("delay") or 0),
            )
            due = utcnow() + timedelta(seconds=delay)
            await conn.execute(
                insert(t.step_attempts).values(
                    task_id=task.id,
                    step=step.name,
                    attempt=attempt + 1,
                    service=step.service,
                    status=StepStatus.SCHEDULED.value,
                    message_id=str(dispatch_id(uuid.UUID(task.id), step.name, attempt + 1)),
                    dispatched_at=due,
                )
            )
            retry = Timer(
                kind=TimerKind.RETRY, task_id=task.id, step=step.name, attempt=attempt + 1, due=due
            )
            messages.append(timer_message(retry))
            messages.append(
                await self._event(
                    conn,
                    task.id,
                    "step.retrying",
                    step=step.name,
                    service=step.service,
                    attempt=attempt + 1,
                    delay_seconds=delay,
                )
            )
            return messages
        task_error = {
            **base,
            "code": error.get("code", "Failed"),
            "message": error.get("message", ""),
        }
        return messages + await self.store.finish_task(
            conn, task.id, TaskStatus.FAILED, error=task_error
        )

    async def fire(self, conn: AsyncConnection, timer: Timer) -> list[OutboxMessage]:
        """A due timer: time out an attempt, start a retry, or time out the task."""
        task = await self._lock_task(conn, timer.task_id)
        if task is None or TaskStatus(task.status).terminal:
            return []
        if timer.kind is TimerKind.TASK_DEADLINE:
            error = {"code": "TaskTimeout", "message": "the pipeline's timeoutSeconds passed"}
            return await self.store.finish_task(conn, task.id, TaskStatus.TIMED_OUT, error=error)
        plan = ResolvedPipeline.model_validate(task.plan)
        step = plan.step(timer.step or "")
        attempt = timer.attempt or 1
        if timer.kind is TimerKind.RETRY:
            pending = (
                await conn.execute(
                    select(t.step_attempts.c.id).where(
                        t.step_attempts.c.task_id == task.id,
                        t.step_attempts.c.step == step.name,
                        t.step_attempts.c.attempt == attempt,
                        t.step_attempts.c.status == StepStatus.SCHEDULED.value,
                    )
                )
            ).first()
            if pending is None:
                return []
            return await self._dispatch(conn, task, plan, step, attempt, scheduled=True)
        error = {
            "code": "StepTimeout",
            "message": f"no result within {step.timeout_seconds:g}s",
            "retryable": True,
        }
        changed = await conn.execute(
            update(t.step_attempts)
            .where(
                t.step_attempts.c.task_id == task.id,
                t.step_attempts.c.step == step.name,
                t.step_attempts.c.attempt == attempt,
                t.step_attempts.c.status == StepStatus.DISPATCHED.value,
            )
            .values(status=StepStatus.TIMED_OUT.value, finished_at=utcnow(), error=error)
        )
        if changed.rowcount != 1:
            return []
        return await self._failed(conn, task, plan, step, attempt, error, kind="step.timed_out")


def _deadline(task: Any) -> datetime:
    deadline = as_utc(task.deadline_at)
    assert deadline is not None  # the column is NOT NULL
    return deadline
