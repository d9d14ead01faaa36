"""kopf handlers: each one a few lines handing over to the ``Controller``.

Importing this module registers the handlers with kopf's default registry; ``run`` starts the
operator. Watched resources:

* AIServices — reconciled on resume/create/update and by a slow resync timer, measured by a
  queue timer, finalized on delete (``aiso.dev/queues``), indexed by namespace for pipelines;
* Pipelines — validated on every event and again whenever an AIService in the namespace
  appears, changes its spec or goes away;
* the children (label ``app.kubernetes.io/managed-by=aiso-operator``, selected by the API
  server) — for the Deployment's status and drift repair.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from aiso.resources import GROUP, VERSION, AIService

from . import builders
from .kube import Kube
from .queues import Broker
from .reconcile import Controller, parse_service
from .settings import OperatorSettings

__all__ = ["CHILD_RESOURCES", "run"]

SETTINGS = OperatorSettings()
"""Read when this module is imported: the timers' intervals are decorator arguments."""

CHILD_RESOURCES: tuple[tuple[str, str], ...] = (
    ("apps/v1", "deployments"),
    ("v1", "services"),
    (builders.HPA_API_VERSION, "horizontalpodautoscalers"),
    (builders.KEDA_API_VERSION, "scaledobjects"),
    (builders.KEDA_API_VERSION, "triggerauthentications"),
)
"""(apiVersion, plural) of the kinds the operator creates; KEDA's are only watched when KEDA
is installed when the operator starts."""

MANAGED = f"app.kubernetes.io/managed-by={builders.MANAGED_BY}"


def _configure(settings: kopf.OperatorSettings) -> None:
    """kopf's bookkeeping under our own names; no cluster-wide scanning (least privilege)."""
    settings.persistence.finalizer = "aiso.dev/queues"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="aiso.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="aiso.dev", key="last-handled-configuration"
    )
    settings.posting.reporting_component = builders.FIELD_MANAGER
    settings.posting.event_name_prefix = "aiso-"
    # Resources are discovered once at start: no list/watch of every CRD and namespace.
    settings.scanning.disabled = True
    # "Handler succeeded" for every event and timer tick drowns what matters; the operator
    # logs its own actions (and posts them as Events).
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    for api_version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[api_version, plural] = MANAGED


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    _configure(settings)
    kube = Kube.from_environment()
    keda = SETTINGS.autoscaler == "keda" or (
        SETTINGS.autoscaler == "auto" and await kube.crd_exists("scaledobjects.keda.sh")
    )
    memo.controller = Controller(SETTINGS, kube, Broker(SETTINGS.amqp_url), keda=keda)
    logger.info("autoscaling with %s", "KEDA ScaledObjects" if keda else "HPAs (autoscaling/v2)")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.close()


# --- indices ---------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, "aiservices")
def services_index(
    namespace: str, body: kopf.Body, meta: kopf.Meta, **_: Any
) -> dict[str, AIService]:
    """Valid AIServices not being deleted, by namespace: what pipelines resolve against."""
    if meta.get("deletionTimestamp"):
        return {}
    try:
        return {namespace: parse_service(body)}
    except ValidationError:
        return {}


@kopf.index(GROUP, VERSION, "pipelines")
def pipelines_index(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: {k: body.get(k) for k in ("metadata", "spec", "status")}}


def _services(index: kopf.Index[str, AIService], namespace: str) -> Mapping[str, AIService]:
    return {svc.name: svc for svc in index.get(namespace, [])}


# --- AIService -------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, "aiservices")
@kopf.on.create(GROUP, VERSION, "aiservices")
@kopf.on.update(GROUP, VERSION, "aiservices")
async def reconcile_service(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.reconcile_service(body)


@kopf.timer(
    GROUP,
    VERSION,
    "aiservices",
    interval=SETTINGS.resync_interval_seconds,
    initial_delay=SETTINGS.resync_interval_seconds,
    errors=kopf.ErrorsMode.IGNORED,
)
async def resync_service(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.reconcile_service(body)


@kopf.timer(
    GROUP,
    VERSION,
    "aiservices",
    interval=SETTINGS.status_interval_seconds,
    errors=kopf.ErrorsMode.IGNORED,
)
async def refresh_queue(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.refresh_queue(body)


@kopf.on.delete(GROUP, VERSION, "aiservices")
async def finalize_service(body: kopf.Body, retry: int, memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.finalize_service(body, retry)


@kopf.on.event(GROUP, VERSION, "aiservices")
async def service_event(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    services_index: kopf.Index[str, AIService],
    pipelines_index: kopf.Index[str, dict[str, Any]],
    **_: Any,
) -> None:
    controller: Controller = memo.controller
    if event["type"] == "DELETED":
        controller.forget_service(namespace, name)
    if controller.catalog_changed(event["type"], body):
        services = _services(services_index, namespace)
        for pipeline in pipelines_index.get(namespace, []):
            await controller.validate_pipeline(pipeline, services)


# --- Pipeline --------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, "pipelines")
async def pipeline_event(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    services_index: kopf.Index[str, AIService],
    **_: Any,
) -> None:
    if event["type"] == "DELETED":
        memo.controller.forget_pipeline(namespace, name)
        return
    await memo.controller.validate_pipeline(body, _services(services_index, namespace))


# --- children --------------------------------------------------------------------------------


async def child_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.controller.on_child_event(event["type"], body)


for _api_version, _plural in CHILD_RESOURCES:
    kopf.on.event(_api_version, _plural, id=f"child-{_plural}")(child_event)


def run(namespaces: list[str], *, liveness: str | None = None) -> None:
    """Run the operator until SIGTERM/SIGINT: in ``namespaces``, or cluster-wide if empty."""
    asyncio.run(
        kopf.operator(
            namespaces=namespaces,
            clusterwide=not namespaces,
            standalone=True,
            liveness_endpoint=liveness,
        )
    )
