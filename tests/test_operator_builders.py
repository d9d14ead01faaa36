"""The operator's pure parts, without a cluster: what an AIService turns into, and status.

The builders' output is exactly what the operator server-side applies, so these tests pin
the contract with Kubernetes (labels, probes, grace period, autoscaling) and the e2e tests
check that a real API server accepts it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiso.operator import builders
from aiso.operator.settings import OperatorSettings
from aiso.operator.status import (
    Problem,
    QueueState,
    ServiceFacts,
    merge_conditions,
    pipeline_status,
    same_status,
    service_status,
)
from aiso.resources import AIService, load_manifests

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = OperatorSettings(
    default_image="registry.example/aiso:1.2.3",
    broker_secret="broker",
    broker_secret_key="amqp-url",
    termination_margin_seconds=30,
)


def _service(**spec: Any) -> AIService:
    base = {"handler": "aiso.services.normalize:service", "input": ["text"], "output": "text"}
    return AIService.model_validate(
        {"metadata": {"name": "normalize", "namespace": "ns"}, "spec": {**base, **spec}}
    )


def _owner(name: str = "normalize") -> dict[str, Any]:
    body = {
        "apiVersion": "aiso.dev/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name, "namespace": "ns", "uid": "1234"},
    }
    return builders.owner_reference(body)


def _stt() -> AIService:
    doc = yaml.safe_load((ROOT / "manifests" / "stt.yaml").read_text())
    doc["metadata"]["namespace"] = "ns"
    return AIService.model_validate(doc)


# --- Deployment ------------------------------------------------------------------------------


def test_deployment_runs_the_handler_with_the_spec() -> None:
    svc = _stt()
    dep = builders.deployment(svc, _owner("stt"), SETTINGS)
    assert dep["apiVersion"] == "apps/v1" and dep["kind"] == "Deployment"
    assert dep["metadata"]["name"] == "stt" and dep["metadata"]["namespace"] == "ns"
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == SETTINGS.default_image
    assert container["command"] == ["aiso"]
    assert container["args"] == [
        "service",
        "run",
        "aiso.services.stt:service",
        "--port",
        "8000",
        "--concurrency",
        "1",
    ]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    # Replicas belong to the autoscaler.
    assert "replicas" not in dep["spec"]


def test_spec_image_wins_over_the_default() -> None:
    dep = builders.deployment(_service(image="me/mine:1"), _owner(), SETTINGS)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "me/mine:1"


def test_broker_url_comes_from_the_secret_and_spec_env_may_override_by_name() -> None:
    svc = _service(
        timeoutSeconds=12.5,
        env=[
            {"name": "EXTRA", "value": "1"},
            {"name": "AISO_SHUTDOWN_GRACE_SECONDS", "value": "99"},
        ],
    )
    env = builders.deployment(svc, _owner(), SETTINGS)["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    by_name = {e["name"]: e for e in env}
    assert [e["name"] for e in env] == ["AISO_AMQP_URL", "AISO_SHUTDOWN_GRACE_SECONDS", "EXTRA"]
    assert by_name["AISO_AMQP_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "broker", "key": "amqp-url"}
    }
    assert by_name["AISO_SHUTDOWN_GRACE_SECONDS"]["value"] == "99"
    default_env = builders.deployment(_service(timeoutSeconds=12.5), _owner(), SETTINGS)
    container = default_env["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "AISO_SHUTDOWN_GRACE_SECONDS", "value": "13"} in container["env"]


def test_probes_metrics_and_grace_period() -> None:
    dep = builders.deployment(_service(timeoutSeconds=45), _owner(), SETTINGS)
    template = dep["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    # A replica told to stop finishes its in-flight work (one deadline) and still has a margin.
    assert template["spec"]["terminationGracePeriodSeconds"] == 45 + 30


def test_labels_selector_and_owner() -> None:
    svc = _service()
    for obj in builders.children(svc, _owner(), SETTINGS, keda=False) + builders.children(
        svc, _owner(), SETTINGS, keda=True
    ):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "normalize"
        assert labels["app.kubernetes.io/component"] == "aiservice"
        assert labels["app.kubernetes.io/managed-by"] == "aiso-operator"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "aiso.dev/v1alpha1",
            "kind": "AIService",
            "name": "normalize",
            "uid": "1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    dep = builders.deployment(svc, _owner(), SETTINGS)
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "normalize",
        "app.kubernetes.io/component": "aiservice",
    }
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_service_exposes_the_http_port() -> None:
    svc = builders.http_service(_service(), _owner(), SETTINGS)
    assert svc["apiVersion"] == "v1" and svc["kind"] == "Service"
    assert svc["spec"]["selector"] == builders.selector_labels("normalize")
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


# --- autoscaling -----------------------------------------------------------------------------


def test_hpa_scales_on_cpu_and_queue_depth() -> None:
    hpa = builders.horizontal_pod_autoscaler(
        _service(
            scaling={
                "minReplicas": 2,
                "maxReplicas": 7,
                "targetQueueDepth": 15,
                "targetCPUUtilization": 60,
            }
        ),
        _owner(),
        SETTINGS,
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "normalize",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 7)
    cpu, queue = spec["metrics"]
    assert cpu == {
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}},
    }
    assert queue == {
        "type": "External",
        "external": {
            "metric": {
                "name": "rabbitmq_queue_messages_ready",
                "selector": {"matchLabels": {"queue": "aiso.svc.normalize"}},
            },
            "target": {"type": "AverageValue", "averageValue": "15"},
        },
    }


def test_hpa_without_cpu_target_and_with_impossible_bounds() -> None:
    hpa = builders.horizontal_pod_autoscaler(
        _service(scaling={"minReplicas": 0, "maxReplicas": 1, "targetCPUUtilization": None}),
        _owner(),
        SETTINGS,
    )
    # An HPA cannot scale to zero (KEDA can); only the queue metric is left.
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 1)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["External"]
    raised = builders.horizontal_pod_autoscaler(
        _service(scaling={"minReplicas": 5, "maxReplicas": 2}), _owner(), SETTINGS
    )
    assert (raised["spec"]["minReplicas"], raised["spec"]["maxReplicas"]) == (5, 5)


def test_keda_scaled_object_and_trigger_authentication() -> None:
    svc = _service(scaling={"minReplicas": 0, "maxReplicas": 6, "targetQueueDepth": 8})
    auth = builders.trigger_authentication(svc, _owner(), SETTINGS)
    assert auth["apiVersion"] == "keda.sh/v1alpha1" and auth["kind"] == "TriggerAuthentication"
    assert auth["metadata"]["name"] == "normalize-broker"
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "broker", "key": "amqp-url"}
    ]
    so = builders.scaled_object(svc, _owner(), SETTINGS)
    assert so["kind"] == "ScaledObject" and so["metadata"]["name"] == "normalize"
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == "normalize"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    rabbit, cpu = spec["triggers"]
    assert rabbit == {
        "type": "rabbitmq",
        "metadata": {
            "protocol": "amqp",
            "mode": "QueueLength",
            "value": "8",
            "queueName": "aiso.svc.normalize",
        },
        "authenticationRef": {"name": "normalize-broker"},
    }
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}


def test_children_switch_between_hpa_and_keda() -> None:
    svc = _service()
    kinds = [o["kind"] for o in builders.children(svc, _owner(), SETTINGS, keda=False)]
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    kinds = [o["kind"] for o in builders.children(svc, _owner(), SETTINGS, keda=True)]
    assert kinds == ["Deployment", "Service", "TriggerAuthentication", "ScaledObject"]


def test_every_example_manifest_builds() -> None:
    catalog = load_manifests(ROOT / "manifests")
    assert catalog.services
    for svc in catalog.services.values():
        svc = svc.model_copy(
            update={"metadata": svc.metadata.model_copy(update={"namespace": "x"})}
        )
        for obj in builders.children(svc, _owner(svc.name), SETTINGS, keda=False):
            assert obj["metadata"]["name"] == svc.name


# --- status ----------------------------------------------------------------------------------


def _deployment_status(available: bool, ready: int = 1) -> dict[str, Any]:
    return {
        "replicas": 1,
        "readyReplicas": ready,
        "conditions": [
            {
                "type": "Available",
                "status": str(available),
                "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                "message": "Deployment has minimum availability."
                if available
                else "Deployment does not have minimum availability.",
            }
        ],
    }


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_service_ready_when_queue_declared_and_replicas_available() -> None:
    status = service_status(
        ServiceFacts(
            name="normalize",
            generation=3,
            queue=QueueState(declared=True, messages=4, consumers=2),
            deployment=_deployment_status(True),
        )
    )
    assert _conditions(status) == {
        "Ready": ("True", "Reconciled"),
        "QueueReady": ("True", "Declared"),
        "Available": ("True", "ReplicasAvailable"),
    }
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert status["queue"] == {"name": "aiso.svc.normalize", "messages": 4, "consumers": 2}


@pytest.mark.parametrize(
    ("facts", "ready", "queue", "available"),
    [
        (
            ServiceFacts("s", 1, QueueState(), None),
            ("False", "QueueNotReady"),
            ("Unknown", "Pending"),
            ("Unknown", "Pending"),
        ),
        (
            ServiceFacts("s", 1, QueueState(problem=Problem("BrokerUnavailable", "refused")), None),
            ("False", "QueueNotReady"),
            ("False", "BrokerUnavailable"),
            ("Unknown", "Pending"),
        ),
        (
            ServiceFacts("s", 1, QueueState(declared=True), _deployment_status(False, 0)),
            ("False", "Unavailable"),
            ("True", "Declared"),
            ("False", "ReplicasUnavailable"),
        ),
        (
            ServiceFacts(
                "s",
                2,
                QueueState(declared=True),
                _deployment_status(True),
                Problem("ApplyFailed", "Deployment s: 422"),
            ),
            ("False", "ApplyFailed"),
            ("True", "Declared"),
            ("True", "ReplicasAvailable"),
        ),
    ],
)
def test_service_not_ready_says_why(
    facts: ServiceFacts,
    ready: tuple[str, str],
    queue: tuple[str, str],
    available: tuple[str, str],
) -> None:
    assert _conditions(service_status(facts)) == {
        "Ready": ready,
        "QueueReady": queue,
        "Available": available,
    }


def test_transition_time_changes_only_with_status() -> None:
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    later = datetime(2026, 1, 2, tzinfo=UTC)
    first = merge_conditions(
        [], [{"type": "Ready", "status": "False", "reason": "X", "message": ""}], earlier
    )
    assert first[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    same = merge_conditions(
        first, [{"type": "Ready", "status": "False", "reason": "Y", "message": "m"}], later
    )
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["reason"] == "Y"
    flipped = merge_conditions(
        same, [{"type": "Ready", "status": "True", "reason": "Z", "message": ""}], later
    )
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T00:00:00Z"


def test_same_status_ignores_transition_times_only() -> None:
    desired = service_status(ServiceFacts("s", 1, QueueState(declared=True), None))
    stored = {
        **desired,
        "conditions": merge_conditions([], desired["conditions"], datetime.now(UTC)),
    }
    assert same_status(stored, desired)
    assert not same_status(None, desired)
    changed = service_status(ServiceFacts("s", 1, QueueState(declared=True, messages=1), None))
    assert not same_status(stored, changed)


def _pipeline(steps: list[dict[str, Any]], input_type: str = "text") -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "generation": 2},
        "spec": {"input": input_type, "steps": steps},
    }


def test_pipeline_resolved_lists_its_steps() -> None:
    catalog = load_manifests(ROOT / "manifests")
    status = pipeline_status(
        _pipeline(
            [{"name": "normalize", "service": "normalize"}, {"name": "stats", "service": "stats"}]
        ),
        catalog.services,
    )
    (ready,) = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("True", "Resolved")
    assert ready["message"] == "normalize → stats (text → text)"
    assert status["observedGeneration"] == 2
    assert [s["name"] for s in status["steps"]] == ["normalize", "stats"]
    assert status["steps"][1]["dependsOn"] == ["normalize"]
    assert status["steps"][0]["timeoutSeconds"] == 10


@pytest.mark.parametrize(
    ("pipeline", "reason", "mentions"),
    [
        (_pipeline([{"name": "a", "service": "missing"}]), "ServiceNotFound", "'a'"),
        (_pipeline([{"name": "say", "service": "normalize"}], "audio"), "TypeMismatch", "'say'"),
        (
            _pipeline([{"name": "a", "service": "stats"}, {"name": "a", "service": "stats"}]),
            "InvalidSteps",
            "'a'",
        ),
        (_pipeline([{"name": "Bad Name", "service": "stats"}]), "InvalidSteps", "name"),
    ],
)
def test_pipeline_not_ready_names_the_step(
    pipeline: dict[str, Any], reason: str, mentions: str
) -> None:
    catalog = load_manifests(ROOT / "manifests")
    status = pipeline_status(pipeline, catalog.services)
    (ready,) = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert mentions in ready["message"]
    assert status["steps"] == []
