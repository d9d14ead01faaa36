"""Calling the handler: one path shared by queue messages and ``POST /v1/process``.

Input is checked against the declared payload types before the handler sees it, and output
after, so a handler only ever gets valid data and a bug in it never sends malformed data to
the next step. ``concurrency`` bounds handler calls from both paths together: it is what the
replica promised it can hold (GPU memory, model instances), whoever is calling.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, cast

from pydantic_core import PydanticSerializationError, to_json

from aiso.contracts import ErrorInfo, PayloadType, validate_payload
from aiso.errors import InvalidPayload, PermanentError, RetryableError, TaskError
from aiso.sdk._context import Context
from aiso.sdk._metrics import Metrics
from aiso.sdk._service import Service

__all__ = ["DeadlinePassed", "Executor", "failure", "seconds_left"]

log = logging.getLogger("aiso.sdk")


class DeadlinePassed(Exception):
    """The attempt's deadline passed while the handler ran; nobody waits for its result."""


def seconds_left(deadline: datetime | None) -> float | None:
    """Seconds until ``deadline`` (negative once passed); a naive deadline is read as UTC."""
    if deadline is None:
        return None
    if deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=UTC)
    return (deadline - datetime.now(UTC)).total_seconds()


def failure(exc: Exception, service: str) -> ErrorInfo:
    """The ``ErrorInfo`` reported for an exception that escaped the handler.

    Unexpected exceptions count as retryable (see ``aiso.errors``); their traceback goes to
    the log, never into the result, which may travel to a client.
    """
    if isinstance(exc, TaskError):
        details: dict[str, Any] = {}
        if isinstance(exc, RetryableError) and exc.delay is not None:
            details["delay"] = exc.delay
        return ErrorInfo(code=exc.code, message=str(exc), retryable=exc.retryable, details=details)
    log.error("%s: handler raised %s", service, type(exc).__name__, exc_info=exc)
    return ErrorInfo(
        code="HandlerError",
        message=str(exc) or type(exc).__name__,
        retryable=True,
        details={"exception": type(exc).__name__},
    )


class Executor:
    def __init__(self, service: Service, concurrency: int, metrics: Metrics) -> None:
        if service._handler is None:
            raise ValueError(
                f"service {service.name!r} has no handler: decorate a function with "
                "@service.handler"
            )
        self._service = service
        self._handler = service._handler
        self._is_async = inspect.iscoroutinefunction(self._handler)
        self._metrics = metrics
        self._slots = asyncio.Semaphore(concurrency)
        self._pool = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix=f"aiso-{service.name}"
        )
        self.started = False
        """True once every startup hook has finished: the handler may be called."""

    async def startup(self) -> None:
        """Run the startup hooks in order; plain functions run in the pool (model loading
        would otherwise block the event loop and with it ``/healthz``)."""
        for hook in self._service._startup:
            log.info("%s: startup hook %s", self._service.name, hook.__qualname__)
            if inspect.iscoroutinefunction(hook):
                await hook()
            else:
                await self._in_pool(hook)
        self.started = True

    async def run(self, payload_type: PayloadType, payload: Any, ctx: Context) -> dict[str, Any]:
        """Check the input, call the handler, check its output.

        Raises ``InvalidPayload`` (``field`` relative to ``{payload_type, payload}``) for bad
        input, ``PermanentError`` for bad output, ``DeadlinePassed`` when an async handler is
        still running at ``ctx.deadline`` (a thread cannot be interrupted, so a plain
        ``def`` handler runs to its end), and whatever the handler raised.
        """
        if payload_type not in self._service.input:
            accepted = ", ".join(t.value for t in self._service.input)
            raise InvalidPayload(
                f"payload_type '{payload_type.value}' is not accepted by {self._service.name} "
                f"(accepts: {accepted})",
                field="payload_type",
            )
        try:
            checked = validate_payload(payload_type, payload)
        except InvalidPayload as exc:
            raise InvalidPayload(str(exc), field=f"payload.{exc.field}") from None
        params = dict(ctx.parameters)
        async with self._slots:
            self._metrics.in_flight.inc()
            started = time.perf_counter()
            try:
                out = await self._call(checked, params, ctx)
            finally:
                self._metrics.in_flight.dec()
                self._metrics.handler_seconds.observe(time.perf_counter() - started)
        try:
            checked = validate_payload(self._service.output, out)
            to_json(checked)  # it must travel as JSON; fail here, not when publishing
        except (InvalidPayload, PydanticSerializationError) as exc:
            raise PermanentError(
                f"handler returned invalid output: {exc}", code="InvalidOutput"
            ) from None
        return checked

    async def _call(self, payload: dict[str, Any], params: dict[str, Any], ctx: Context) -> object:
        if not self._is_async:
            return await self._in_pool(self._handler, payload, params, ctx)
        result = cast(Awaitable[object], self._handler(payload, params, ctx))
        timeout = asyncio.timeout(seconds_left(ctx.deadline))
        try:
            async with timeout:
                return await result
        except TimeoutError:
            if timeout.expired():
                raise DeadlinePassed from None
            raise

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        # copy_context: contextvars (e.g. tracing) follow the call into the thread.
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        """Release the pool without waiting: a thread past the grace period is abandoned."""
        self._pool.shutdown(wait=False, cancel_futures=True)
