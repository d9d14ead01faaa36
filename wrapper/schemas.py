"""Request and response bodies of the gateway's REST API.

These models are the API contract: FastAPI validates requests against them and the OpenAPI
document at ``/docs`` is generated from them. Views are built from store records and resources
here, so the routes only decide *which* view to answer with.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiso.contracts import PayloadType
from aiso.registry import PipelineState
from aiso.resources import AIService, Catalog
from aiso.store import StepRecord, TaskRecord, TaskStatus

__all__ = [
    "BreakerView",
    "Health",
    "PayloadBody",
    "PipelineStepView",
    "PipelineView",
    "QueueView",
    "ReplayBody",
    "ReplicaView",
    "ServiceHealth",
    "ServiceView",
    "StepView",
    "TaskAccepted",
    "TaskError",
    "TaskInput",
    "TaskLinks",
    "TaskSubmission",
    "TaskView",
    "task_links",
]


class PayloadBody(BaseModel):
    """A typed payload, e.g. a task's result."""

    payload_type: PayloadType
    payload: dict[str, Any]


class TaskInput(PayloadBody):
    """A task's input; unknown members are refused so a misspelt key is not silently lost."""

    model_config = ConfigDict(extra="forbid")

    payload_type: PayloadType = Field(description="Must be the pipeline's input type.")
    payload: dict[str, Any] = Field(
        description="Checked against the payload type's schema, e.g. text → {'text': str}."
    )


class TaskSubmission(BaseModel):
    """Body of ``POST /v1/tasks``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pipeline": "text-stats",
                    "input": {"payload_type": "text", "payload": {"text": "Hello. World."}},
                    "parameters": {"stats": {}},
                    "callback_url": None,
                    "callback_progress": False,
                }
            ]
        },
    )

    pipeline: str = Field(description="Name of a Ready pipeline.")
    input: TaskInput
    parameters: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-step parameters keyed by step name; merged over the step's own.",
    )
    callback_url: str | None = Field(
        default=None,
        description="http(s) URL that receives a signed webhook when the task ends. It must "
        "resolve to public addresses unless the gateway allows private ones.",
    )
    callback_progress: bool = Field(
        default=False,
        description="Also send every step event (dispatched, succeeded, retrying, …) to "
        "callback_url, not only the end.",
    )

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value


class TaskLinks(BaseModel):
    self: str
    events: str


def task_links(task_id: str) -> TaskLinks:
    return TaskLinks(self=f"/v1/tasks/{task_id}", events=f"/v1/tasks/{task_id}/events")


class TaskAccepted(BaseModel):
    """Answer of ``POST /v1/tasks`` when the task has not ended (yet)."""

    task_id: str
    status: TaskStatus
    links: TaskLinks


class TaskError(BaseModel):
    """Why a task or step failed; the orchestrator may add more members."""

    model_config = ConfigDict(extra="allow")

    code: str | None = Field(
        default=None, description="Stable machine-readable code, e.g. 'Cancelled'."
    )
    message: str


class StepView(BaseModel):
    """One attempt of one step."""

    step: str
    service: str
    attempt: int
    status: str = Field(
        description="scheduled, dispatched, succeeded, failed, timed_out, cancelled or skipped."
    )
    dispatched_at: datetime
    finished_at: datetime | None
    duration_ms: float | None = Field(description="From dispatch to result; null while open.")
    replica: str | None = Field(description="Replica that produced the result.")
    error: TaskError | None

    @classmethod
    def of(cls, record: StepRecord) -> StepView:
        duration = (
            (record.finished_at - record.dispatched_at).total_seconds() * 1000
            if record.finished_at is not None
            else None
        )
        return cls(
            step=record.step,
            service=record.service,
            attempt=record.attempt,
            status=record.status.value,
            dispatched_at=record.dispatched_at,
            finished_at=record.finished_at,
            duration_ms=duration,
            replica=record.replica,
            error=TaskError.model_validate(record.error) if record.error else None,
        )


class TaskView(BaseModel):
    """A task as the client sees it: status, per-attempt history and result."""

    task_id: str
    pipeline: str
    status: TaskStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime
    result: PayloadBody | None = Field(description="The last step's output once succeeded.")
    error: TaskError | None
    steps: list[StepView]
    links: TaskLinks

    @classmethod
    def of(cls, task: TaskRecord, steps: list[StepRecord]) -> TaskView:
        return cls(
            task_id=task.id,
            pipeline=task.pipeline,
            status=task.status,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            deadline_at=task.deadline_at,
            result=PayloadBody.model_validate(task.result) if task.result else None,
            error=TaskError.model_validate(task.error) if task.error else None,
            steps=[StepView.of(s) for s in steps],
            links=task_links(task.id),
        )


class PipelineStepView(BaseModel):
    name: str
    service: str
    input: PayloadType | None = Field(description="Null when the pipeline cannot be resolved.")
    output: PayloadType | None = Field(description="Null when the service does not exist.")


class PipelineView(BaseModel):
    """A pipeline and whether it accepts tasks; ``reason``/``message`` say why not."""

    name: str
    ready: bool
    reason: str | None = Field(description="ServiceNotFound, TypeMismatch or InvalidSteps.")
    message: str | None
    input: PayloadType
    output: PayloadType | None
    timeout_seconds: float
    steps: list[PipelineStepView]

    @classmethod
    def of(cls, state: PipelineState, catalog: Catalog) -> PipelineView:
        spec = catalog.pipelines[state.name].spec
        if state.plan is not None:
            steps = [
                PipelineStepView(name=s.name, service=s.service, input=s.input, output=s.output)
                for s in state.plan.steps
            ]
        else:
            steps = []
            for s in spec.steps:
                service = catalog.services.get(s.service)
                output = service.spec.output if service is not None else None
                steps.append(
                    PipelineStepView(name=s.name, service=s.service, input=None, output=output)
                )
        return cls(
            name=state.name,
            ready=state.ready,
            reason=state.problem.reason if state.problem else None,
            message=state.problem.message if state.problem else None,
            input=spec.input,
            output=state.plan.output if state.plan else None,
            timeout_seconds=spec.timeout_seconds,
            steps=steps,
        )


class QueueView(BaseModel):
    """The service's work queue as the broker reports it."""

    name: str
    messages: int = Field(description="Messages ready for delivery (not yet taken).")
    consumers: int = Field(description="Consumers attached: a rough count of live replicas.")


class BreakerView(BaseModel):
    """The service's circuit breaker, shared by every orchestrator."""

    state: Literal["closed", "open", "half_open"] = Field(
        description="open: dispatches wait (or take the step's fallback); half_open: one probe "
        "is out."
    )
    consecutive_failures: int
    opened_at: datetime | None = Field(description="When it last opened; null while closed.")


class ReplicaView(BaseModel):
    """One replica, as its last heartbeat described it."""

    replica: str
    ready: bool = Field(description="The replica's own readiness (its /readyz).")
    in_flight: int = Field(description="Messages it was working on.")
    version: str | None
    last_seen: datetime = Field(description="When this gateway heard the heartbeat.")


class ServiceHealth(BaseModel):
    """Replicas that sent a heartbeat recently; silent ones drop out after three intervals."""

    ready_replicas: int
    replicas: list[ReplicaView]


class ServiceView(BaseModel):
    """A service: its contract, queues, circuit breaker and replicas."""

    name: str
    input: list[PayloadType]
    output: PayloadType
    concurrency: int
    timeout_seconds: float
    queue: QueueView | None = Field(description="Null when the queue does not exist (yet).")
    dead_letters: int | None = Field(
        description="Messages in the dead-letter queue; null when it does not exist (yet)."
    )
    breaker: BreakerView
    health: ServiceHealth

    @classmethod
    def of(
        cls,
        service: AIService,
        queue: QueueView | None,
        dead: QueueView | None,
        breaker: BreakerView,
        replicas: list[ReplicaView],
    ) -> ServiceView:
        return cls(
            name=service.name,
            input=service.spec.input,
            output=service.spec.output,
            concurrency=service.spec.concurrency,
            timeout_seconds=service.spec.timeout_seconds,
            queue=queue,
            dead_letters=dead.messages if dead is not None else None,
            breaker=breaker,
            health=ServiceHealth(ready_replicas=sum(r.ready for r in replicas), replicas=replicas),
        )


class ReplayBody(BaseModel):
    """Body of ``POST /v1/services/{name}/dead-letters/replay``: all, or the named messages."""

    model_config = ConfigDict(extra="forbid")

    all: bool = Field(default=False, description="Replay every message in the dead queue.")
    message_ids: list[str] = Field(
        default_factory=list, description="Replay these (ids from the listing)."
    )

    @model_validator(mode="after")
    def _one_selection(self) -> ReplayBody:
        if self.all == bool(self.message_ids):
            raise ValueError("give either all=true or a non-empty message_ids, not both")
        return self


class Health(BaseModel):
    status: str = Field(description="'ok' when alive, 'ready' when able to take tasks.")
    checks: dict[str, str] = Field(default_factory=dict, description="Dependency → 'ok'.")
