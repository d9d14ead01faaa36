"""The queue side of a replica: take a task message, publish its result, then acknowledge.

The task message is acknowledged only after the broker confirmed the result. A replica that
dies anywhere before that leaves the message unacknowledged and RabbitMQ hands it to another
replica; the repeated result carries the same deterministic id and the orchestrator applies it
once. So no step is ever lost, and none is half-done: a message either gets a result (success
or a typed failure) or, when it cannot be read at all, goes to the service's dead-letter queue
with the reason — never both, never neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from aiso import topology
from aiso.contracts import (
    Data,
    ErrorInfo,
    PayloadType,
    ResultMessage,
    TaskMessage,
    parse_task,
    result_id,
)
from aiso.errors import InvalidMessage, InvalidPayload
from aiso.sdk._context import Context
from aiso.sdk._executor import DeadlinePassed, Executor, failure, seconds_left
from aiso.sdk._metrics import Metrics, Outcome
from aiso.sdk._service import Service

__all__ = ["Consumer"]

log = logging.getLogger("aiso.sdk")


class Consumer:
    def __init__(
        self, service: Service, executor: Executor, metrics: Metrics, *, replica: str
    ) -> None:
        self._service = service
        self._executor = executor
        self._metrics = metrics
        self._replica = replica
        self._queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None
        self._results: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        # Our own tasks, not the channel's: shutdown waits for exactly these.
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def attached(self) -> bool:
        return self._tag is not None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def attach(self, channel: AbstractChannel, prefetch: int) -> None:
        """Declare the topology and start consuming the service queue."""
        exchanges = await topology.declare_core(channel)
        self._results = exchanges[topology.RESULTS_EXCHANGE]
        self._dead = exchanges[topology.DEAD_EXCHANGE]
        self._queue = await topology.declare_service(channel, self._service.name)
        await channel.set_qos(prefetch_count=prefetch)
        self._tag = await self._queue.consume(self._on_message)

    async def detach(self) -> None:
        """Stop deliveries; messages already received keep running."""
        if self._queue is None or self._tag is None:
            return
        tag, self._tag = self._tag, None
        try:
            await self._queue.cancel(tag)
        except CONNECTION_EXCEPTIONS as exc:  # connection gone: no deliveries either way
            log.debug("cancelling the consumer failed: %s", exc)

    async def drain(self) -> None:
        """Wait until every message received so far is settled."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def abandon(self) -> None:
        """Cancel what is still running; unacknowledged, those messages go back to the queue."""
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._process(message))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except Exception as exc:  # a bug here must not leave the message unsettled forever
            log.exception("%s: processing a message failed", self._service.name)
            await self._dead_letter(message, f"internal error: {type(exc).__name__}: {exc}")

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            task = parse_task(message.body)
        except InvalidMessage as exc:
            await self._dead_letter(message, str(exc))
            return
        name = self._service.name
        where = f"task={task.task_id} step={task.step} attempt={task.attempt}"
        left = seconds_left(task.deadline)
        if left is not None and left <= 0:
            log.info("%s: %s expired %.1fs before it was taken; dropped", name, where, -left)
            await self._settle(message, "expired")
            return
        started_at, clock = datetime.now(UTC), time.perf_counter()
        error: ErrorInfo | None = None
        outcome: Outcome = "succeeded"
        try:
            payload = await self._executor.run(
                task.data.payload_type, task.data.payload, self._context(task)
            )
        except DeadlinePassed:
            log.warning("%s: %s passed its deadline in the handler; dropped", name, where)
            await self._settle(message, "expired")
            return
        except InvalidPayload as exc:
            outcome = "invalid"
            error = ErrorInfo(
                code="InvalidInput",
                message=str(exc),
                retryable=False,
                details={"field": f"data.{exc.field}"},
            )
        except Exception as exc:
            outcome = "failed"
            error = failure(exc, name)
        duration_ms = round((time.perf_counter() - clock) * 1000, 3)
        if error is not None:
            payload = {"code": error.code, "message": error.message}
        result = self._result(task, payload, error, started_at, duration_ms)
        if await self._publish_result(message, task, result):
            log.info("%s: %s %s in %.1f ms", name, where, outcome, duration_ms)
            await self._settle(message, outcome)

    def _context(self, task: TaskMessage) -> Context:
        assert task.task_id is not None and task.step is not None  # parse_task checked both
        return Context(
            task_id=task.task_id,
            message_id=task.message_id,
            service=self._service.name,
            pipeline=task.pipeline,
            step=task.step,
            attempt=task.attempt,
            deadline=task.deadline,
            parameters=task.data.parameters,
        )

    def _result(
        self,
        task: TaskMessage,
        payload: dict[str, Any],
        error: ErrorInfo | None,
        started_at: datetime,
        duration_ms: float,
    ) -> ResultMessage:
        """The result of ``task``; a failure carries an ``error`` payload and ``error``."""
        assert task.task_id is not None and task.step is not None
        metadata: dict[str, Any] = {
            "service": self._service.name,
            "version": self._service.version,
            "replica": self._replica,
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "duration_ms": duration_ms,
        }
        return ResultMessage(
            message_id=result_id(task.task_id, task.step, task.attempt),
            source_service=self._service.name,
            target_services=["orchestrator"],
            task_id=task.task_id,
            pipeline=task.pipeline,
            step=task.step,
            attempt=task.attempt,
            trace=task.trace,
            data=Data(
                task_type=task.data.task_type,
                payload_type=self._service.output if error is None else PayloadType.ERROR,
                payload=payload,
                original_message_id=task.task_id,
                parameters=task.data.parameters,
                execution_metadata=metadata,
            ),
            success=error is None,
            error=error,
        )

    async def _publish_result(
        self, message: AbstractIncomingMessage, task: TaskMessage, result: ResultMessage
    ) -> bool:
        assert self._results is not None
        try:
            await self._results.publish(
                aio_pika.Message(
                    result.to_bytes(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(result.message_id),
                    correlation_id=str(task.message_id),
                    content_type="application/json",
                ),
                routing_key=topology.RESULT_ROUTING_KEY,
            )
        except CONNECTION_EXCEPTIONS as exc:
            log.warning(
                "%s: result of task=%s step=%s not confirmed (%s); the task will be redelivered",
                self._service.name,
                task.task_id,
                task.step,
                exc,
            )
            await self._requeue(message)
            return False
        return True

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Park an unreadable message in ``aiso.svc.<name>.dead`` with the reason."""
        assert self._dead is not None
        name = self._service.name
        headers: dict[str, Any] = {
            **(message.headers or {}),
            "x-aiso-reason": reason,
            "x-aiso-service": name,
        }
        if message.message_id:
            headers["x-aiso-original-message-id"] = message.message_id
        log.warning("%s: malformed message %s: %s", name, message.message_id or "(no id)", reason)
        try:
            await self._dead.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type=message.content_type,
                    message_id=message.message_id,
                ),
                routing_key=name,
            )
        except CONNECTION_EXCEPTIONS as exc:
            log.warning("%s: dead-lettering not confirmed (%s); will retry", name, exc)
            await self._requeue(message)
            return
        await self._settle(message, "dead")

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        try:
            await message.ack()
        except CONNECTION_EXCEPTIONS as exc:
            # The delivery belonged to a channel that is gone; the broker redelivers it.
            log.warning("%s: ack lost with the connection (%s)", self._service.name, exc)
            return
        self._metrics.message(outcome)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):  # channel gone: requeued anyway
            await message.nack(requeue=True)
