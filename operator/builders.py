"""Pure functions from an AIService to the Kubernetes objects that run it.

Nothing here talks to a cluster: the handlers server-side apply what these return, so a
builder's output *is* the desired state, and the unit tests check it without an API server.
Every object carries the same labels and an owner reference to its AIService, so deleting the
AIService garbage-collects it and the operator can find the owner of any child it watches.

``spec.replicas`` of the Deployment is deliberately left out: the autoscaler owns it, and
applying a number here would fight every scaling decision.
"""

from __future__ import annotations

import math
from typing import Any

from aiso import topology
from aiso.resources import API_VERSION, AIService

from .settings import OperatorSettings

__all__ = [
    "COMPONENT",
    "FIELD_MANAGER",
    "HPA_API_VERSION",
    "HTTP_PORT",
    "KEDA_API_VERSION",
    "MANAGED_BY",
    "QUEUE_METRIC",
    "children",
    "deployment",
    "horizontal_pod_autoscaler",
    "http_service",
    "labels",
    "owner_reference",
    "scaled_object",
    "selector_labels",
    "trigger_authentication",
]

FIELD_MANAGER = "aiso-operator"
"""Field manager of every server-side apply, and the ``managed-by`` label value."""

MANAGED_BY = FIELD_MANAGER
COMPONENT = "aiservice"
HTTP_PORT = 8000
"""Port of the service runtime's HTTP server (``/healthz``, ``/readyz``, ``/metrics``)."""

HPA_API_VERSION = "autoscaling/v2"
KEDA_API_VERSION = "keda.sh/v1alpha1"

QUEUE_METRIC = "rabbitmq_queue_messages_ready"
"""External metric of a queue's ready messages, as RabbitMQ's Prometheus plugin names it
(served to the HPA by a metrics adapter, with the queue name as the ``queue`` label)."""


def selector_labels(name: str) -> dict[str, str]:
    """Labels that pick a service's pods; immutable in a Deployment, so kept minimal."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": COMPONENT}


def labels(name: str) -> dict[str, str]:
    """Labels of every child object (and of the pods)."""
    return {
        **selector_labels(name),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "aiso",
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """The reference that ties a child to its AIService (and lets the GC delete it)."""
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", API_VERSION),
        "kind": body.get("kind", "AIService"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ais: AIService, owner: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or ais.name,
        "namespace": ais.metadata.namespace,
        "labels": labels(ais.name),
        "ownerReferences": [owner],
    }


def _env(ais: AIService, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The platform's variables first; ``spec.env`` may override any of them by name (a list
    with a repeated name would be refused by server-side apply)."""
    spec = ais.spec
    merged: dict[str, dict[str, Any]] = {
        "AISO_AMQP_URL": {
            "name": "AISO_AMQP_URL",
            "valueFrom": {
                "secretKeyRef": {"name": settings.broker_secret, "key": settings.broker_secret_key}
            },
        },
        # In-flight work never outlives its deadline, so the runtime's drain can stop there.
        "AISO_SHUTDOWN_GRACE_SECONDS": {
            "name": "AISO_SHUTDOWN_GRACE_SECONDS",
            "value": str(math.ceil(spec.timeout_seconds)),
        },
    }
    for var in spec.env:
        merged[str(var.get("name"))] = var
    return list(merged.values())


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def deployment(ais: AIService, owner: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The replicas: ``aiso service run`` of the handler, drained gracefully on scale-in."""
    spec = ais.spec
    name = ais.name
    container = {
        "name": "service",
        "image": spec.image or settings.default_image,
        "command": ["aiso"],
        "args": [
            "service",
            "run",
            spec.handler,
            "--port",
            str(HTTP_PORT),
            "--concurrency",
            str(spec.concurrency),
        ],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        "env": _env(ais, settings),
        "resources": spec.resources,
        # Model loading can take minutes; until it is done liveness is not checked.
        "startupProbe": _probe("/healthz", 5, 60),
        "livenessProbe": _probe("/healthz", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 2),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ais, owner),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "revisionHistoryLimit": 3,
            # Keep consuming capacity during a rollout: a new replica comes up first.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(HTTP_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": math.ceil(
                        spec.timeout_seconds + settings.termination_margin_seconds
                    ),
                    "containers": [container],
                },
            },
        },
    }


def http_service(
    ais: AIService, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """A ClusterIP Service in front of the replicas' HTTP port (``/v1/process``, probes)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ais, owner),
        "spec": {
            "selector": selector_labels(ais.name),
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _replica_bounds(ais: AIService, floor: int) -> tuple[int, int]:
    """(min, max) replicas; max is raised to min rather than refusing the AIService."""
    scaling = ais.spec.scaling
    low = max(floor, scaling.min_replicas)
    return low, max(low, scaling.max_replicas)


def horizontal_pod_autoscaler(
    ais: AIService, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """CPU plus queue depth (an External metric per replica). An HPA cannot scale to zero
    without an alpha feature gate, so ``minReplicas: 0`` becomes 1 here (KEDA honours it)."""
    scaling = ais.spec.scaling
    low, high = _replica_bounds(ais, floor=1)
    metrics: list[dict[str, Any]] = []
    if scaling.target_cpu_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": scaling.target_cpu_utilization,
                    },
                },
            }
        )
    metrics.append(
        {
            "type": "External",
            "external": {
                "metric": {
                    "name": QUEUE_METRIC,
                    "selector": {"matchLabels": {"queue": topology.service_queue(ais.name)}},
                },
                "target": {"type": "AverageValue", "averageValue": str(scaling.target_queue_depth)},
            },
        }
    )
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(ais, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ais.name},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": metrics,
        },
    }


def _trigger_authentication_name(name: str) -> str:
    return f"{name}-broker"


def trigger_authentication(
    ais: AIService, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """Lets KEDA read the broker URL from the same Secret the pods use."""
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "TriggerAuthentication",
        "metadata": _metadata(ais, owner, _trigger_authentication_name(ais.name)),
        "spec": {
            "secretTargetRef": [
                {
                    "parameter": "host",
                    "name": settings.broker_secret,
                    "key": settings.broker_secret_key,
                }
            ]
        },
    }


def scaled_object(
    ais: AIService, owner: dict[str, Any], settings: OperatorSettings
) -> dict[str, Any]:
    """KEDA's replacement for the HPA: the ``rabbitmq`` scaler over AMQP counts the ready
    messages, the same quantity ``targetQueueDepth`` is defined on, and allows scale to zero."""
    scaling = ais.spec.scaling
    low, high = _replica_bounds(ais, floor=0)
    triggers: list[dict[str, Any]] = [
        {
            "type": "rabbitmq",
            "metadata": {
                "protocol": "amqp",
                "mode": "QueueLength",
                "value": str(scaling.target_queue_depth),
                "queueName": topology.service_queue(ais.name),
            },
            "authenticationRef": {"name": _trigger_authentication_name(ais.name)},
        }
    ]
    if scaling.target_cpu_utilization is not None:
        triggers.append(
            {
                "type": "cpu",
                "metricType": "Utilization",
                "metadata": {"value": str(scaling.target_cpu_utilization)},
            }
        )
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": _metadata(ais, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ais.name},
            "minReplicaCount": low,
            "maxReplicaCount": high,
            "triggers": triggers,
        },
    }


def children(
    ais: AIService, owner: dict[str, Any], settings: OperatorSettings, *, keda: bool
) -> list[dict[str, Any]]:
    """Everything an AIService owns, in apply order (the scale target before its scaler)."""
    builders = [deployment, http_service]
    if keda:
        builders += [trigger_authentication, scaled_object]
    else:
        builders += [horizontal_pod_autoscaler]
    return [build(ais, owner, settings) for build in builders]
