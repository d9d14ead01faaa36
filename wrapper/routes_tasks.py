"""``/v1/tasks``: submit, inspect, follow and cancel tasks."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError

from aiso.store import EventRecord, OutboxMessage, TaskStatus
from aiso.store.database import IdempotencyConflict

from .auth import Principal, principal
from .events import TERMINAL_KINDS
from .gateway import Gateway, get_gateway
from .problems import FieldError, ProblemError, problem_responses
from .schemas import TaskAccepted, TaskSubmission, TaskView, task_links
from .sse import event_stream
from .submission import NewTask, check_submission, check_urls, new_task, request_hash

__all__ = ["router"]

router = APIRouter(
    prefix="/v1/tasks",
    tags=["tasks"],
    dependencies=[Depends(principal)],
    responses=problem_responses(401),
)

GatewayDep = Annotated[Gateway, Depends(get_gateway)]
CallerDep = Annotated[Principal | None, Depends(principal)]

STORED_KEY_LENGTH = 255
"""Width of ``idempotency_keys.key``."""

RECHECK_SECONDS = 1.0
"""``?wait=`` re-reads the store this often even without an event: a lost event costs at most
this much latency, never a missed end."""


def _task_not_found(task_id: str) -> ProblemError:
    return ProblemError(
        404, "task-not-found", f"no task with id {task_id!r}", title="Task not found"
    )


def _task_id(raw: str) -> str:
    """The canonical form of a task id; a malformed one names no task, hence 404."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise _task_not_found(raw) from None


async def _view(gateway: Gateway, task_id: str) -> TaskView:
    found = await gateway.store.get_task_and_steps(task_id)
    if found is None:
        raise _task_not_found(task_id)
    return TaskView.of(*found)


async def _wait_for_end(
    gateway: Gateway,
    task_id: str,
    seconds: float,
    events: asyncio.Queue[EventRecord | None],
    *,
    fresh: bool,
) -> TaskView:
    """The task once it has ended, or as it is when ``seconds`` have passed. ``events`` is a
    subscription made before the task could start; ``fresh`` says this request has just
    created it, so it cannot have ended before the subscription and needs no first read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ended = False
    if not fresh:
        task = await gateway.store.get_task(task_id)
        if task is None:
            raise _task_not_found(task_id)
        ended = task.status.terminal
    while not ended:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            woke = await asyncio.wait_for(events.get(), min(RECHECK_SECONDS, remaining))
        except TimeoutError:  # time to re-check the store
            task = await gateway.store.get_task(task_id)
            ended = task is None or task.status.terminal
            continue
        if woke is None:  # the gateway is shutting down: answer with the task as it is
            break
        ended = woke.kind in TERMINAL_KINDS  # a step event cannot end the task: no re-read
    return await _view(gateway, task_id)


def _stored_key(key: str, caller: Principal | None) -> str:
    """The key as stored: scoped to the caller's API key, so two clients that happen to pick
    the same ``Idempotency-Key`` get their own tasks. A scoped key too long for the column is
    stored by its digest."""
    if caller is None:
        return key
    scoped = f"{caller.key_id}:{key}"
    if len(scoped) <= STORED_KEY_LENGTH:
        return scoped
    return f"{caller.key_id}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def _key_reused() -> ProblemError:
    return ProblemError(
        422,
        "idempotency-key-reused",
        "this Idempotency-Key was already used with a different request body",
        title="Idempotency key reused",
        errors=[FieldError(field="header.Idempotency-Key", message="used with another body")],
    )


async def _create(
    gateway: Gateway, task: NewTask, idempotency: tuple[str, str] | None
) -> tuple[str, list[OutboxMessage]]:
    try:
        return await gateway.store.create_task(task.row, task.announce, idempotency)
    except IdempotencyConflict:
        raise _key_reused() from None
    except IntegrityError:
        # A concurrent request with the same key committed first (PostgreSQL lets both
        # transactions look before either inserts): answer as its replay.
        if idempotency is None:
            raise
        try:
            existing = await gateway.store.find_idempotent(*idempotency)
        except IdempotencyConflict:
            raise _key_reused() from None
        if existing is None:
            raise
        return existing, []


def _json(model: TaskView | TaskAccepted, status: int, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status, headers=headers)


@router.post(
    "",
    status_code=202,
    summary="Submit a task",
    response_model=None,
    responses={
        202: {
            "model": TaskAccepted,
            "description": "Accepted; follow `Location` or `links.events`. With `?wait=` the "
            "full task view (a superset) when the task has not ended in time.",
        },
        200: {
            "model": TaskView,
            "description": "The task has ended: with `?wait=`, or an idempotent replay of a "
            "finished task.",
        },
        **problem_responses(404, 409, 413, 422),
    },
)
async def submit_task(
    body: TaskSubmission,
    gateway: GatewayDep,
    caller: CallerDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            description="Seconds to wait for the end (at most the gateway's limit, "
            "60 s by default); 0 answers at once.",
        ),
    ] = 0,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Repeating a request with the same key and body returns the same task.",
        ),
    ] = None,
) -> JSONResponse:
    limit = gateway.settings.wait_max_seconds
    if wait > limit:
        message = f"at most {limit:g} seconds"
        raise ProblemError(
            422,
            "invalid-request",
            f"query.wait: {message}",
            title="Invalid request",
            errors=[FieldError(field="query.wait", message=message)],
        )
    plan, payload = check_submission(gateway.registry, body)
    await check_urls(body, plan, payload, allow_private=gateway.settings.allow_private_urls)
    task = new_task(body, plan, payload)
    idempotency = (
        (_stored_key(idempotency_key, caller), request_hash(body)) if idempotency_key else None
    )
    task_id, messages = await _create(gateway, task, idempotency)
    headers = {"Location": f"/v1/tasks/{task_id}"}
    replayed = task_id != task.id
    if replayed:
        headers["Idempotency-Replayed"] = "true"
    # Subscribed before the task is published, so that not even its end can be missed.
    with gateway.hub.subscribe(task_id) as events:
        if not replayed:
            gateway.metrics.tasks_submitted.labels(plan.name).inc()
            await gateway.publish(messages)
        if wait > 0:
            view = await _wait_for_end(gateway, task_id, wait, events, fresh=not replayed)
            return _json(view, 200 if view.status.terminal else 202, headers)
    if replayed:
        view = await _view(gateway, task_id)
        if view.status.terminal:
            return _json(view, 200, headers)
        return _json(
            TaskAccepted(task_id=task_id, status=view.status, links=view.links), 202, headers
        )
    accepted = TaskAccepted(task_id=task_id, status=TaskStatus.PENDING, links=task_links(task_id))
    return _json(accepted, 202, headers)


@router.get(
    "/{task_id}",
    summary="A task: status, step attempts, result",
    response_model=TaskView,
    responses=problem_responses(404),
)
async def get_task(task_id: str, gateway: GatewayDep) -> TaskView:
    return await _view(gateway, _task_id(task_id))


_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`text/event-stream`: frames with `id` (event id), `event` (kind) and "
        "`data` (JSON `{id, task_id, kind, data, at}`); ends after the terminal event. "
        "Resume with the `Last-Event-ID` header.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **problem_responses(404),
}


@router.get(
    "/{task_id}/events",
    summary="Follow a task's events (Server-Sent Events)",
    response_class=StreamingResponse,
    responses=_SSE_DOC,
)
async def task_events(
    task_id: str,
    gateway: GatewayDep,
    last_event_id: Annotated[
        int | None,
        Header(alias="Last-Event-ID", ge=0, description="Replay only events after this id."),
    ] = None,
) -> StreamingResponse:
    task_id = _task_id(task_id)
    if await gateway.store.get_task(task_id) is None:
        raise _task_not_found(task_id)
    return StreamingResponse(
        event_stream(gateway.store, gateway.hub, task_id, last_event_id or 0),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete(
    "/{task_id}",
    summary="Cancel a task",
    response_model=TaskView,
    responses=problem_responses(404, 409),
)
async def cancel_task(task_id: str, gateway: GatewayDep) -> TaskView:
    task_id = _task_id(task_id)
    status, messages = await gateway.cancel(task_id)
    if status is None:
        raise _task_not_found(task_id)
    if not messages:
        raise ProblemError(
            409,
            "task-already-finished",
            f"task {task_id} has already ended: {status.value}",
            title="Task already finished",
            task_status=status.value,
        )
    await gateway.publish(messages)
    return await _view(gateway, task_id)
