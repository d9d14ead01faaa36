"""AIService and Pipeline resources (``aiso.dev/v1alpha1``).

These Pydantic models are the one source of truth: manifests are loaded through them, the
operator reconciles them, and the CRD YAML in ``crds/`` is generated from them. Field names are
camelCase on the wire (``timeoutSeconds``) and snake_case in Python.

Pipeline steps are keyed by name and may name the steps they depend on (``dependsOn``); a step
without ``dependsOn`` follows the previous one, so a plain list is a chain and a DAG needs no
new model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from aiso.contracts import PayloadType
from aiso.errors import ManifestError
from aiso.topology import SERVICE_NAME_PATTERN

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AIService",
    "AIServiceSpec",
    "AIServiceStatus",
    "Catalog",
    "CircuitBreakerPolicy",
    "Condition",
    "Fallback",
    "ObjectMeta",
    "Pipeline",
    "PipelineProblem",
    "PipelineSpec",
    "PipelineStatus",
    "PipelineStep",
    "QueueDeletionPolicy",
    "QueueStatus",
    "ResolvedPipeline",
    "ResolvedStep",
    "RetryOverride",
    "RetryPolicy",
    "ScalingPolicy",
    "load_manifests",
    "resolve_pipeline",
]

GROUP = "aiso.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class RetryPolicy(_Model):
    """How often and how late a failed step is tried again."""

    max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts in all, first included."
    )
    backoff_seconds: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0],
        description="Delay before attempt n+1 is the n-th entry (the last one repeats).",
    )

    @field_validator("backoff_seconds")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("backoff delays must be >= 0")
        return value

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2, 3, …)."""
        if not self.backoff_seconds:
            return 0.0
        return self.backoff_seconds[min(attempt - 2, len(self.backoff_seconds) - 1)]


class RetryOverride(_Model):
    """A step's override of its service's retry policy; unset fields keep the service's."""

    max_attempts: int | None = Field(default=None, ge=1, le=100)
    backoff_seconds: list[float] | None = None


class CircuitBreakerPolicy(_Model):
    """When the orchestrator stops sending work to a failing service."""

    failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failures that open the breaker."
    )
    failure_rate_threshold: float | None = Field(
        default=None, gt=0, le=1, description="Failure ratio over the window that opens it."
    )
    window_seconds: float = Field(default=60, gt=0, description="Window for the failure rate.")
    reset_timeout_seconds: float = Field(
        default=30, gt=0, description="Seconds open before one probe is let through."
    )


class ScalingPolicy(_Model):
    """Horizontal autoscaling of a service's replicas."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    target_queue_depth: int = Field(
        default=20, ge=1, description="Ready messages per replica the autoscaler aims for."
    )
    target_cpu_utilization: int | None = Field(
        default=70, ge=1, le=100, alias="targetCPUUtilization", description="Percent of request."
    )


class QueueDeletionPolicy(str, Enum):
    DELETE_IF_EMPTY = "DeleteIfEmpty"
    DELETE = "Delete"
    RETAIN = "Retain"


class AIServiceSpec(_Model):
    """One model or service, run by any number of replicas."""

    handler: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:attribute' of the aiso.sdk.Service that `aiso service run` loads.",
    )
    image: str | None = Field(default=None, description="Container image (cluster mode).")
    input: list[PayloadType] = Field(min_length=1, description="Payload types accepted.")
    output: PayloadType = Field(description="Payload type produced.")
    concurrency: int = Field(
        default=4, ge=1, le=1024, description="Messages one replica runs at once."
    )
    timeout_seconds: float = Field(default=60, gt=0, description="Deadline of one attempt.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreakerPolicy = Field(default_factory=CircuitBreakerPolicy)
    scaling: ScalingPolicy = Field(default_factory=ScalingPolicy)
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Kubernetes ResourceRequirements of the container."
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list, description="Kubernetes EnvVar list for the container."
    )
    queue_deletion_policy: QueueDeletionPolicy = Field(
        default=QueueDeletionPolicy.DELETE_IF_EMPTY,
        description="What happens to the queues when the AIService is deleted.",
    )


class Fallback(_Model):
    """What a step does while its service's breaker is open or after its last attempt fails."""

    type: Literal["skip", "service"] = Field(
        description="'skip' passes the step's input through; 'service' calls another service."
    )
    service: str | None = Field(default=None, description="Service used when type is 'service'.")


class PipelineStep(_Model):
    name: str = Field(pattern=SERVICE_NAME_PATTERN, description="Unique within the pipeline.")
    service: str = Field(pattern=SERVICE_NAME_PATTERN, description="AIService that runs it.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Passed to the handler.")
    depends_on: list[str] | None = Field(
        default=None, description="Steps whose output this one needs; default: the previous step."
    )
    timeout_seconds: float | None = Field(default=None, gt=0, description="Overrides the service.")
    retry: RetryOverride | None = None
    fallback: Fallback | None = None


class PipelineSpec(_Model):
    input: PayloadType = Field(description="Payload type a task must bring.")
    timeout_seconds: float = Field(default=300, gt=0, description="Deadline of the whole task.")
    steps: list[PipelineStep] = Field(min_length=1)


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    observed_generation: int | None = None


class QueueStatus(_Model):
    name: str
    messages: int = 0
    consumers: int = 0


class AIServiceStatus(_Model):
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    replicas: int = 0
    ready_replicas: int = 0
    queue: QueueStatus | None = None


class PipelineStatus(_Model):
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=SERVICE_NAME_PATTERN)
    namespace: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class AIService(_Model):
    api_version: Literal["aiso.dev/v1alpha1"] = "aiso.dev/v1alpha1"
    kind: Literal["AIService"] = "AIService"
    metadata: ObjectMeta
    spec: AIServiceSpec
    status: AIServiceStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class Pipeline(_Model):
    api_version: Literal["aiso.dev/v1alpha1"] = "aiso.dev/v1alpha1"
    kind: Literal["Pipeline"] = "Pipeline"
    metadata: ObjectMeta
    spec: PipelineSpec
    status: PipelineStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


# --- resolution: a pipeline plus the services it names --------------------------------------


class PipelineProblem(_Model):
    """Why a pipeline cannot run: ``reason`` is the CamelCase condition reason."""

    reason: Literal["ServiceNotFound", "TypeMismatch", "InvalidSteps"]
    message: str
    step: str | None = None


class ResolvedStep(_Model):
    """A step with its service's policies folded in: everything the orchestrator needs."""

    name: str
    service: str
    parameters: dict[str, Any]
    depends_on: list[str]
    input: PayloadType
    output: PayloadType
    timeout_seconds: float
    retry: RetryPolicy
    circuit_breaker: CircuitBreakerPolicy
    fallback: Fallback | None = None


class ResolvedPipeline(_Model):
    """Snapshot stored with each task, so editing a pipeline never changes a running task."""

    name: str
    input: PayloadType
    output: PayloadType
    timeout_seconds: float
    steps: list[ResolvedStep]

    def step(self, name: str) -> ResolvedStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def ready_steps(self, done: Iterable[str]) -> list[ResolvedStep]:
        """Steps not in ``done`` whose dependencies are all in it."""
        finished = set(done)
        return [
            s
            for s in self.steps
            if s.name not in finished and all(d in finished for d in s.depends_on)
        ]

    def sinks(self) -> list[ResolvedStep]:
        """Steps no other step depends on: their outputs are the task's result."""
        needed = {d for s in self.steps for d in s.depends_on}
        return [s for s in self.steps if s.name not in needed]


def resolve_pipeline(
    pipeline: Pipeline, services: Mapping[str, AIService]
) -> ResolvedPipeline | PipelineProblem:
    """Check a pipeline against the services it names; a pure function, used everywhere."""
    spec = pipeline.spec
    names = [s.name for s in spec.steps]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        return PipelineProblem(reason="InvalidSteps", step=dup, message=f"step {dup!r} repeats")
    resolved: list[ResolvedStep] = []
    outputs: dict[str, PayloadType] = {}
    previous: str | None = None
    for step in spec.steps:
        service = services.get(step.service)
        if service is None:
            return PipelineProblem(
                reason="ServiceNotFound",
                step=step.name,
                message=f"step {step.name!r}: AIService {step.service!r} not found",
            )
        deps = step.depends_on if step.depends_on is not None else ([previous] if previous else [])
        for dep in deps:
            if dep not in outputs:
                return PipelineProblem(
                    reason="InvalidSteps",
                    step=step.name,
                    message=f"step {step.name!r} depends on {dep!r}, which is not an earlier step",
                )
        if len(deps) > 1:
            return PipelineProblem(
                reason="InvalidSteps",
                step=step.name,
                message=f"step {step.name!r}: joining several steps is not supported yet",
            )
        incoming = outputs[deps[0]] if deps else spec.input
        source = f"step {deps[0]!r}" if deps else "the pipeline input"
        if incoming not in service.spec.input:
            accepted = ", ".join(t.value for t in service.spec.input)
            return PipelineProblem(
                reason="TypeMismatch",
                step=step.name,
                message=(
                    f"step {step.name!r}: {source} gives {incoming.value}, but AIService "
                    f"{service.name!r} accepts {accepted}"
                ),
            )
        fallback = step.fallback
        if fallback is not None and fallback.type == "service":
            target = services.get(fallback.service or "")
            if target is None:
                return PipelineProblem(
                    reason="ServiceNotFound",
                    step=step.name,
                    message=(
                        f"step {step.name!r}: fallback AIService {fallback.service!r} not found"
                    ),
                )
        if fallback is not None and fallback.type == "skip" and service.spec.output != incoming:
            return PipelineProblem(
                reason="TypeMismatch",
                step=step.name,
                message=(
                    f"step {step.name!r}: fallback 'skip' passes {incoming.value} on, but the "
                    f"step should give {service.spec.output.value}"
                ),
            )
        base = service.spec.retry
        override = step.retry
        retry = RetryPolicy(
            max_attempts=(override.max_attempts if override and override.max_attempts else None)
            or base.max_attempts,
            backoff_seconds=(
                override.backoff_seconds
                if override and override.backoff_seconds is not None
                else base.backoff_seconds
            ),
        )
        resolved.append(
            ResolvedStep(
                name=step.name,
                service=step.service,
                parameters=step.parameters,
                depends_on=deps,
                input=incoming,
                output=service.spec.output,
                timeout_seconds=step.timeout_seconds or service.spec.timeout_seconds,
                retry=retry,
                circuit_breaker=service.spec.circuit_breaker,
                fallback=fallback,
            )
        )
        outputs[step.name] = service.spec.output
        previous = step.name
    result = ResolvedPipeline(
        name=pipeline.name,
        input=spec.input,
        output=resolved[-1].output,
        timeout_seconds=spec.timeout_seconds,
        steps=resolved,
    )
    sinks = result.sinks()
    if len(sinks) != 1:
        return PipelineProblem(
            reason="InvalidSteps",
            message=f"a pipeline ends in exactly one step; these end it: "
            f"{', '.join(s.name for s in sinks)}",
        )
    return result.model_copy(update={"output": sinks[0].output})


# --- loading manifests -----------------------------------------------------------------------


class Catalog(BaseModel):
    """The services and pipelines known to a process."""

    services: dict[str, AIService] = Field(default_factory=dict)
    pipelines: dict[str, Pipeline] = Field(default_factory=dict)

    def resolve(self, name: str) -> ResolvedPipeline | PipelineProblem:
        return resolve_pipeline(self.pipelines[name], self.services)


def _documents(path: Path) -> Iterable[tuple[Path, Any]]:
    files = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
    for file in files:
        try:
            for doc in yaml.safe_load_all(file.read_text()):
                if doc is not None:
                    yield file, doc
        except yaml.YAMLError as exc:
            raise ManifestError(f"{file}: not valid YAML: {exc}") from None


def load_manifests(path: Path) -> Catalog:
    """Load every AIService and Pipeline under ``path``; other kinds are ignored."""
    if not path.exists():
        raise ManifestError(f"{path}: no such file or directory")
    catalog = Catalog()
    for file, doc in _documents(path):
        if not isinstance(doc, dict):
            raise ManifestError(f"{file}: a document is not a mapping")
        kind = doc.get("kind")
        model: type[AIService] | type[Pipeline]
        if kind == "AIService":
            model = AIService
        elif kind == "Pipeline":
            model = Pipeline
        else:
            continue
        try:
            obj = model.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            name = (doc.get("metadata") or {}).get("name", "?")
            raise ManifestError(f"{file}: {kind} {name!r}: {where}: {first['msg']}") from None
        target: dict[str, Any] = catalog.services if kind == "AIService" else catalog.pipelines
        if obj.name in target:
            raise ManifestError(f"{file}: {kind} {obj.name!r} is defined twice")
        target[obj.name] = obj
    return catalog
