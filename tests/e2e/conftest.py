"""Fixtures for end-to-end tests against a real Kubernetes control plane.

The session-scoped ``kube`` fixture gives every e2e test a running API server
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok fake
nodes, see ``hack/control-plane.sh``):

* if ``KUBECONFIG`` is set and its cluster answers ``/readyz``, that cluster is
  used as is and left running;
* otherwise ``hack/control-plane.sh start`` builds the binaries when they are
  missing, starts the control plane, and the fixture stops it again at the end
  of the session (unless it was already running before, or
  ``AISO_E2E_KEEP_CONTROL_PLANE=1`` is set).

Assertions go through ``kubectl`` and ``helm`` (``kube.kubectl(...)``,
``kube.helm(...)``), run with the fixture's kubeconfig.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE_SCRIPT = REPO_ROOT / "hack" / "control-plane.sh"
E2E_DIR = Path(__file__).resolve().parent
CHARTS_DIR = E2E_DIR / "charts"

# Annotation kwok uses to pick the fake nodes it manages (see control-plane.sh).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test against a real Kubernetes control plane "
        "(started by hack/control-plane.sh)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/e2e is an e2e test, whether or not the module says so.
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


_build_failure = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build the control-plane binaries before any test runs, so a cold build
    # (several minutes) does not count against a per-test timeout. It is a
    # no-op when the cached binaries are up to date.
    config = session.config
    if config.option.collectonly or not any(i.get_closest_marker("e2e") for i in session.items):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            "e2e: hack/control-plane.sh build "
            "(no-op when the binaries are current; a cold build takes minutes)"
        )
    result = subprocess.run(
        ["bash", str(CONTROL_PLANE_SCRIPT), "build"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        config.stash[_build_failure] = result.stdout[-6000:]


class KubeCommandError(AssertionError):
    """A kubectl or helm command failed; carries its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"command failed with exit code {result.returncode}: {' '.join(result.args)}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )


def _cache_dir() -> Path:
    return Path(os.environ.get("AISO_CACHE", Path.home() / ".cache" / "aiso"))


@dataclasses.dataclass(frozen=True)
class Kube:
    """A reachable Kubernetes API server and the tools to talk to it."""

    kubeconfig: Path
    kubectl_bin: str
    helm_bin: str
    helm_home: Path
    started_here: bool = False

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        # Keep helm away from the user's own repositories, plugins and cache.
        env["HELM_CACHE_HOME"] = str(self.helm_home / "cache")
        env["HELM_CONFIG_HOME"] = str(self.helm_home / "config")
        env["HELM_DATA_HOME"] = str(self.helm_home / "data")
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(argv),
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise KubeCommandError(result)
        return result

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (``check=True`` raises on failure)."""
        return self.run([self.kubectl_bin, *args], **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (``check=True`` raises on failure)."""
        return self.run([self.helm_bin, *args], **kwargs)

    def kubectl_json(self, *args: str, **kwargs: Any) -> Any:
        """Run ``kubectl ... -o json`` and decode the result."""
        return json.loads(self.kubectl(*args, "-o", "json", **kwargs).stdout)

    def apply(self, manifest: str | Mapping[str, Any], namespace: str | None = None) -> None:
        """``kubectl apply`` a YAML/JSON document (or a dict)."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["--namespace", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=text)

    def wait_until(
        self,
        probe: Callable[[], T | None],
        *,
        timeout: float = 90,
        interval: float = 1.0,
        what: str = "condition",
    ) -> T:
        """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})"
                )
            time.sleep(interval)

    def kwok_nodes(self) -> list[str]:
        """Names of the fake nodes kwok manages."""
        nodes = self.kubectl_json("get", "nodes")["items"]
        return [
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("annotations", {}).get(KWOK_NODE_ANNOTATION) == "fake"
        ]


def _reachable(kubectl: str, kubeconfig: str) -> bool:
    try:
        result = subprocess.run(
            [kubectl, "--request-timeout=5s", "get", "--raw", "/readyz"],
            env={**os.environ, "KUBECONFIG": kubeconfig},
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == "ok"


def _script(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    # stdout carries the export lines; progress goes to stderr (shown with -s or on failure).
    result = subprocess.run(
        ["bash", str(CONTROL_PLANE_SCRIPT), *args],
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(
            f"hack/control-plane.sh {' '.join(args)} failed with exit code {result.returncode}; "
            "see its output above and the logs in the control-plane state dir",
            pytrace=False,
        )
    return result


def _tool(name: str, bin_dir: Path) -> str | None:
    candidate = bin_dir / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


@pytest.fixture(scope="session")
def kube(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kube]:
    """A running Kubernetes control plane for the whole test session."""
    bin_dir = _cache_dir() / "bin"
    helm_home = tmp_path_factory.mktemp("helm-home")
    build_failure = request.config.stash.get(_build_failure, None)

    existing = os.environ.get("KUBECONFIG")
    if existing:
        # An external cluster only needs kubectl and helm, ours or on PATH.
        kubectl, helm = _tool("kubectl", bin_dir), _tool("helm", bin_dir)
        if kubectl is not None and helm is not None and _reachable(kubectl, existing):
            yield Kube(Path(existing), kubectl, helm, helm_home)
            return

    if build_failure is not None:
        pytest.fail(f"hack/control-plane.sh build failed:\n{build_failure}", pytrace=False)

    was_running = (
        subprocess.run(
            ["bash", str(CONTROL_PLANE_SCRIPT), "status"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )
    exports = _script("start", capture=True).stdout
    kubeconfig = None
    for line in exports.splitlines():
        if line.startswith("export KUBECONFIG="):
            kubeconfig = Path(line.split("=", 1)[1].strip().strip('"'))
    if kubeconfig is None or not kubeconfig.is_file():
        pytest.fail(f"hack/control-plane.sh start printed no usable KUBECONFIG:\n{exports}")

    cluster = Kube(
        kubeconfig,
        str(bin_dir / "kubectl"),
        str(bin_dir / "helm"),
        helm_home,
        started_here=not was_running,
    )
    try:
        yield cluster
    finally:
        if cluster.started_here and os.environ.get("AISO_E2E_KEEP_CONTROL_PLANE") != "1":
            _script("stop")


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"e2e-{base}-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    # The ServiceAccount admission plugin rejects pods until the namespace's
    # default service account exists.
    kube.wait_until(
        lambda: (
            kube.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode
            == 0
        ),
        timeout=60,
        what=f"service account {name}/default",
    )
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
