"""``KubernetesRegistry``: AIServices and Pipelines read from the API server (cluster mode).

The gateway asks its registry on every request, synchronously, so the registry keeps a mirror
in memory: one background thread per kind lists the namespace's objects, then watches from
that list's resourceVersion, and lists again when the watch expires (410 Gone) or fails. It
only reads (``get``/``list``/``watch``, see ``hack/platform-rbac.yaml``).

The operator's verdict on a pipeline wins when it is current: a Pipeline whose ``Ready``
condition is ``False`` for its present generation is refused with the operator's reason, so
the gateway says exactly what ``kubectl get pipelines`` says. Otherwise (Ready, or no operator
has looked yet) the pipeline is resolved here against the mirrored AIServices, with the same
``resolve_pipeline`` the operator uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, TypeVar, get_args

from pydantic import ValidationError

from aiso.registry import PipelineState
from aiso.resources import (
    GROUP,
    VERSION,
    AIService,
    Catalog,
    Pipeline,
    PipelineProblem,
)

__all__ = ["KubernetesRegistry"]

log = logging.getLogger("aiso.registry")

WATCH_SECONDS = 60
"""Server-side timeout of one watch request; the mirror re-watches from where it was."""

_REASONS = get_args(PipelineProblem.model_fields["reason"].annotation)


class _Mirror:
    """Every object of one kind in one namespace, kept current by list + watch."""

    def __init__(self, api: Any, namespace: str, plural: str, changed: threading.Event) -> None:
        from kubernetes import watch

        self._api = api
        self._namespace = namespace
        self.plural = plural
        self._changed = changed
        self._watch = watch.Watch()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._version: str | None = None

    def objects(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def list(self) -> None:
        """Replace the mirror with a fresh list (raises the API's error)."""
        result = self._api.list_namespaced_custom_object(
            GROUP, VERSION, self._namespace, self.plural
        )
        with self._lock:
            self._objects = {o["metadata"]["name"]: o for o in result.get("items", [])}
            self._version = result["metadata"]["resourceVersion"]
        self._changed.set()

    def _watch_once(self) -> None:
        for event in self._watch.stream(
            self._api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self._namespace,
            self.plural,
            resource_version=self._version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
        ):
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":  # typically 410 Gone: the version is too old, list again
                self._version = None
                return
            meta = obj.get("metadata", {})
            with self._lock:
                if kind == "DELETED":
                    self._objects.pop(meta["name"], None)
                elif kind in ("ADDED", "MODIFIED"):
                    self._objects[meta["name"]] = obj
                self._version = meta.get("resourceVersion", self._version)
            if kind != "BOOKMARK":
                self._changed.set()
            if self._stopped.is_set():
                return

    def run(self) -> None:
        delay = 1.0
        while not self._stopped.is_set():
            try:
                if self._version is None:
                    self.list()
                self._watch_once()
                delay = 1.0
            except Exception as exc:  # the API server restarts, the network blips
                if self._stopped.is_set():
                    return
                log.warning("watching %s in %s failed: %s", self.plural, self._namespace, exc)
                self._version = None
                self._stopped.wait(delay)
                delay = min(delay * 2, 30.0)

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()


M = TypeVar("M", AIService, Pipeline)


def _valid(model: type[M], bodies: list[dict[str, Any]]) -> list[tuple[M, dict[str, Any]]]:
    """The objects that validate, with their bodies; one being deleted no longer counts."""
    valid = []
    for body in bodies:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            obj = model.model_validate({k: body[k] for k in ("metadata", "spec") if k in body})
        except ValidationError as exc:
            log.warning("ignoring invalid %s %s: %s", model.__name__, meta.get("name"), exc)
            continue
        valid.append((obj, body))
    return valid


def _current_verdict(body: Mapping[str, Any]) -> PipelineProblem | None:
    """The operator's ``Ready=False`` verdict, if it is about the pipeline as it is now."""
    status = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    if status.get("observedGeneration") != generation:
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "False":
            reason = cond.get("reason")
            if reason in _REASONS:
                return PipelineProblem(reason=reason, message=cond.get("message", ""))
    return None


class KubernetesRegistry:
    """The ``Registry`` of a process running in a cluster (``AISO_REGISTRY=kubernetes``)."""

    def __init__(self, namespace: str, api: Any | None = None) -> None:
        """``api`` is a ``kubernetes.client.CustomObjectsApi``; by default one configured from
        the pod's service account, or ``KUBECONFIG`` outside a cluster."""
        if api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = client.CustomObjectsApi()
        self.namespace = namespace
        self._changed = threading.Event()
        self._services = _Mirror(api, namespace, "aiservices", self._changed)
        self._pipelines = _Mirror(api, namespace, "pipelines", self._changed)
        self._threads: list[threading.Thread] = []
        self._catalog = Catalog()
        self._bodies: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """List both kinds now; raises the API's error (no permission, no such resource)."""
        self._services.list()
        self._pipelines.list()

    def start(self) -> KubernetesRegistry:
        """``refresh`` (so the first request sees everything and a misconfiguration fails
        here), then keep the mirror current from daemon threads."""
        self.refresh()
        for mirror in (self._services, self._pipelines):
            thread = threading.Thread(
                target=mirror.run, name=f"registry-{mirror.plural}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._services.stop()
        self._pipelines.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _snapshot(self) -> tuple[Catalog, dict[str, dict[str, Any]]]:
        """The catalog and the Pipeline bodies behind it, rebuilt after any watch event."""
        with self._lock:
            if self._changed.is_set():
                self._changed.clear()
                services = _valid(AIService, self._services.objects())
                pipelines = _valid(Pipeline, self._pipelines.objects())
                self._catalog = Catalog(
                    services={s.name: s for s, _ in services},
                    pipelines={p.name: p for p, _ in pipelines},
                )
                self._bodies = {p.name: body for p, body in pipelines}
            return self._catalog, self._bodies

    def catalog(self) -> Catalog:
        return self._snapshot()[0]

    def pipeline(self, name: str) -> PipelineState | None:
        catalog, bodies = self._snapshot()
        if name not in catalog.pipelines:
            return None
        verdict = _current_verdict(bodies[name])
        if verdict is not None:
            return PipelineState(name, None, verdict)
        resolved = catalog.resolve(name)
        if isinstance(resolved, PipelineProblem):
            return PipelineState(name, None, resolved)
        return PipelineState(name, resolved, None)
