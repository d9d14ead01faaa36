"""State transitions of a task, each applied once inside the caller's transaction.

Every function here locks the task row, checks that the transition is still valid
(compare-and-set on the task status or the step attempt status), writes the new state and
returns the messages it causes; the caller commits and then publishes them through the
outbox relay. A duplicate or late message fails the check and changes nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from aiso import topology
from aiso.contracts import Data, PayloadType, ResultMessage, TaskMessage, dispatch_id
from aiso.orchestrator import breaker
from aiso.orchestrator.timers import Timer, TimerKind, timer_message
from aiso.resources import ResolvedPipeline, ResolvedStep
from aiso.store import OutboxMessage, StepStatus, Store, TaskStatus
from aiso.store import tables as t
from aiso.store.database import as_utc, utcnow

__all__ = ["Engine"]

log = logging.getLogger("aiso.orchestrator")

Task = Row[Any]
_DONE = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value)
_PLAN_CACHE_SIZE = 4096
_A = t.step_attempts.c


def _attempt_is(task_id: str, step: str, attempt: int, status: StepStatus) -> Any:
    return (
        (_A.task_id == task_id)
        & (_A.step == step)
        & (_A.attempt == attempt)
        & (_A.status == status.value)
    )


def _deadline(task: Task) -> datetime:
    return as_utc(task.deadline_at) or datetime.now(UTC)


class Engine:
    """Applies task starts, step results, timers and replays to the store."""

    def __init__(self, store: Store, watch: breaker.BreakerWatch | None = None) -> None:
        self.store = store
        self.watch = watch
        self._plans: OrderedDict[str, ResolvedPipeline] = OrderedDict()

    def _plan(self, task: Task) -> ResolvedPipeline:
        """The task's plan snapshot, parsed once per task while it is hot."""
        plan = self._plans.get(task.id)
        if plan is None:
            plan = ResolvedPipeline.model_validate(task.plan)
            self._plans[task.id] = plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    # --- reading -------------------------------------------------------------------------------

    async def _lock_task(self, conn: AsyncConnection, task_id: str) -> Task | None:
        query = select(t.tasks).where(t.tasks.c.id == task_id)
        return (await conn.execute(self.store.for_update(query))).first()

    async def _step_input(
        self,
        conn: AsyncConnection,
        task: Task,
        step: ResolvedStep,
        known: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The payload a step gets: the task input, or its dependency's stored output."""
        if not step.depends_on:
            return dict(task.input)
        if known is not None and step.depends_on[0] in known:
            return dict(known[step.depends_on[0]])
        row = (
            await conn.execute(
                select(_A.output).where(
                    _A.task_id == task.id, _A.step == step.depends_on[0], _A.status.in_(_DONE)
                )
            )
        ).first()
        if row is None or row.output is None:
            raise RuntimeError(f"task {task.id}: step {step.depends_on[0]!r} has no output")
        return dict(row.output)

    async def _event(
        self, conn: AsyncConnection, task: Task, kind: str, **data: Any
    ) -> OutboxMessage:
        """Record a progress event; a task that asked for progress also gets it by webhook."""
        message = await self.store.add_event(conn, task.id, kind, data)
        if task.callback_progress and task.callback_url:
            await self.store.schedule_webhook(
                conn,
                task_id=task.id,
                url=task.callback_url,
                event=kind,
                key=message.message_id,
                data={"task_id": task.id, "kind": kind, **data},
            )
        return message

    async def _task_message(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        service: str,
        deadline: datetime,
        known: dict[str, Any] | None = None,
    ) -> TaskMessage:
        incoming = await self._step_input(conn, task, step, known)
        return TaskMessage(
            message_id=dispatch_id(uuid.UUID(task.id), step.name, attempt),
            source_service="orchestrator",
            target_services=[service],
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
                parameters={**step.parameters, **(task.parameters or {}).get(step.name, {})},
            ),
        )

    # --- dispatching ---------------------------------------------------------------------------

    async def _write_attempt(
        self,
        conn: AsyncConnection,
        task: Task,
        step: ResolvedStep,
        attempt: int,
        values: dict[str, Any],
        *,
        exists: bool,
    ) -> None:
        if exists:
            await conn.execute(
                update(t.step_attempts)
                .where((_A.task_id == task.id) & (_A.step == step.name) & (_A.attempt == attempt))
                .values(**values)
            )
        else:
            await conn.execute(
                insert(t.step_attempts).values(
                    task_id=task.id,
                    step=step.name,
                    attempt=attempt,
                    message_id=str(dispatch_id(uuid.UUID(task.id), step.name, attempt)),
                    **{"service": step.service, **values},
                )
            )

    async def _dispatch(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        *,
        exists: bool = False,
        service: str | None = None,
        known: dict[str, Any] | None = None,
    ) -> list[OutboxMessage]:
        """Send one attempt of ``step`` to its service, if that service's breaker admits it.

        ``known`` holds outputs the caller already read, keyed by step, to spare a query.
        """
        target = service or step.service
        now = utcnow()
        if service is None and (
            self.watch is None or self.watch.needs_check(target, step.circuit_breaker)
        ):
            admission = await breaker.admit(
                self.store, conn, target, step.circuit_breaker, step.timeout_seconds
            )
            if not admission.allowed:
                return await self._hold(conn, task, plan, step, attempt, admission, exists=exists)
        deadline = min(now + timedelta(seconds=step.timeout_seconds), _deadline(task))
        values = {"service": target, "status": StepStatus.DISPATCHED.value, "dispatched_at": now}
        await self._write_attempt(conn, task, step, attempt, values, exists=exists)
        message = await self._task_message(conn, task, plan, step, attempt, target, deadline, known)
        timer = Timer(
            kind=TimerKind.STEP_DEADLINE,
            task_id=task.id,
            step=step.name,
            attempt=attempt,
            due=deadline,
        )
        return [
            OutboxMessage(
                topology.SERVICES_EXCHANGE, target, str(message.message_id), message.to_bytes()
            ),
            timer_message(timer),
            await self._event(
                conn, task, "step.dispatched", step=step.name, service=target, attempt=attempt
            ),
        ]

    async def _hold(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        admission: breaker.Admission,
        *,
        exists: bool,
    ) -> list[OutboxMessage]:
        """The breaker is open: take the fallback, or wait in the delay tiers."""
        reason = f"circuit breaker of {step.service!r} is {admission.state.value}"
        if step.fallback is not None:
            return await self._fallback(conn, task, plan, step, attempt, reason, exists=exists)
        retry_at = admission.retry_at or utcnow() + timedelta(seconds=1)
        values = {"status": StepStatus.SCHEDULED.value, "dispatched_at": retry_at}
        await self._write_attempt(conn, task, step, attempt, values, exists=exists)
        timer = Timer(
            kind=TimerKind.RETRY, task_id=task.id, step=step.name, attempt=attempt, due=retry_at
        )
        return [
            timer_message(timer),
            await self._event(
                conn,
                task,
                "step.waiting",
                step=step.name,
                service=step.service,
                attempt=attempt,
                reason=reason,
            ),
        ]

    async def _fallback(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        reason: str,
        *,
        exists: bool,
    ) -> list[OutboxMessage]:
        """Run the step's declared fallback: pass the input through, or another service."""
        assert step.fallback is not None
        if step.fallback.type == "service":
            messages = [
                await self._event(
                    conn,
                    task,
                    "step.fallback",
                    step=step.name,
                    service=step.fallback.service,
                    attempt=attempt,
                    reason=reason,
                )
            ]
            return messages + await self._dispatch(
                conn, task, plan, step, attempt, exists=exists, service=step.fallback.service
            )
        now = utcnow()
        values = {
            "status": StepStatus.SKIPPED.value,
            "output": await self._step_input(conn, task, step),
            "error": {"code": "FallbackSkip", "message": f"skipped: {reason}", "retryable": False},
            "dispatched_at": now,
            "finished_at": now,
        }
        await self._write_attempt(conn, task, step, attempt, values, exists=exists)
        skipped = await self._event(
            conn,
            task,
            "step.skipped",
            step=step.name,
            service=step.service,
            attempt=attempt,
            reason=reason,
        )
        return [skipped, *await self._advance(conn, task, plan)]

    async def _advance(
        self, conn: AsyncConnection, task: Task, plan: ResolvedPipeline
    ) -> list[OutboxMessage]:
        """Dispatch every step that became ready, or finish the task when all are done."""
        rows = (
            await conn.execute(select(_A.step, _A.status, _A.output).where(_A.task_id == task.id))
        ).all()
        done = {r.step for r in rows if r.status in _DONE}
        started = {r.step for r in rows}
        outputs = {r.step: r.output for r in rows if r.status in _DONE}
        if len(done) == len(plan.steps):
            sink = plan.sinks()[0]
            output = next(r.output for r in rows if r.step == sink.name and r.status in _DONE)
            degraded = sorted(r.step for r in rows if r.status == StepStatus.SKIPPED.value)
            return await self.store.finish_task(
                conn, task.id, TaskStatus.SUCCEEDED, result=output, degraded=degraded
            )
        messages: list[OutboxMessage] = []
        for step in plan.ready_steps(done):
            if step.name not in started:
                messages += await self._dispatch(conn, task, plan, step, 1, known=outputs)
        return messages

    # --- transitions ---------------------------------------------------------------------------

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
        plan = self._plan(task)
        deadline = Timer(kind=TimerKind.TASK_DEADLINE, task_id=task_id, due=_deadline(task))
        messages = [
            await self._event(conn, task, "started", status=TaskStatus.RUNNING.value),
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
            .where(_attempt_is(task_id, step_name, attempt, StepStatus.DISPATCHED))
            .values(
                finished_at=utcnow(), replica=meta.get("replica") or result.source_service, **values
            )
            .returning(_A.service)
        )
        row = changed.first()
        if row is None:
            log.debug("ignored duplicate or late result %s", result.message_id)
            return []
        plan = self._plan(task)
        step = plan.step(step_name)
        succeeded = values["status"] == StepStatus.SUCCEEDED.value
        # Only a failure that may pass with time says something about the service's health.
        unhealthy = not succeeded and bool(values["error"].get("retryable", True))
        messages = await self._breaker(conn, task, row.service, step, failed=unhealthy)
        if succeeded:
            messages.append(
                await self._event(
                    conn,
                    task,
                    "step.succeeded",
                    step=step_name,
                    service=row.service,
                    attempt=attempt,
                )
            )
            return messages + await self._advance(conn, task, plan)
        return messages + await self._failed(
            conn, task, plan, step, attempt, row.service, values["error"]
        )

    async def _breaker(
        self, conn: AsyncConnection, task: Task, service: str, step: ResolvedStep, *, failed: bool
    ) -> list[OutboxMessage]:
        if self.watch is not None:
            if failed:
                self.watch.mark(service)
            elif not self.watch.needs_check(service, step.circuit_breaker):
                return []
        changed = await breaker.record(
            self.store, conn, service, step.circuit_breaker, failed=failed
        )
        if changed is None:
            return []
        log.warning("circuit breaker of %s is now %s", service, changed.value)
        return [
            OutboxMessage(
                topology.EVENTS_EXCHANGE,
                f"service.{service}.breaker",
                f"breaker-{service}-{uuid.uuid4()}",
                json.dumps({"service": service, "breaker": changed.value}).encode(),
            )
        ]

    async def _failed(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        service: str,
        error: dict[str, Any],
        kind: str = "step.failed",
    ) -> list[OutboxMessage]:
        """Retry if the error allows and attempts remain; else fallback, or fail the task."""
        base = {"step": step.name, "service": service, "attempt": attempt}
        messages = [await self._event(conn, task, kind, **base, error=error)]
        on_fallback = step.fallback is not None and service != step.service
        if error.get("retryable", True) and attempt < step.retry.max_attempts and not on_fallback:
            hint = float((error.get("details") or {}).get("delay") or 0)
            delay = max(step.retry.delay_before(attempt + 1), hint)
            due = utcnow() + timedelta(seconds=delay)
            values = {"status": StepStatus.SCHEDULED.value, "dispatched_at": due}
            await self._write_attempt(conn, task, step, attempt + 1, values, exists=False)
            retry = Timer(
                kind=TimerKind.RETRY, task_id=task.id, step=step.name, attempt=attempt + 1, due=due
            )
            retrying = await self._event(
                conn,
                task,
                "step.retrying",
                **{**base, "attempt": attempt + 1},
                delay_seconds=delay,
            )
            return [*messages, timer_message(retry), retrying]
        messages.append(await self._dead_letter(conn, task, plan, step, attempt, service, error))
        if step.fallback is not None and not on_fallback:
            reason = f"{service} failed: {error.get('message', '')}"
            return messages + await self._fallback(
                conn, task, plan, step, attempt + 1, reason, exists=False
            )
        task_error = {
            **base,
            "code": error.get("code", "Failed"),
            "message": error.get("message", ""),
        }
        return messages + await self.store.finish_task(
            conn, task.id, TaskStatus.FAILED, error=task_error
        )

    async def _dead_letter(
        self,
        conn: AsyncConnection,
        task: Task,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        service: str,
        error: dict[str, Any],
    ) -> OutboxMessage:
        """The failed step's message, parked in ``aiso.svc.<service>.dead`` with its history."""
        history = (
            await conn.execute(
                select(_A.attempt, _A.status, _A.error)
                .where((_A.task_id == task.id) & (_A.step == step.name))
                .order_by(_A.attempt)
            )
        ).all()
        message = await self._task_message(
            conn, task, plan, step, attempt, service, _deadline(task)
        )
        return OutboxMessage(
            exchange=topology.DEAD_EXCHANGE,
            routing_key=service,
            message_id=str(message.message_id),
            body=message.to_bytes(),
            headers={
                "x-aiso-reason": f"{error.get('code', 'Failed')}: {error.get('message', '')}",
                "x-aiso-service": service,
                "x-aiso-task-id": task.id,
                "x-aiso-step": step.name,
                "x-aiso-attempts": json.dumps(
                    [{"attempt": h.attempt, "status": h.status, "error": h.error} for h in history]
                ),
            },
        )

    async def fire(self, conn: AsyncConnection, timer: Timer) -> list[OutboxMessage]:
        """A due timer: time out an attempt, start a retry, or time out the task."""
        task = await self._lock_task(conn, timer.task_id)
        if task is None or TaskStatus(task.status).terminal:
            return []
        if timer.kind is TimerKind.TASK_DEADLINE:
            if _deadline(task) > timer.due + timedelta(seconds=1):
                return []  # a replay moved the deadline; its own timer is armed
            timeout = {"code": "TaskTimeout", "message": "the pipeline's timeoutSeconds passed"}
            return await self.store.finish_task(conn, task.id, TaskStatus.TIMED_OUT, error=timeout)
        plan = self._plan(task)
        step = plan.step(timer.step or "")
        attempt = timer.attempt or 1
        if timer.kind is TimerKind.RETRY:
            waiting = (
                await conn.execute(
                    select(_A.id).where(
                        _attempt_is(task.id, step.name, attempt, StepStatus.SCHEDULED)
                    )
                )
            ).first()
            if waiting is None:
                return []
            return await self._dispatch(conn, task, plan, step, attempt, exists=True)
        error: dict[str, Any] = {
            "code": "StepTimeout",
            "message": f"no result within {step.timeout_seconds:g}s",
            "retryable": True,
        }
        changed = await conn.execute(
            update(t.step_attempts)
            .where(_attempt_is(task.id, step.name, attempt, StepStatus.DISPATCHED))
            .values(status=StepStatus.TIMED_OUT.value, finished_at=utcnow(), error=error)
            .returning(_A.service)
        )
        row = changed.first()
        if row is None:
            return []
        messages = await self._breaker(conn, task, row.service, step, failed=True)
        return messages + await self._failed(
            conn, task, plan, step, attempt, row.service, error, kind="step.timed_out"
        )

    async def replay(
        self, conn: AsyncConnection, task_id: str, step_name: str
    ) -> list[OutboxMessage]:
        """Re-run a failed task from its failed step (after the service was fixed)."""
        task = await self._lock_task(conn, task_id)
        if task is None or task.status != TaskStatus.FAILED:
            return []
        plan = self._plan(task)
        step = plan.step(step_name)
        last = (
            await conn.execute(
                select(_A.attempt, _A.status)
                .where((_A.task_id == task_id) & (_A.step == step_name))
                .order_by(_A.attempt.desc())
                .limit(1)
            )
        ).first()
        if last is None or last.status not in (StepStatus.FAILED, StepStatus.TIMED_OUT):
            return []
        now = utcnow()
        deadline = now + timedelta(seconds=plan.timeout_seconds)
        await conn.execute(
            update(t.tasks)
            .where(t.tasks.c.id == task_id)
            .values(
                status=TaskStatus.RUNNING.value,
                error=None,
                finished_at=None,
                deadline_at=deadline,
                updated_at=now,
            )
        )
        task = await self._lock_task(conn, task_id)
        assert task is not None
        timer = Timer(kind=TimerKind.TASK_DEADLINE, task_id=task_id, due=deadline)
        messages = [
            await self._event(conn, task, "replayed", step=step_name, attempt=last.attempt + 1),
            timer_message(timer),
        ]
        return messages + await self._dispatch(conn, task, plan, step, last.attempt + 1)
