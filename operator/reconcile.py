"""What the operator does, between kopf's handlers (thin, in ``handlers``) and the pure
builders and status functions.

One ``Controller`` per operator process holds what it learnt about each AIService (queue,
Deployment status, the last status written) and a lock per AIService, so the reconcile, the
queue timer and the children's events never interleave their writes. Status is always
recomputed whole from those facts and written only when it changed.

Drift repair is event-driven: the operator watches its children (by label, server-side) and
re-applies one when it is deleted, or when its generation or another manager's writes (see
``_marker``) moved past what the operator's own last apply returned — someone edited it. An
unchanged apply writes nothing, so a repair never triggers another. A slow timer re-applies
everything anyway, in case a watch missed something.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from aiso import topology
from aiso.resources import API_VERSION, AIService, QueueDeletionPolicy

from . import builders
from .kube import ApiException, Kube, is_permanent
from .queues import Broker, BrokerUnavailable, QueueStats
from .settings import OperatorSettings
from .status import (
    Problem,
    QueueState,
    ServiceFacts,
    merge_conditions,
    pipeline_status,
    same_status,
    service_status,
    validation_message,
)

__all__ = ["Controller", "parse_service"]

log = logging.getLogger("aiso.operator")

Key = tuple[str, str]
"""(namespace, name) of an AIService or a Pipeline."""

RETRY_SECONDS = 10.0
"""Delay before a reconcile that hit a temporary error (API server, broker) runs again."""


def parse_service(body: Mapping[str, Any]) -> AIService:
    """The AIService model of a custom object; raises ``ValidationError``."""
    return AIService.model_validate({k: body[k] for k in ("metadata", "spec") if k in body})


def _with_kind(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``body`` with its apiVersion and kind, which items of a list response lack: Events and
    owner references need them."""
    return {**body, "apiVersion": API_VERSION, "kind": kind}


def _key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return meta["namespace"], meta["name"]


def _marker(body: Mapping[str, Any]) -> Any:
    """What changes when someone else edits a child, but not when a controller updates its
    status: the generation (not every kind has one) and the other managers' writes to the
    object itself (status and scale are subresources, listed apart)."""
    meta = body.get("metadata", {})
    writes = sorted(
        (entry.get("manager", ""), entry.get("operation", ""), entry.get("time", ""))
        for entry in meta.get("managedFields") or []
        if not entry.get("subresource") and entry.get("manager") != builders.FIELD_MANAGER
    )
    return meta.get("generation"), tuple(writes)


def _event(body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """A Kubernetes Event on ``body`` (what ``kubectl describe`` shows), and the same in the log."""
    meta = body["metadata"]
    where = f"{body.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
    log.log(logging.WARNING if warning else logging.INFO, "%s: %s: %s", where, reason, message)
    # kopf types this as its Body wrapper; any object mapping with metadata works at runtime.
    (kopf.warn if warning else kopf.info)(cast(kopf.Body, body), reason=reason, message=message)


def _api_error(exc: ApiException) -> str:
    return f"{exc.status} {exc.reason}: {(exc.body or '').strip()[:300]}"


@dataclass
class _ServiceState:
    source: dict[str, Any]
    """apiVersion, kind, metadata and spec of the AIService as last reconciled."""
    generation: int | None = None
    queue: QueueState = field(default_factory=QueueState)
    deployment: dict[str, Any] | None = None
    problem: Problem | None = None
    written: dict[str, Any] | None = None
    """The status as last written (or as found at start), for transition times."""
    reconciled_generation: int | None = None
    deleting: bool = False
    children: dict[tuple[str, str], tuple[str, Any]] = field(default_factory=dict)
    """(kind, name) → (uid, marker) of each child as the operator's last apply left it."""


class Controller:
    """The operator's logic for AIServices and Pipelines; kopf's handlers call into it."""

    def __init__(
        self, settings: OperatorSettings, kube: Kube, broker: Broker, *, keda: bool
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.broker = broker
        self.keda = keda
        self._services: dict[Key, _ServiceState] = {}
        # Separate locks: an AIService and a Pipeline may share a name.
        self._locks: collections.defaultdict[Key, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._pipeline_locks: collections.defaultdict[Key, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._catalog_seen: dict[Key, tuple[Any, bool]] = {}
        self._pipelines_written: dict[Key, dict[str, Any]] = {}

    async def close(self) -> None:
        await self.broker.close()

    # --- AIService -----------------------------------------------------------------------

    def _state(self, body: Mapping[str, Any]) -> _ServiceState:
        key = _key(body)
        state = self._services.get(key)
        source = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        if state is None:
            state = _ServiceState(source=source, written=dict(body.get("status") or {}) or None)
            self._services[key] = state
        else:
            state.source = source
        return state

    async def _publish(self, key: Key, state: _ServiceState) -> None:
        """Write the status computed from ``state`` if it differs from the last one written."""
        desired = service_status(
            ServiceFacts(
                name=key[1],
                generation=state.generation,
                queue=state.queue,
                deployment=state.deployment,
                problem=state.problem,
            )
        )
        if same_status(state.written, desired):
            return
        previous = (state.written or {}).get("conditions") or []
        desired["conditions"] = merge_conditions(previous, desired["conditions"], datetime.now(UTC))
        try:
            await self.kube.patch_status(API_VERSION, "AIService", key[0], key[1], desired)
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile
                return
            raise
        state.written = desired

    async def _apply(self, state: _ServiceState, obj: dict[str, Any]) -> dict[str, Any]:
        try:
            stored = await self.kube.apply(obj)
        except ApiException as exc:
            if exc.status != 422:
                raise
            # Maybe a hand-added list entry clashes with ours: take the lists back whole,
            # then apply again. An invalid object fails both ways; its first refusal is the
            # one worth reporting.
            try:
                await self.kube.replace_lists(obj)
                stored = await self.kube.apply(obj)
            except ApiException:
                raise exc from None
        meta = stored["metadata"]
        state.children[stored["kind"], meta["name"]] = (meta["uid"], _marker(stored))
        if obj["kind"] == "Deployment":
            state.deployment = stored.get("status") or {}
        return stored

    def _desired(self, state: _ServiceState) -> list[dict[str, Any]]:
        ais = parse_service(state.source)
        owner = builders.owner_reference(state.source)
        return builders.children(ais, owner, self.settings, keda=self.keda)

    async def reconcile_service(self, body: Mapping[str, Any]) -> None:
        """Apply the children, declare the queues, write the status.

        Raises ``kopf.PermanentError`` when the spec or a child is refused (fixing the spec
        triggers the next attempt) and ``kopf.TemporaryError`` when retrying may help.
        """
        body = _with_kind(body, "AIService")
        key = _key(body)
        if body["metadata"].get("deletionTimestamp"):
            return
        async with self._locks[key]:
            state = self._state(body)
            state.generation = body["metadata"].get("generation")
            try:
                desired = self._desired(state)
            except ValidationError as exc:
                state.problem = Problem("InvalidSpec", validation_message(exc))
                await self._publish(key, state)
                raise kopf.PermanentError(state.problem.message) from None
            what = ""
            try:
                for obj in desired:
                    what = f"{obj['kind']} {obj['metadata']['name']}"
                    await self._apply(state, obj)
                what = f"HorizontalPodAutoscaler {key[1]}"
                if self.keda and await self.kube.delete(
                    builders.HPA_API_VERSION, "HorizontalPodAutoscaler", *key
                ):
                    _event(
                        body,
                        "HPAReplaced",
                        message="deleted the HorizontalPodAutoscaler: KEDA scales this service",
                    )
            except ApiException as exc:
                state.problem = Problem("ApplyFailed", f"{what}: {_api_error(exc)}")
                await self._publish(key, state)
                if is_permanent(exc):
                    raise kopf.PermanentError(state.problem.message) from None
                raise kopf.TemporaryError(state.problem.message, delay=RETRY_SECONDS) from None
            state.problem = None
            try:
                stats = await self.broker.declare(key[1])
            except BrokerUnavailable as exc:
                state.queue = QueueState(problem=Problem("BrokerUnavailable", str(exc)))
                await self._publish(key, state)
                raise kopf.TemporaryError(str(exc), delay=RETRY_SECONDS) from None
            state.queue = QueueState(
                declared=True, messages=stats.messages, consumers=stats.consumers
            )
            await self._publish(key, state)
            if state.reconciled_generation != state.generation:
                state.reconciled_generation = state.generation
                kinds = ", ".join(o["kind"] for o in desired)
                _event(
                    body,
                    "Reconciled",
                    message=f"applied {kinds}; declared queue {stats.name}",
                )

    async def refresh_queue(self, body: Mapping[str, Any]) -> None:
        """Queue depth and consumers into the status; a queue deleted by hand is re-declared."""
        body = _with_kind(body, "AIService")
        key = _key(body)
        async with self._locks[key]:
            state = self._services.get(key)
            if state is None or state.deleting or not state.queue.declared:
                return  # not reconciled yet: the reconcile declares and reports
            try:
                stats = await self.broker.stats(key[1])
                if stats is None:
                    stats = await self.broker.declare(key[1])
                    _event(body, "Repaired", message=f"queue {stats.name} was gone; declared")
            except BrokerUnavailable as exc:
                state.queue = QueueState(problem=Problem("BrokerUnavailable", str(exc)))
            else:
                state.queue = QueueState(
                    declared=True, messages=stats.messages, consumers=stats.consumers
                )
            await self._publish(key, state)

    async def finalize_service(self, body: Mapping[str, Any], retry: int) -> None:
        """Stop the replicas, then delete the queues as ``queueDeletionPolicy`` says.

        With ``DeleteIfEmpty`` a queue that still has messages or consumers is retried a few
        times (``kopf.TemporaryError``), then kept, with a warning Event; the AIService is let
        go either way, so deleting a namespace never hangs on a busy queue.
        """
        body = _with_kind(body, "AIService")
        key = _key(body)
        name = key[1]
        async with self._locks[key]:
            state = self._state(body)
            state.deleting = True
            policy = QueueDeletionPolicy(
                (body.get("spec") or {}).get("queueDeletionPolicy", "DeleteIfEmpty")
            )
            # Consumers go first, so their unacknowledged messages are back in the queue
            # (or acknowledged) before it is judged empty.
            await self.kube.delete("apps/v1", "Deployment", *key)
            if policy is QueueDeletionPolicy.RETAIN:
                _event(
                    body,
                    "QueueRetained",
                    message=f"kept {topology.service_queue(name)} (queueDeletionPolicy: Retain)",
                )
                return
            try:
                kept = await self.broker.delete(
                    name, only_if_empty=policy is QueueDeletionPolicy.DELETE_IF_EMPTY
                )
            except BrokerUnavailable as exc:
                problem, kept = Problem("BrokerUnavailable", f"queues not deleted: {exc}"), []
            else:
                if not kept:
                    _event(
                        body,
                        "QueueDeleted",
                        message=f"deleted {topology.service_queue(name)} and "
                        f"{topology.dead_queue(name)}",
                    )
                    return
                problem = Problem("QueueNotEmpty", _kept_message(kept))
            state.queue = QueueState(
                problem=problem,
                messages=sum(q.messages for q in kept if q.name == topology.service_queue(name)),
            )
            await self._publish(key, state)
            if retry < self.settings.queue_delete_retries:
                raise kopf.TemporaryError(
                    f"{problem.message}; retry {retry + 1}/{self.settings.queue_delete_retries}",
                    delay=self.settings.queue_delete_delay_seconds,
                )
            _event(
                body,
                warning=True,
                reason=problem.reason,
                message=f"{problem.message}; kept them and let the AIService go",
            )

    def forget_service(self, namespace: str, name: str) -> None:
        """Drop what was learnt about an AIService that is gone."""
        self._services.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self._catalog_seen.pop((namespace, name), None)

    async def on_child_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Track the Deployment's status; re-apply a child that was deleted or edited."""
        meta = body["metadata"]
        owner = next(
            (
                ref["name"]
                for ref in meta.get("ownerReferences") or []
                if ref.get("kind") == "AIService" and ref.get("controller")
            ),
            None,
        )
        if owner is None:
            return
        key = (meta["namespace"], owner)
        child = (body["kind"], meta["name"])
        async with self._locks[key]:
            state = self._services.get(key)
            if state is None or state.deleting:
                return
            if child[0] == "Deployment" and event_type != "DELETED":
                state.deployment = dict(body.get("status") or {})
                await self._publish(key, state)
            known = state.children.get(child)
            if event_type is None or known is None or known[0] != meta["uid"]:
                return  # initial listing (the resume reconcile applies), or an older object
            if event_type != "DELETED" and known[1] == _marker(body):
                return  # a status update, or the echo of the operator's own apply
            await self._repair(state, child, deleted=event_type == "DELETED", seen=body)

    async def _repair(
        self,
        state: _ServiceState,
        child: tuple[str, str],
        *,
        deleted: bool,
        seen: Mapping[str, Any],
    ) -> None:
        """Re-apply one child; an Event says so when that changed anything."""
        try:
            wanted = [
                o for o in self._desired(state) if (o["kind"], o["metadata"]["name"]) == child
            ]
        except ValidationError:
            return  # the reconcile reports the invalid spec
        ns = state.source["metadata"]["namespace"]
        for obj in wanted:
            try:
                stored = await self._apply(state, obj)
            except ApiException as exc:  # e.g. the namespace is being deleted
                log.warning("cannot repair %s %s/%s: %s", child[0], ns, child[1], _api_error(exc))
                return
            version = stored["metadata"].get("resourceVersion")
            if deleted or version != seen["metadata"].get("resourceVersion"):
                how = "deleted" if deleted else "changed"
                _event(state.source, "Repaired", f"{child[0]} {child[1]} was {how}; re-applied it")

    # --- Pipelines -----------------------------------------------------------------------

    def catalog_changed(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Whether an AIService event can change a pipeline's resolution: it appeared,
        changed its spec, started being deleted, or is gone (status updates cannot)."""
        key = _key(body)
        if event_type == "DELETED":
            self._catalog_seen.pop(key, None)
            return True
        meta = body["metadata"]
        seen = (meta.get("generation"), bool(meta.get("deletionTimestamp")))
        if self._catalog_seen.get(key) == seen:
            return False
        self._catalog_seen[key] = seen
        return True

    async def validate_pipeline(
        self, body: Mapping[str, Any], services: Mapping[str, AIService]
    ) -> None:
        """Resolve a pipeline against the namespace's AIServices and write its status."""
        body = _with_kind(body, "Pipeline")
        key = _key(body)
        desired = pipeline_status(body, services)
        current = body.get("status") or {}
        async with self._pipeline_locks[key]:
            last = self._pipelines_written.get(key)
            if same_status(current, desired) or (last is not None and same_status(last, desired)):
                return
            previous = (last or current).get("conditions") or []
            desired["conditions"] = merge_conditions(
                previous, desired["conditions"], datetime.now(UTC)
            )
            try:
                await self.kube.patch_status(API_VERSION, "Pipeline", *key, desired)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            self._pipelines_written[key] = desired
            ready = desired["conditions"][0]
            if ready["status"] == "True":
                _event(body, ready["reason"], message=ready["message"])
            else:
                _event(body, warning=True, reason=ready["reason"], message=ready["message"])

    def forget_pipeline(self, namespace: str, name: str) -> None:
        self._pipelines_written.pop((namespace, name), None)
        self._pipeline_locks.pop((namespace, name), None)


def _kept_message(kept: list[QueueStats]) -> str:
    return "; ".join(
        f"{q.name} holds {q.messages} ready message(s), {q.consumers} consumer(s)" for q in kept
    )
