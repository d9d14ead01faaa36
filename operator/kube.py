"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

Children are written with server-side apply under one field manager and ``force``: the
operator owns exactly the fields its builders set, an unchanged apply writes nothing, and a
field someone edited by hand is taken back. The synchronous ``kubernetes`` client runs in
worker threads so the event loop keeps serving kopf.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .builders import FIELD_MANAGER

__all__ = ["ApiException", "Kube", "api_path", "is_permanent"]

_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "ScaledObject": "scaledobjects",
    "TriggerAuthentication": "triggerauthentications",
    "AIService": "aiservices",
    "Pipeline": "pipelines",
}


def api_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    """REST path of a namespaced object of one of the kinds the operator handles."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{root}/namespaces/{namespace}/{_PLURALS[kind]}/{name}"


def is_permanent(exc: ApiException) -> bool:
    """Whether retrying the same request cannot help: the object itself was refused."""
    return exc.status in (400, 404, 422)


class Kube:
    """Apply, delete and status-patch through one ``ApiClient``."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: its service account; elsewhere: ``KUBECONFIG`` or ``~/.kube/config``."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        request = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(*request)
            response.read()
        except urllib3.exceptions.HTTPError as exc:  # not even an answer: worth retrying
            raise ApiException(status=503, reason=f"{type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj``; returns the object as stored."""
        meta = obj["metadata"]
        path = api_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        result: dict[str, Any] = await asyncio.to_thread(
            self._call,
            "PATCH",
            path,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        return result

    async def replace_lists(self, obj: dict[str, Any]) -> None:
        """JSON-merge-patch ``obj``: every list in it replaces the stored one whole.

        The way out when an apply is refused because a list entry someone else added (and
        owns) clashes with one of ours, e.g. a second Service port named ``http``: server-side
        apply merges list entries by key, a merge patch does not. Refused content is refused
        here too, and nothing is deleted meanwhile.
        """
        meta = obj["metadata"]
        path = api_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        await asyncio.to_thread(
            self._call,
            "PATCH",
            path,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/merge-patch+json",
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete one object (its dependents in the background); False if it was not there."""
        path = api_path(api_version, kind, namespace, name)
        try:
            await asyncio.to_thread(
                self._call, "DELETE", path, query=[("propagationPolicy", "Background")]
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status subresource (lists such as ``conditions`` are replaced)."""
        path = api_path(api_version, kind, namespace, name) + "/status"
        await asyncio.to_thread(
            self._call,
            "PATCH",
            path,
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    async def crd_exists(self, name: str) -> bool:
        """Whether a CustomResourceDefinition is installed (needs ``get`` on that one name)."""
        path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        try:
            await asyncio.to_thread(self._call, "GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True
