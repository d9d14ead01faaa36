"""Where a process learns which services and pipelines exist.

``FileRegistry`` reads the manifests directory (``aiso dev``) and notices edits;
``aiso.registry_kubernetes.KubernetesRegistry`` watches the API server (cluster mode).
``registry_from_settings`` picks one from ``AISO_REGISTRY``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiso.resources import Catalog, PipelineProblem, ResolvedPipeline, load_manifests
from aiso.settings import Settings

__all__ = ["FileRegistry", "PipelineState", "Registry", "registry_from_settings"]


@dataclass(frozen=True)
class PipelineState:
    """A pipeline as a client may use it: ``plan`` when Ready, else ``problem`` says why."""

    name: str
    plan: ResolvedPipeline | None
    problem: PipelineProblem | None

    @property
    def ready(self) -> bool:
        return self.plan is not None


class Registry(Protocol):
    def catalog(self) -> Catalog: ...

    def pipeline(self, name: str) -> PipelineState | None:
        """None when no pipeline has this name."""

    def close(self) -> None:
        """Stop watching for changes (a no-op for files)."""


class FileRegistry:
    """Manifests from a directory or file; re-read when a file there changes.

    The files are looked at no more than once per ``recheck_seconds``: every request asks
    for the catalog, and listing and stat-ing the directory each time was a measurable share
    of a submission's cost. Pipelines are resolved once per catalog.
    """

    def __init__(self, path: Path, *, recheck_seconds: float = 1.0) -> None:
        self.path = path
        self.recheck_seconds = recheck_seconds
        self._stamp: tuple[tuple[str, float], ...] | None = None
        self._checked_at = float("-inf")
        self._catalog = Catalog()
        self._states: dict[str, PipelineState | None] = {}

    def _current_stamp(self) -> tuple[tuple[str, float], ...]:
        files = sorted(self.path.rglob("*.y*ml")) if self.path.is_dir() else [self.path]
        return tuple((str(f), f.stat().st_mtime) for f in files if f.exists())

    def catalog(self) -> Catalog:
        now = time.monotonic()
        if now - self._checked_at < self.recheck_seconds:
            return self._catalog
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self._catalog = load_manifests(self.path)
            self._states = {}
            self._stamp = stamp
        self._checked_at = now  # only once loaded: a broken manifest is retried next time
        return self._catalog

    def pipeline(self, name: str) -> PipelineState | None:
        catalog = self.catalog()
        if name not in self._states:
            self._states[name] = _state(catalog, name)
        return self._states[name]

    def close(self) -> None:
        pass  # files are re-read on demand: nothing runs in the background


def _state(catalog: Catalog, name: str) -> PipelineState | None:
    if name not in catalog.pipelines:
        return None
    resolved = catalog.resolve(name)
    if isinstance(resolved, PipelineProblem):
        return PipelineState(name, None, resolved)
    return PipelineState(name, resolved, None)


def registry_from_settings(settings: Settings) -> Registry:
    """The manifests under ``settings.manifests`` (``files``), or AIServices and Pipelines
    watched in ``settings.namespace`` (``kubernetes``; listed before this returns)."""
    if settings.registry == "kubernetes":
        from aiso.registry_kubernetes import KubernetesRegistry

        return KubernetesRegistry(settings.namespace).start()
    return FileRegistry(settings.manifests)
