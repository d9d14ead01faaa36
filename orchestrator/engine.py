"""State transitions of a task, each applied once inside the caller's unit of work.

Every function here works on a task the ``UnitOfWork`` has locked, checks that the transition
is still valid (compare-and-set on the task status or the step attempt status), records the
new state and the messages it causes; the caller flushes the unit, commits, and publishes the
messages through the outbox relay. A duplicate or late message fails the check and changes
nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection

from aiso import topology
from aiso.contracts import Data, PayloadType, ResultMessage, TaskMessage, dispatch_id
from aiso.orchestrator import breaker
from aiso.orchestrator.timers import Timer, TimerKind
from aiso.orchestrator.unit import Attempt, TaskState, UnitOfWork
from aiso.resources import ResolvedPipeline, ResolvedStep
from aiso.store import OutboxMessage, StepStatus, Store, TaskStatus
from aiso.store.writes import finished_task_data, finished_webhook_data, utcnow

__all__ = ["Engine"]

log = logging.getLogger("aiso.orchestrator")

_DONE = (StepStatus.SUCCEEDED.value, StepStatus.SKIPPED.value)
_OPEN = (StepStatus.SCHEDULED.value, StepStatus.DISPATCHED.value)
_PLAN_CACHE_SIZE = 4096
T = TypeVar("T")


class Engine:
    """Applies task starts, step results, timers and replays to locked tasks."""

    def __init__(self, store: Store, watch: breaker.BreakerWatch | None = None) -> None:
        self.store = store
        self.watch = watch
        self._plans: OrderedDict[str, ResolvedPipeline] = OrderedDict()

    def unit(self, conn: Connection) -> UnitOfWork:
        """A unit of work in ``conn``'s transaction that reads plans only for tasks not cached
        here."""
        return UnitOfWork(self.store, conn, cached_plan=self._plans.get)

    async def commit(self, change: Callable[[UnitOfWork], T]) -> tuple[T, list[OutboxMessage]]:
        """Make ``change`` on a fresh unit of work and write it, in one transaction (on SQLite
        one trip to the store's thread, so the write lock is held for the work only). Returns
        what ``change`` returned and the messages to publish now that it has committed."""

        def transaction(conn: Connection) -> tuple[T, list[OutboxMessage]]:
            unit = self.unit(conn)
            made = change(unit)
            return made, unit.flush()

        async with self.store.sync_transaction() as tx:
            return await tx.run(transaction, last=True)

    def _plan(self, task: TaskState) -> ResolvedPipeline:
        """The task's plan snapshot, parsed once per task while it is hot."""
        if task.plan is None:
            assert task.plan_json is not None, "the unit of work reads uncached plans"
            task.plan = ResolvedPipeline.model_validate(task.plan_json)
            self._plans[task.id] = task.plan
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return task.plan

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def _step_input(task: TaskState, step: ResolvedStep) -> dict[str, Any]:
        """The payload a step gets: the task input, or its dependency's output."""
        if not step.depends_on:
            return dict(task.input)
        source = step.depends_on[0]
        done = [a for a in task.attempts if a.step == source and a.status in _DONE]
        if not done or done[-1].output is None:
            raise RuntimeError(f"task {task.id}: step {source!r} has no output")
        return dict(done[-1].output)

    def _task_message(
        self,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        service: str,
        deadline: datetime,
    ) -> TaskMessage:
        incoming = self._step_input(task, step)
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
                parameters={**step.parameters, **task.parameters.get(step.name, {})},
            ),
        )

    # --- dispatching ---------------------------------------------------------------------------

    @staticmethod
    def _write_attempt(
        unit: UnitOfWork, task: TaskState, step: ResolvedStep, attempt: int, **values: Any
    ) -> None:
        """Change the attempt if it exists, else add it (for ``step.service`` by default)."""
        existing = task.attempt(step.name, attempt)
        if existing is not None:
            existing.set(**values)
            return
        fresh = Attempt(
            step=step.name,
            attempt=attempt,
            service=values.pop("service", step.service),
            status=values.pop("status"),
            message_id=str(dispatch_id(uuid.UUID(task.id), step.name, attempt)),
            dispatched_at=values.pop("dispatched_at"),
            stored=False,
        )
        fresh.set(**values)
        unit.add_attempt(task, fresh)

    def _dispatch(
        self,
        unit: UnitOfWork,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        *,
        service: str | None = None,
    ) -> None:
        """Send one attempt of ``step`` to its service, if that service's breaker admits it."""
        target = service or step.service
        now = utcnow()
        if service is None and (
            self.watch is None or self.watch.needs_check(target, step.circuit_breaker)
        ):
            admission = breaker.admit(
                unit.conn, self.store, target, step.circuit_breaker, step.timeout_seconds
            )
            if not admission.allowed:
                self._hold(unit, task, plan, step, attempt, admission)
                return
        deadline = min(now + timedelta(seconds=step.timeout_seconds), task.deadline_at)
        self._write_attempt(
            unit,
            task,
            step,
            attempt,
            service=target,
            status=StepStatus.DISPATCHED.value,
            dispatched_at=now,
        )
        message = self._task_message(task, plan, step, attempt, target, deadline)
        unit.send(
            OutboxMessage(
                topology.SERVICES_EXCHANGE, target, str(message.message_id), message.to_bytes()
            )
        )
        unit.arm(
            Timer(
                kind=TimerKind.STEP_DEADLINE,
                task_id=task.id,
                step=step.name,
                attempt=attempt,
                due=deadline,
            )
        )
        unit.event(task, "step.dispatched", step=step.name, service=target, attempt=attempt)

    def _schedule(
        self, unit: UnitOfWork, task: TaskState, step: ResolvedStep, attempt: int, due: datetime
    ) -> None:
        """Park ``attempt`` as scheduled and arm the retry timer that dispatches it at ``due``."""
        self._write_attempt(
            unit, task, step, attempt, status=StepStatus.SCHEDULED.value, dispatched_at=due
        )
        unit.arm(
            Timer(kind=TimerKind.RETRY, task_id=task.id, step=step.name, attempt=attempt, due=due)
        )

    def _hold(
        self,
        unit: UnitOfWork,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        admission: breaker.Admission,
    ) -> None:
        """The breaker is open: take the fallback, or wait in the delay tiers."""
        reason = f"circuit breaker of {step.service!r} is {admission.state.value}"
        if step.fallback is not None:
            self._fallback(unit, task, plan, step, attempt, reason)
            return
        retry_at = admission.retry_at or utcnow() + timedelta(seconds=1)
        self._schedule(unit, task, step, attempt, retry_at)
        unit.event(
            task,
            "step.waiting",
            step=step.name,
            service=step.service,
            attempt=attempt,
            reason=reason,
        )

    def _fallback(
        self,
        unit: UnitOfWork,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        attempt: int,
        reason: str,
    ) -> None:
        """Run the step's declared fallback: pass the input through, or another service."""
        assert step.fallback is not None
        if step.fallback.type == "service":
            unit.event(
                task,
                "step.fallback",
                step=step.name,
                service=step.fallback.service,
                attempt=attempt,
                reason=reason,
            )
            self._dispatch(unit, task, plan, step, attempt, service=step.fallback.service)
            return
        now = utcnow()
        self._write_attempt(
            unit,
            task,
            step,
            attempt,
            status=StepStatus.SKIPPED.value,
            output=self._step_input(task, step),
            error={"code": "FallbackSkip", "message": f"skipped: {reason}", "retryable": False},
            dispatched_at=now,
            finished_at=now,
        )
        unit.event(
            task,
            "step.skipped",
            step=step.name,
            service=step.service,
            attempt=attempt,
            reason=reason,
        )
        self._advance(unit, task, plan)

    def _advance(self, unit: UnitOfWork, task: TaskState, plan: ResolvedPipeline) -> None:
        """Dispatch every step that became ready, or finish the task when all are done."""
        done = {a.step for a in task.attempts if a.status in _DONE}
        started = {a.step for a in task.attempts}
        if len(done) == len(plan.steps):
            sink = plan.sinks()[0]
            output = next(
                a.output for a in task.attempts if a.step == sink.name and a.status in _DONE
            )
            degraded = sorted(a.step for a in task.attempts if a.status == StepStatus.SKIPPED.value)
            self._finish(unit, task, TaskStatus.SUCCEEDED, result=output, degraded=degraded)
            return
        for step in plan.ready_steps(done):
            if step.name not in started:
                self._dispatch(unit, task, plan, step, 1)

    @staticmethod
    def _finish(
        unit: UnitOfWork,
        task: TaskState,
        status: TaskStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        degraded: list[str] | None = None,
    ) -> None:
        """Move the task to a terminal status and close its open attempts."""
        now = utcnow()
        task.set(status=status.value, result=result, error=error, finished_at=now, updated_at=now)
        for attempt in task.attempts:
            if attempt.status in _OPEN:
                attempt.set(status=StepStatus.CANCELLED.value, finished_at=now)
        if task.callback_url:
            unit.webhook(
                task_id=task.id,
                url=task.callback_url,
                event=status.value,
                key=f"{status.value}:{now.isoformat()}",
                data=finished_webhook_data(
                    task.id, task.pipeline, status, result, error, degraded, now
                ),
            )
        unit.final_event(task, status.value, finished_task_data(status, error, degraded))

    # --- transitions ---------------------------------------------------------------------------

    def start(self, unit: UnitOfWork, task_id: str) -> None:
        """pending → running: dispatch the first steps and arm the task deadline."""
        task = unit.task(task_id)
        if task is None or task.status != TaskStatus.PENDING:
            return
        now = utcnow()
        task.set(status=TaskStatus.RUNNING.value, started_at=now, updated_at=now)
        plan = self._plan(task)
        unit.event(task, "started", status=TaskStatus.RUNNING.value)
        unit.arm(Timer(kind=TimerKind.TASK_DEADLINE, task_id=task_id, due=task.deadline_at))
        self._advance(unit, task, plan)

    def apply_result(self, unit: UnitOfWork, result: ResultMessage) -> None:
        """dispatched → succeeded/failed for exactly one attempt; duplicates change nothing."""
        task = unit.task(str(result.task_id))
        if task is None or task.status.terminal:
            return
        attempt = task.attempt(result.step or "", result.attempt)
        if attempt is None or attempt.status != StepStatus.DISPATCHED.value:
            log.debug("ignored duplicate or late result %s", result.message_id)
            return
        meta = result.data.execution_metadata if result.data else {}
        replica = meta.get("replica") or result.source_service
        plan = self._plan(task)
        step = plan.step(attempt.step)
        if result.success and result.data is not None:
            output = {
                "payload_type": result.data.payload_type.value,
                "payload": result.data.payload,
            }
            attempt.set(
                status=StepStatus.SUCCEEDED.value,
                output=output,
                finished_at=utcnow(),
                replica=replica,
            )
            self._breaker(unit, attempt.service, step, failed=False)
            unit.event(
                task,
                "step.succeeded",
                step=step.name,
                service=attempt.service,
                attempt=attempt.attempt,
            )
            self._advance(unit, task, plan)
            return
        error = result.error.model_dump() if result.error else {"message": "failed"}
        attempt.set(
            status=StepStatus.FAILED.value, error=error, finished_at=utcnow(), replica=replica
        )
        # Only a failure that may pass with time says something about the service's health.
        self._breaker(unit, attempt.service, step, failed=bool(error.get("retryable", True)))
        self._failed(unit, task, plan, step, attempt, error)

    def _breaker(self, unit: UnitOfWork, service: str, step: ResolvedStep, *, failed: bool) -> None:
        if self.watch is not None:
            if failed:
                self.watch.mark(service)
            elif not self.watch.needs_check(service, step.circuit_breaker):
                return
        changed = breaker.record(
            unit.conn, self.store, service, step.circuit_breaker, failed=failed
        )
        if changed is None:
            return
        log.warning("circuit breaker of %s is now %s", service, changed.value)
        unit.send(
            OutboxMessage(
                topology.EVENTS_EXCHANGE,
                f"service.{service}.breaker",
                str(uuid.uuid4()),  # outbox message ids are at most 36 characters
                json.dumps({"service": service, "breaker": changed.value}).encode(),
            )
        )

    def _failed(
        self,
        unit: UnitOfWork,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        failed: Attempt,
        error: dict[str, Any],
        kind: str = "step.failed",
    ) -> None:
        """Retry if the error allows and attempts remain; else fallback, or fail the task."""
        attempt, service = failed.attempt, failed.service
        base = {"step": step.name, "service": service, "attempt": attempt}
        unit.event(task, kind, **base, error=error)
        on_fallback = step.fallback is not None and service != step.service
        if error.get("retryable", True) and attempt < step.retry.max_attempts and not on_fallback:
            hint = float((error.get("details") or {}).get("delay") or 0)
            delay = max(step.retry.delay_before(attempt + 1), hint)
            due = utcnow() + timedelta(seconds=delay)
            self._schedule(unit, task, step, attempt + 1, due)
            unit.event(
                task, "step.retrying", **{**base, "attempt": attempt + 1}, delay_seconds=delay
            )
            return
        unit.send(self._dead_letter(task, plan, step, failed, error))
        if step.fallback is not None and not on_fallback:
            reason = f"{service} failed: {error.get('message', '')}"
            self._fallback(unit, task, plan, step, attempt + 1, reason)
            return
        task_error = {
            **base,
            "code": error.get("code", "Failed"),
            "message": error.get("message", ""),
        }
        self._finish(unit, task, TaskStatus.FAILED, error=task_error)

    def _dead_letter(
        self,
        task: TaskState,
        plan: ResolvedPipeline,
        step: ResolvedStep,
        failed: Attempt,
        error: dict[str, Any],
    ) -> OutboxMessage:
        """The failed step's message, parked in ``aiso.svc.<service>.dead`` with its history."""
        history = sorted((a for a in task.attempts if a.step == step.name), key=lambda a: a.attempt)
        message = self._task_message(
            task, plan, step, failed.attempt, failed.service, task.deadline_at
        )
        return OutboxMessage(
            exchange=topology.DEAD_EXCHANGE,
            routing_key=failed.service,
            message_id=str(message.message_id),
            body=message.to_bytes(),
            headers={
                "x-aiso-reason": f"{error.get('code', 'Failed')}: {error.get('message', '')}",
                "x-aiso-service": failed.service,
                "x-aiso-task-id": task.id,
                "x-aiso-step": step.name,
                "x-aiso-attempts": json.dumps(
                    [{"attempt": h.attempt, "status": h.status, "error": h.error} for h in history]
                ),
            },
        )

    def fire(self, unit: UnitOfWork, timer: Timer) -> None:
        """A due timer: time out an attempt, start a retry, or time out the task."""
        task = unit.task(timer.task_id)
        if task is None or task.status.terminal:
            return
        if timer.kind is TimerKind.TASK_DEADLINE:
            if task.deadline_at > timer.due + timedelta(seconds=1):
                return  # a replay moved the deadline; its own timer is armed
            timeout = {"code": "TaskTimeout", "message": "the pipeline's timeoutSeconds passed"}
            self._finish(unit, task, TaskStatus.TIMED_OUT, error=timeout)
            return
        plan = self._plan(task)
        step = plan.step(timer.step or "")
        attempt = task.attempt(step.name, timer.attempt or 1)
        if timer.kind is TimerKind.RETRY:
            if attempt is not None and attempt.status == StepStatus.SCHEDULED.value:
                self._dispatch(unit, task, plan, step, attempt.attempt)
            return
        if attempt is None or attempt.status != StepStatus.DISPATCHED.value:
            return
        error: dict[str, Any] = {
            "code": "StepTimeout",
            "message": f"no result within {step.timeout_seconds:g}s",
            "retryable": True,
        }
        attempt.set(status=StepStatus.TIMED_OUT.value, finished_at=utcnow(), error=error)
        self._breaker(unit, attempt.service, step, failed=True)
        self._failed(unit, task, plan, step, attempt, error, kind="step.timed_out")

    def cancel(self, unit: UnitOfWork, task_id: str) -> TaskStatus | None:
        """A client's cancel (the gateway runs it): a pending or running task becomes
        ``cancelled``. Returns the task's status afterwards; None if there is no such task."""
        task = unit.task(task_id)
        if task is None:
            return None
        if not task.status.terminal:
            error = {"code": "Cancelled", "message": "cancelled by the client"}
            self._finish(unit, task, TaskStatus.CANCELLED, error=error)
        return task.status

    def replay(self, unit: UnitOfWork, task_id: str, step_name: str) -> None:
        """Re-run a failed task from its failed step (after the service was fixed)."""
        task = unit.task(task_id)
        if task is None or task.status != TaskStatus.FAILED:
            return
        plan = self._plan(task)
        step = plan.step(step_name)
        last = task.latest(step_name)
        if last is None or last.status not in (StepStatus.FAILED, StepStatus.TIMED_OUT):
            return
        now = utcnow()
        deadline = now + timedelta(seconds=plan.timeout_seconds)
        task.set(
            status=TaskStatus.RUNNING.value,
            error=None,
            finished_at=None,
            deadline_at=deadline,
            updated_at=now,
        )
        unit.event(task, "replayed", step=step_name, attempt=last.attempt + 1)
        unit.arm(Timer(kind=TimerKind.TASK_DEADLINE, task_id=task_id, due=deadline))
        self._dispatch(unit, task, plan, step, last.attempt + 1)
