"""Turning a validated ``POST /v1/tasks`` body into a task row and the message that starts it.

Checks that need the catalog live here (pipeline exists and is Ready, input type, payload
schema, parameter keys), and so does the outbound URL policy (``check_urls``); shape checks
are the schema's. The row and the message are built together so the message carries exactly
what was stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from aiso import topology
from aiso.contracts import Data, PayloadType, TaskMessage, validate_payload
from aiso.errors import InvalidPayload
from aiso.netguard import UnsafeURL, check_url
from aiso.registry import Registry
from aiso.resources import ResolvedPipeline
from aiso.store import OutboxMessage, TaskStatus
from aiso.store.database import utcnow

from .problems import FieldError, ProblemError
from .schemas import TaskSubmission

__all__ = [
    "URL_CHECK_SECONDS",
    "URL_PAYLOADS",
    "WHOLE_TASK_STEP",
    "NewTask",
    "check_submission",
    "check_urls",
    "new_task",
    "request_hash",
]

WHOLE_TASK_STEP = "*"
"""``step`` of the message that starts a task: it addresses the whole task, not one step."""

URL_PAYLOADS = frozenset({PayloadType.URL, PayloadType.AUDIO, PayloadType.VIDEO, PayloadType.FILE})
"""Payload types whose ``url`` a service will fetch."""

URL_CHECK_SECONDS = 5.0
"""How long resolving a submitted URL's host may take; a host that does not resolve in time
is refused rather than holding the request."""


def check_submission(
    registry: Registry, body: TaskSubmission
) -> tuple[ResolvedPipeline, dict[str, Any]]:
    """The pipeline's plan and the normalised payload, or a ``ProblemError`` saying why not."""
    state = registry.pipeline(body.pipeline)
    if state is None:
        raise ProblemError(
            404,
            "pipeline-not-found",
            f"no pipeline named {body.pipeline!r}; GET /v1/pipelines lists them",
            title="Pipeline not found",
        )
    if state.plan is None:
        problem = state.problem
        reason = problem.reason if problem else "NotReady"
        message = problem.message if problem else "the pipeline is not ready"
        raise ProblemError(
            409,
            "pipeline-not-ready",
            f"pipeline {body.pipeline!r} is not ready: {reason}: {message}",
            title="Pipeline not ready",
            reason=reason,
        )
    plan = state.plan
    errors: list[FieldError] = []
    payload: dict[str, Any] = {}
    if body.input.payload_type != plan.input:
        errors.append(
            FieldError(
                field="input.payload_type",
                message=f"pipeline {plan.name!r} takes {plan.input.value}, "
                f"not {body.input.payload_type.value}",
            )
        )
    else:
        try:
            payload = validate_payload(plan.input, body.input.payload)
        except InvalidPayload as exc:
            where = "input.payload" if exc.field == "payload" else f"input.payload.{exc.field}"
            errors.append(FieldError(field=where, message=str(exc)))
    if body.callback_progress and body.callback_url is None:
        errors.append(
            FieldError(field="callback_progress", message="progress webhooks need a callback_url")
        )
    steps = [s.name for s in plan.steps]
    for key in body.parameters:
        if key not in steps:
            errors.append(
                FieldError(
                    field=f"parameters.{key}",
                    message=f"pipeline {plan.name!r} has no step {key!r}; its steps: "
                    + ", ".join(steps),
                )
            )
    if errors:
        raise ProblemError(
            422,
            "invalid-request",
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            title="Invalid request",
            errors=errors,
        )
    return plan, payload


async def _refusal(url: str, allow_private: bool) -> str | None:
    try:
        await asyncio.wait_for(check_url(url, allow_private=allow_private), URL_CHECK_SECONDS)
    except UnsafeURL as exc:
        return str(exc)
    except TimeoutError:
        return f"the host did not resolve within {URL_CHECK_SECONDS:g}s"
    return None


async def check_urls(
    body: TaskSubmission,
    plan: ResolvedPipeline,
    payload: dict[str, Any],
    *,
    allow_private: bool,
) -> None:
    """Refuse (422) a ``callback_url`` or payload ``url`` that the platform must not call:
    anything resolving to private, loopback or link-local addresses, unless allowed.

    Checked at submission so the client hears at once; the webhook sender and the fetching
    services check again before each call, as DNS answers may change in between.
    """
    targets: list[tuple[str, str]] = []
    if body.callback_url is not None:
        targets.append(("callback_url", body.callback_url))
    if plan.input in URL_PAYLOADS and isinstance(payload.get("url"), str):
        targets.append(("input.payload.url", payload["url"]))
    refusals = await asyncio.gather(*(_refusal(url, allow_private) for _, url in targets))
    errors = [
        FieldError(field=field, message=reason)
        for (field, _), reason in zip(targets, refusals, strict=True)
        if reason is not None
    ]
    if errors:
        raise ProblemError(
            422,
            "unsafe-url",
            "; ".join(f"{e.field}: {e.message}" for e in errors),
            title="URL not allowed",
            errors=errors,
        )


def request_hash(body: TaskSubmission) -> str:
    """SHA-256 of the body's canonical JSON: the same request in other whitespace or key
    order hashes alike, so an idempotent retry is recognised."""
    canonical = json.dumps(
        body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class NewTask:
    """A task row ready for ``Store.create_task`` and the message announcing it."""

    id: str
    row: dict[str, Any]
    announce: OutboxMessage


_PLAN_SNAPSHOTS: dict[int, tuple[ResolvedPipeline, dict[str, Any]]] = {}
_PLAN_SNAPSHOTS_LIMIT = 256


def _snapshot(plan: ResolvedPipeline) -> dict[str, Any]:
    """The plan as stored with each task, dumped once per plan object: plans are immutable
    and replaced (not changed) when manifests change, and dumping one per request was a
    measurable share of a submission's CPU. The entry holds the plan, so its id stays unique."""
    cached = _PLAN_SNAPSHOTS.get(id(plan))
    if cached is None:
        if len(_PLAN_SNAPSHOTS) >= _PLAN_SNAPSHOTS_LIMIT:
            _PLAN_SNAPSHOTS.clear()
        cached = (plan, plan.model_dump(mode="json", by_alias=False))
        _PLAN_SNAPSHOTS[id(plan)] = cached
    return cached[1]


def new_task(body: TaskSubmission, plan: ResolvedPipeline, payload: dict[str, Any]) -> NewTask:
    task_id = uuid.uuid4()
    now = utcnow()
    deadline = now + timedelta(seconds=plan.timeout_seconds)
    row: dict[str, Any] = {
        "id": str(task_id),
        "pipeline": plan.name,
        "status": TaskStatus.PENDING.value,
        "input": {"payload_type": plan.input.value, "payload": payload},
        "parameters": body.parameters,
        "callback_url": body.callback_url,
        "callback_progress": body.callback_progress,
        "plan": _snapshot(plan),
        "created_at": now,
        "updated_at": now,
        "deadline_at": deadline,
    }
    message = TaskMessage(
        message_id=task_id,
        source_service="wrapper",
        target_services=["orchestrator"],
        task_id=task_id,
        pipeline=plan.name,
        step=WHOLE_TASK_STEP,
        deadline=deadline,
        data=Data(
            task_type=plan.name,
            payload_type=plan.input,
            payload=payload,
            original_message_id=task_id,
            callback_url=body.callback_url,
            parameters=body.parameters,
        ),
    )
    announce = OutboxMessage(
        exchange=topology.TASKS_EXCHANGE,
        routing_key=topology.TASK_ROUTING_KEY,
        message_id=str(task_id),
        body=message.to_bytes(),
    )
    return NewTask(id=str(task_id), row=row, announce=announce)
