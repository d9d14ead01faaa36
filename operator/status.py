"""Status of AIServices and Pipelines as Kubernetes conditions; pure functions.

A condition is ``{type, status, reason, message, lastTransitionTime, observedGeneration}``
with a CamelCase ``reason`` a program can switch on and a ``message`` a person can read.
``lastTransitionTime`` changes only when ``status`` does, so these functions take the
previous conditions and keep their times.

AIService conditions:

* ``QueueReady`` — the queue and its dead-letter queue are declared (``Declared``), or not:
  ``BrokerUnavailable``, ``QueueNotEmpty`` (being deleted, messages or consumers remain),
  ``Pending``.
* ``Available`` — from the Deployment's own ``Available`` condition: ``ReplicasAvailable``,
  ``ReplicasUnavailable``, ``Pending`` (no Deployment seen yet).
* ``Ready`` — both of the above and the last reconcile succeeded: ``Reconciled``; else the
  first thing in the way: ``InvalidSpec``, ``ApplyFailed``, ``QueueNotReady``, ``Unavailable``.

Pipeline: one ``Ready`` condition, ``Resolved`` or the ``PipelineProblem`` reason
(``ServiceNotFound``, ``TypeMismatch``, ``InvalidSteps``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from aiso import topology
from aiso.resources import AIService, Pipeline, PipelineProblem, resolve_pipeline

__all__ = [
    "Problem",
    "QueueState",
    "ServiceFacts",
    "condition",
    "merge_conditions",
    "pipeline_status",
    "same_status",
    "service_status",
    "validation_message",
]


@dataclass(frozen=True)
class Problem:
    """Why something is not as desired: a CamelCase reason and a message for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class QueueState:
    """What the operator last learnt about a service's queue."""

    declared: bool = False
    problem: Problem | None = None
    messages: int = 0
    consumers: int = 0


@dataclass(frozen=True)
class ServiceFacts:
    """Everything an AIService's status is computed from."""

    name: str
    generation: int | None
    queue: QueueState
    deployment: Mapping[str, Any] | None
    """The Deployment's ``status`` (None until one was seen)."""
    problem: Problem | None = None
    """Why the last reconcile failed (``InvalidSpec``, ``ApplyFailed``), if it did."""


def condition(
    type_: str, ok: bool | None, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """A condition without its transition time (``merge_conditions`` adds it)."""
    cond: dict[str, Any] = {
        "type": type_,
        "status": "Unknown" if ok is None else str(ok),
        "reason": reason,
        "message": message,
    }
    if generation is not None:  # a stored null would read back as a missing key
        cond["observedGeneration"] = generation
    return cond


def merge_conditions(
    previous: Sequence[Mapping[str, Any]], current: Sequence[dict[str, Any]], now: datetime
) -> list[dict[str, Any]]:
    """``current`` with ``lastTransitionTime`` kept from ``previous`` where status is unchanged."""
    before = {c.get("type"): c for c in previous}
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    merged = []
    for cond in current:
        old = before.get(cond["type"])
        if (
            old is not None
            and old.get("status") == cond["status"]
            and old.get("lastTransitionTime")
        ):
            merged.append({**cond, "lastTransitionTime": old["lastTransitionTime"]})
        else:
            merged.append({**cond, "lastTransitionTime": stamp})
    return merged


def _deployment_available(facts: ServiceFacts) -> tuple[bool | None, str, str]:
    status = facts.deployment
    if status is None:
        return None, "Pending", "waiting for the Deployment"
    ready = int(status.get("readyReplicas") or 0)
    wanted = int(status.get("replicas") or 0)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Available":
            if cond.get("status") == "True":
                return True, "ReplicasAvailable", f"{ready}/{wanted} replicas ready"
            detail = cond.get("message") or cond.get("reason") or "not available"
            return False, "ReplicasUnavailable", f"{ready}/{wanted} replicas ready: {detail}"
    return None, "Pending", f"{ready}/{wanted} replicas ready; the Deployment reports nothing yet"


def service_status(facts: ServiceFacts) -> dict[str, Any]:
    """The AIService ``status`` (conditions without transition times) for ``facts``."""
    gen = facts.generation
    queue = facts.queue
    queue_name = topology.service_queue(facts.name)
    if queue.problem is not None:
        queue_cond = condition(
            "QueueReady", False, queue.problem.reason, queue.problem.message, gen
        )
    elif queue.declared:
        msg = f"{queue_name} and {topology.dead_queue(facts.name)} declared"
        queue_cond = condition("QueueReady", True, "Declared", msg, gen)
    else:
        queue_cond = condition("QueueReady", None, "Pending", f"{queue_name} not declared yet", gen)
    ok, reason, msg = _deployment_available(facts)
    available = condition("Available", ok, reason, msg, gen)
    if facts.problem is not None:
        ready = condition("Ready", False, facts.problem.reason, facts.problem.message, gen)
    elif queue_cond["status"] != "True":
        ready = condition("Ready", False, "QueueNotReady", queue_cond["message"], gen)
    elif available["status"] != "True":
        ready = condition("Ready", False, "Unavailable", available["message"], gen)
    else:
        ready = condition("Ready", True, "Reconciled", available["message"], gen)
    deployment = facts.deployment or {}
    return {
        "conditions": [ready, queue_cond, available],
        **({"observedGeneration": gen} if gen is not None else {}),
        "replicas": int(deployment.get("replicas") or 0),
        "readyReplicas": int(deployment.get("readyReplicas") or 0),
        "queue": {"name": queue_name, "messages": queue.messages, "consumers": queue.consumers},
    }


def validation_message(exc: ValidationError) -> str:
    """The first error of a Pydantic validation, as ``field.path: message``."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}"


def pipeline_status(body: Mapping[str, Any], services: Mapping[str, AIService]) -> dict[str, Any]:
    """The Pipeline ``status`` (without transition time): ``resolve_pipeline`` says it all."""
    generation = body.get("metadata", {}).get("generation")
    try:
        pipeline = Pipeline.model_validate({k: body[k] for k in ("metadata", "spec") if k in body})
    except ValidationError as exc:
        result: Any = PipelineProblem(reason="InvalidSteps", message=validation_message(exc))
    else:
        result = resolve_pipeline(pipeline, services)
    if isinstance(result, PipelineProblem):
        ready = condition("Ready", False, result.reason, result.message, generation)
        steps: list[dict[str, Any]] = []
    else:
        chain = " → ".join(s.name for s in result.steps)
        message = f"{chain} ({result.input.value} → {result.output.value})"
        ready = condition("Ready", True, "Resolved", message, generation)
        steps = [s.model_dump(mode="json", by_alias=True, exclude_none=True) for s in result.steps]
    status: dict[str, Any] = {"conditions": [ready], "steps": steps}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def same_status(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether ``current`` already says what ``desired`` says (transition times aside)."""
    if not current:
        return False

    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        conds = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in status.get("conditions") or []
        ]
        return {**{k: v for k, v in status.items() if k in desired}, "conditions": conds}

    return strip(current) == strip(desired)
