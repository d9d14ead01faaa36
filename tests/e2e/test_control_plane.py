"""Smoke tests of the test control plane itself (hack/control-plane.sh).

They check the parts the rest of the e2e suite relies on: the API server with
CRDs, the controller manager (deployments, replica sets, garbage collection),
the scheduler and kwok (pods placed on fake nodes and Running), and helm.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Kube

CHARTS_DIR = Path(__file__).resolve().parent / "charts"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

pytestmark = pytest.mark.e2e


def test_control_plane_is_ready(kube: Kube) -> None:
    assert kube.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert version["serverVersion"]["major"] == "1"

    nodes = kube.kwok_nodes()
    assert nodes, "no kwok fake node registered"
    for name in nodes:
        node = kube.kubectl_json("get", "node", name)
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}.get("Ready")
        assert ready == "True", f"kwok node {name} is not Ready: {node['status']['conditions']}"


def test_crd_and_custom_object(kube: Kube, namespace: str) -> None:
    group = f"e2e{uuid.uuid4().hex[:8]}.aiso.dev"
    crd_name = f"widgets.{group}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1},
                                        "color": {"type": "string"},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    kube.apply(crd)
    try:
        kube.kubectl("wait", "--for=condition=Established", f"crd/{crd_name}", "--timeout=60s")
        # Discovery can lag a moment behind Established.
        kube.wait_until(
            lambda: (
                kube.kubectl("get", f"widgets.{group}", "-n", namespace, check=False).returncode
                == 0
            ),
            timeout=30,
            what="the new resource to show up in discovery",
        )

        widget = {
            "apiVersion": f"{group}/v1alpha1",
            "kind": "Widget",
            "metadata": {"name": "blue"},
            "spec": {"size": 3, "color": "blue"},
        }
        kube.apply(widget, namespace=namespace)
        got = kube.kubectl_json("get", f"widgets.{group}", "blue", "-n", namespace)
        assert got["spec"] == {"size": 3, "color": "blue"}
        assert got["metadata"]["uid"]

        # The structural schema is enforced by the API server.
        invalid = dict(widget, metadata={"name": "broken"}, spec={"size": 0})
        rejected = kube.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(invalid), check=False
        )
        assert rejected.returncode != 0, rejected.stdout
        assert "spec.size" in rejected.stderr, rejected.stderr

        kube.kubectl("delete", f"widgets.{group}", "blue", "-n", namespace)
        listed = kube.kubectl_json("get", f"widgets.{group}", "-n", namespace)
        assert listed["items"] == []
    finally:
        kube.kubectl("delete", "crd", crd_name, "--ignore-not-found", "--wait=false", check=False)


def _deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    # Only the kwok fake nodes carry this label.
                    "nodeSelector": {"type": "kwok"},
                    "containers": [
                        # Never pulled: kwok pretends to run it.
                        {"name": "app", "image": "registry.invalid/aiso/e2e:none"}
                    ],
                },
            },
        },
    }


def test_deployment_runs_on_kwok_node_and_is_garbage_collected(kube: Kube, namespace: str) -> None:
    name = "web"
    kube.apply(_deployment(name, replicas=2), namespace=namespace)
    kube.kubectl(
        "wait",
        "--for=condition=Available",
        f"deployment/{name}",
        "-n",
        namespace,
        "--timeout=90s",
        timeout=120,
    )

    kwok_nodes = set(kube.kwok_nodes())
    pods = kube.wait_until(
        lambda: (
            [
                p
                for p in kube.kubectl_json("get", "pods", "-n", namespace, "-l", f"app={name}")[
                    "items"
                ]
                if p["status"].get("phase") == "Running"
            ]
            or None
        ),
        timeout=60,
        what="running pods",
    )
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        assert pod["spec"]["nodeName"] in kwok_nodes, (
            f"pod {pod['metadata']['name']} is on {pod['spec'].get('nodeName')!r}, "
            f"not on a node annotated {KWOK_NODE_ANNOTATION}=fake ({sorted(kwok_nodes)})"
        )
        assert pod["status"]["podIP"], pod["status"]
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready.get("Ready") == "True", pod["status"]["conditions"]

    deployment = kube.kubectl_json("get", "deployment", name, "-n", namespace)
    replica_sets = [
        rs
        for rs in kube.kubectl_json("get", "replicasets", "-n", namespace)["items"]
        if any(
            o["uid"] == deployment["metadata"]["uid"]
            for o in rs["metadata"].get("ownerReferences", [])
        )
    ]
    assert len(replica_sets) == 1
    rs_uid = replica_sets[0]["metadata"]["uid"]
    for pod in pods:
        assert [o["uid"] for o in pod["metadata"]["ownerReferences"]] == [rs_uid]

    # Background cascading deletion: the deployment goes at once, the garbage
    # collector then removes its replica set and the replica set's pods.
    kube.kubectl(
        "delete", "deployment", name, "-n", namespace, "--cascade=background", "--wait=false"
    )

    def gone() -> bool:
        left = kube.kubectl_json("get", "replicasets,pods", "-n", namespace)["items"]
        return not left

    kube.wait_until(gone, timeout=90, what="replica set and pods to be garbage-collected")


def test_helm_install_and_uninstall(kube: Kube, namespace: str) -> None:
    release = "smoke"
    chart = CHARTS_DIR / "smoke"
    kube.helm("lint", str(chart))
    kube.helm(
        "install",
        release,
        str(chart),
        "--namespace",
        namespace,
        "--set",
        "message=installed by e2e",
        "--wait",
        "--timeout",
        "2m",
        timeout=180,
    )

    status = json.loads(kube.helm("status", release, "-n", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    releases = json.loads(kube.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [r["name"] for r in releases] == [release]

    fullname = f"{release}-smoke"
    config = kube.kubectl_json("get", "configmap", fullname, "-n", namespace)
    assert config["data"] == {"message": "installed by e2e"}
    deployment = kube.kubectl_json("get", "deployment", fullname, "-n", namespace)
    assert deployment["status"].get("availableReplicas") == 1
    service = kube.kubectl_json("get", "service", fullname, "-n", namespace)
    assert service["spec"]["clusterIP"] not in ("", "None")

    kube.helm("uninstall", release, "-n", namespace, "--wait", "--timeout", "2m", timeout=180)

    releases = json.loads(kube.helm("list", "-n", namespace, "--all", "-o", "json").stdout)
    assert releases == []
    for kind in ("configmap", "deployment", "service"):
        result = kube.kubectl("get", kind, fullname, "-n", namespace, check=False)
        assert result.returncode != 0 and "NotFound" in result.stderr, (
            kind,
            result.stdout,
            result.stderr,
        )

    kube.wait_until(
        lambda: not kube.kubectl_json("get", "replicasets,pods", "-n", namespace)["items"],
        timeout=90,
        what="the release's replica set and pods to be garbage-collected",
    )
