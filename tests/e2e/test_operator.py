"""``aiso operator`` against a real API server (and real RabbitMQ), as a user runs it.

The operator runs as a subprocess with a token of the ServiceAccount from
``hack/operator-rbac.yaml``, so a permission missing from that file fails here. Each test has
its own namespace and RabbitMQ vhost. Pods never really run (kwok plays the kubelet), so every
example AIService can be applied, whatever its service needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import httpx
import pytest
import yaml

from aiso import topology
from aiso.registry import registry_from_settings
from aiso.registry_kubernetes import KubernetesRegistry
from aiso.resources import load_manifests
from aiso.settings import Settings
from aiso.supervisor import aiso_command
from aiso.wrapper import create_app

if TYPE_CHECKING:
    from conftest import Kube

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
MANIFESTS = ROOT / "manifests"
OPERATOR_RBAC = ROOT / "hack" / "operator-rbac.yaml"
PLATFORM_RBAC = ROOT / "hack" / "platform-rbac.yaml"
CATALOG = load_manifests(MANIFESTS)
KEDA_CRDS = ("scaledobjects.keda.sh", "triggerauthentications.keda.sh")


# --- the cluster side ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(kube: Kube) -> Kube:
    """CRDs and the operator's RBAC installed (both idempotent, like a real install)."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    kube.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *(f"crd/{p.name.removesuffix('.yaml')}" for p in sorted(CRDS.glob("*.yaml"))),
    )
    kube.kubectl("apply", "-f", str(OPERATOR_RBAC))
    return kube


def token_kubeconfig(kube: Kube, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a bound token, two hours)."""
    token = kube.kubectl(
        "create", "token", account, "-n", namespace, "--duration=2h"
    ).stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "e2e", "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def operator_kubeconfig(cluster: Kube, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return token_kubeconfig(
        cluster, "aiso-system", "aiso-operator", tmp_path_factory.mktemp("sa") / "kubeconfig"
    )


def items(kube: Kube, kind: str, namespace: str, *selector: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = kube.kubectl_json("get", kind, "-n", namespace, *selector)[
        "items"
    ]
    return result


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def is_ready(obj: dict[str, Any]) -> bool:
    """Ready=True and about the current generation."""
    ready = conditions(obj).get("Ready", {})
    return (
        ready.get("status") == "True"
        and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
    )


def wait_all_ready(kube: Kube, namespace: str, kind: str, count: int, timeout: float = 90) -> None:
    def probe() -> bool:
        objs = items(kube, kind, namespace)
        return len(objs) == count and all(is_ready(o) for o in objs)

    kube.wait_until(probe, timeout=timeout, what=f"{count} {kind} Ready in {namespace}")


def get(kube: Kube, kind: str, name: str, namespace: str) -> dict[str, Any]:
    obj: dict[str, Any] = kube.kubectl_json("get", kind, name, "-n", namespace)
    return obj


def exists(kube: Kube, kind: str, name: str, namespace: str) -> bool:
    result = kube.kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name")
    return bool(result.stdout.strip())


def events(kube: Kube, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    found = items(kube, "events", namespace, "--field-selector", f"involvedObject.name={name}")
    return [e for e in found if e.get("reason") == reason]


def manifest(name: str, namespace: str) -> str:
    """An example manifest with its namespace set."""
    doc = yaml.safe_load((MANIFESTS / f"{name}.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    return json.dumps(doc)


def aiservice(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aiso.dev/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": {
            "handler": "aiso.services.normalize:service",
            "input": ["text"],
            "output": "text",
            **spec,
        },
    }


# --- the broker side -------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return result.stdout


@dataclass
class Broker:
    vhost: str

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def queues(self) -> dict[str, int]:
        """Ready messages per queue."""
        rows = json.loads(
            _rabbitmqctl(
                "list_queues", "-p", self.vhost, "name", "messages_ready", "--formatter", "json"
            )
            or "[]"
        )
        return {row["name"]: int(row["messages_ready"]) for row in rows}

    def publish(self, service: str, count: int = 1) -> None:
        async def send() -> None:
            connection = await aio_pika.connect(self.url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                for i in range(count):
                    await channel.default_exchange.publish(
                        aio_pika.Message(f"m{i}".encode()),
                        routing_key=topology.service_queue(service),
                    )

        asyncio.run(send())


@pytest.fixture
def broker(amqp_url: str, namespace: str) -> Iterator[Broker]:
    """A vhost of its own, so queues of one test never meet another's."""
    vhost = namespace
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield Broker(vhost)
    _rabbitmqctl("delete_vhost", vhost)


# --- the operator process --------------------------------------------------------------------


@dataclass
class Operator:
    namespace: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)

    def start(self) -> Operator:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            aiso_command("operator", "--namespace", self.namespace),
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as when a node dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def operator(
    cluster: Kube,
    namespace: str,
    operator_kubeconfig: Path,
    broker: Broker,
    tmp_path: Path,
) -> Iterator[Callable[..., Operator]]:
    """Starts ``aiso operator`` for the test's namespace; stops it and releases the
    finalizers it left (so the namespace can be deleted) afterwards."""
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "aiso-broker",
        "-n",
        namespace,
        f"--from-literal=url={broker.url}",
    )
    started: list[Operator] = []

    def start(**env: str) -> Operator:
        op = Operator(
            namespace,
            {
                "KUBECONFIG": str(operator_kubeconfig),
                "AISO_AMQP_URL": broker.url,
                "AISO_OPERATOR_STATUS_INTERVAL_SECONDS": "1",
                "AISO_OPERATOR_QUEUE_DELETE_RETRIES": "3",
                "AISO_OPERATOR_QUEUE_DELETE_DELAY_SECONDS": "2",
                "AISO_OPERATOR_DEFAULT_IMAGE": "registry.example/aiso:e2e",
                **env,
            },
            tmp_path / f"operator-{len(started)}.log",
        )
        started.append(op)
        return op.start()

    yield start
    for op in started:
        op.stop()
        print(f"--- {op.log_path.name} (last lines) ---")
        print("\n".join(op.log().splitlines()[-40:]))
    for obj in items(cluster, "aiservices", namespace):
        if obj["metadata"].get("finalizers"):
            cluster.kubectl(
                "patch",
                "aiservice",
                obj["metadata"]["name"],
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata": {"finalizers": null}}',
                check=False,
            )


# --- tests -----------------------------------------------------------------------------------


def test_example_manifests_become_running_services(
    cluster: Kube, namespace: str, broker: Broker, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    operator()
    kube.kubectl("apply", "-n", namespace, "-f", str(MANIFESTS))
    services, pipelines = CATALOG.services, CATALOG.pipelines
    wait_all_ready(kube, namespace, "aiservices", len(services))
    wait_all_ready(kube, namespace, "pipelines", len(pipelines))

    managed = "-l", "app.kubernetes.io/managed-by=aiso-operator"
    deployments = {
        d["metadata"]["name"]: d for d in items(kube, "deployments", namespace, *managed)
    }
    hpas = {h["metadata"]["name"]: h for h in items(kube, "hpa", namespace, *managed)}
    svcs = {s["metadata"]["name"]: s for s in items(kube, "services", namespace, *managed)}
    assert set(deployments) == set(hpas) == set(svcs) == set(services)
    for name, svc in services.items():
        dep = deployments[name]
        available = conditions(dep)["Available"]["status"]
        assert available == "True", f"{name}: {dep['status']}"
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == (svc.spec.image or "registry.example/aiso:e2e")
        assert container["args"][2:] == [
            svc.spec.handler,
            "--port",
            "8000",
            "--concurrency",
            str(svc.spec.concurrency),
        ]
        pods = items(kube, "pods", namespace, "-l", f"app.kubernetes.io/name={name}")
        assert pods and all(p["status"]["phase"] == "Running" for p in pods)
        assert svcs[name]["spec"]["ports"][0]["port"] == 8000
        scaling = svc.spec.scaling
        spec = hpas[name]["spec"]
        assert (spec["minReplicas"], spec["maxReplicas"]) == (
            max(1, scaling.min_replicas),
            scaling.max_replicas,
        )
        external = next(m for m in spec["metrics"] if m["type"] == "External")["external"]
        assert external["metric"]["selector"]["matchLabels"] == {"queue": f"aiso.svc.{name}"}
        assert external["target"]["averageValue"] == str(scaling.target_queue_depth)
        cpu = next(m for m in spec["metrics"] if m["type"] == "Resource")["resource"]
        assert cpu["target"]["averageUtilization"] == scaling.target_cpu_utilization

    queues = broker.queues()
    for name in services:
        assert f"aiso.svc.{name}" in queues and f"aiso.svc.{name}.dead" in queues

    for obj in items(kube, "aiservices", namespace):
        conds = conditions(obj)
        assert {t: c["status"] for t, c in conds.items()} == {
            "Ready": "True",
            "QueueReady": "True",
            "Available": "True",
        }, obj["status"]
        assert obj["status"]["readyReplicas"] >= 1
        assert obj["status"]["queue"]["name"] == f"aiso.svc.{obj['metadata']['name']}"
    stats = get(kube, "pipeline", "text-stats", namespace)["status"]
    assert conditions({"status": stats})["Ready"]["reason"] == "Resolved"
    assert [s["name"] for s in stats["steps"]] == ["normalize", "stats"]

    table = kube.kubectl("get", "aiservices", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "REPLICAS", "QUEUE", "DEPTH", "AGE"]
    row = next(line.split() for line in table if line.startswith("normalize "))
    assert row[1:4] == ["True", "1", "0"]
    short = kube.kubectl("get", "pl", "text-stats", "-n", namespace).stdout
    assert "True" in short and "normalize → stats (text → text)" in short
    kube.wait_until(lambda: events(kube, namespace, "normalize", "Reconciled"), what="Event")


def test_invalid_resources_are_refused_by_the_api_server(cluster: Kube, namespace: str) -> None:
    def refused(obj: dict[str, Any]) -> str:
        result = cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
        )
        assert result.returncode != 0, f"accepted: {obj}"
        return result.stderr

    error = refused(aiservice("bad-enum", input=["sound"]))
    assert "spec.input[0]" in error and "Unsupported value" in error
    error = refused(aiservice("bad-replicas", scaling={"minReplicas": -1}))
    assert "spec.scaling.minReplicas" in error and "greater than or equal to 0" in error
    error = refused(aiservice("bad-concurrency", concurrency=0))
    assert "spec.concurrency" in error
    error = refused(aiservice("bad-handler", handler="not a handler"))
    assert "spec.handler" in error
    error = refused(aiservice("bad-field", replicas=3))
    assert "unknown field" in error and "replicas" in error
    pipeline = {
        "apiVersion": "aiso.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "no-steps"},
        "spec": {"input": "text", "steps": []},
    }
    assert "spec.steps" in refused(pipeline)
    # Defaults come from the models.
    cluster.apply(aiservice("defaults"), namespace)
    spec = get(cluster, "aiservice", "defaults", namespace)["spec"]
    assert spec["concurrency"] == 4 and spec["queueDeletionPolicy"] == "DeleteIfEmpty"
    assert spec["scaling"] == {
        "minReplicas": 1,
        "maxReplicas": 10,
        "targetQueueDepth": 20,
        "targetCPUUtilization": 70,
    }


def test_pipeline_is_ready_once_its_services_exist(
    cluster: Kube, namespace: str, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    operator()
    kube.apply(manifest("text-stats", namespace))

    def ready_condition() -> dict[str, Any]:
        return conditions(get(kube, "pipeline", "text-stats", namespace)).get("Ready", {})

    def says(status: str, reason: str, text: str) -> Callable[[], bool]:
        def probe() -> bool:
            cond = ready_condition()
            return (cond.get("status"), cond.get("reason")) == (status, reason) and (
                text in cond.get("message", "")
            )

        return probe

    kube.wait_until(says("False", "ServiceNotFound", "step 'normalize'"), what="ServiceNotFound")
    kube.apply(manifest("normalize", namespace))
    kube.wait_until(says("False", "ServiceNotFound", "step 'stats'"), what="next missing step")
    kube.apply(manifest("stats", namespace))
    kube.wait_until(says("True", "Resolved", "normalize → stats"), what="Ready")
    steps = get(kube, "pipeline", "text-stats", namespace)["status"]["steps"]
    assert [(s["name"], s["input"], s["output"]) for s in steps] == [
        ("normalize", "text", "text"),
        ("stats", "text", "text"),
    ]

    # A service that changes its types breaks the chain; one that goes away too.
    kube.apply(
        aiservice("stats", handler="aiso.services.stats:service", input=["audio"]), namespace
    )
    kube.wait_until(says("False", "TypeMismatch", "step 'stats'"), what="TypeMismatch")
    kube.kubectl("delete", "aiservice", "stats", "-n", namespace)
    kube.wait_until(says("False", "ServiceNotFound", "step 'stats'"), what="ServiceNotFound again")


def test_spec_changes_and_hand_edits_are_reconciled(
    cluster: Kube, namespace: str, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    operator()
    kube.apply(manifest("normalize", namespace))
    wait_all_ready(kube, namespace, "aiservices", 1)
    first = get(kube, "deployment", "normalize", namespace)

    kube.kubectl(
        "patch",
        "aiservice",
        "normalize",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "concurrency": 3,
                    "scaling": {"minReplicas": 2, "maxReplicas": 7, "targetQueueDepth": 9},
                }
            }
        ),
    )

    def followed() -> bool:
        dep = get(kube, "deployment", "normalize", namespace)
        hpa = get(kube, "hpa", "normalize", namespace)["spec"]
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        external = next(m for m in hpa["metrics"] if m["type"] == "External")["external"]
        return (
            args[-1] == "3"
            and (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 7)
            and external["target"]["averageValue"] == "9"
        )

    kube.wait_until(followed, what="Deployment and HPA following the spec")
    # The HPA (not the operator) raises the replicas to the new minimum.
    kube.wait_until(
        lambda: get(kube, "deployment", "normalize", namespace)["spec"]["replicas"] == 2,
        what="the HPA scaling to minReplicas",
    )
    wait_all_ready(kube, namespace, "aiservices", 1)

    kube.kubectl("delete", "deployment", "normalize", "-n", namespace)
    kube.wait_until(
        lambda: (
            exists(kube, "deployment", "normalize", namespace)
            and get(kube, "deployment", "normalize", namespace)["metadata"]["uid"]
            != first["metadata"]["uid"]
        ),
        what="the Deployment recreated",
    )
    kube.kubectl(
        "patch",
        "hpa",
        "normalize",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"maxReplicas": 50}}',
    )
    kube.wait_until(
        lambda: get(kube, "hpa", "normalize", namespace)["spec"]["maxReplicas"] == 7,
        what="the hand-edited HPA restored",
    )
    kube.kubectl(
        "patch",
        "service",
        "normalize",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"ports": [{"name": "http", "port": 9000, "targetPort": "http"}]}}),
    )
    kube.wait_until(
        lambda: (
            [p["port"] for p in get(kube, "service", "normalize", namespace)["spec"]["ports"]]
            == [8000]
        ),
        what="the hand-edited Service restored",
    )
    kube.wait_until(lambda: events(kube, namespace, "normalize", "Repaired"), what="Repaired")
    assert len(items(kube, "deployments", namespace)) == 1
    wait_all_ready(kube, namespace, "aiservices", 1)


def test_specs_the_schema_lets_through_are_reported(
    cluster: Kube, namespace: str, operator: Callable[..., Operator]
) -> None:
    """What only Pydantic or the Deployment's own validation refuses shows in the status."""
    kube = cluster
    operator()
    kube.apply(aiservice("negative", retry={"backoffSeconds": [-1]}), namespace)
    kube.apply(
        aiservice("bad-env", env=[{"name": "X", "valueFrom": {"secretKeyRef": {"key": ""}}}]),
        namespace,
    )

    def reason(name: str) -> str | None:
        return conditions(get(kube, "aiservice", name, namespace)).get("Ready", {}).get("reason")

    kube.wait_until(lambda: reason("negative") == "InvalidSpec", what="InvalidSpec")
    kube.wait_until(lambda: reason("bad-env") == "ApplyFailed", what="ApplyFailed")
    message = conditions(get(kube, "aiservice", "bad-env", namespace))["Ready"]["message"]
    assert message.startswith("Deployment bad-env: 422") and "secretKeyRef" in message
    assert not exists(kube, "deployment", "negative", namespace)
    # Fixing the spec is what triggers the next attempt.
    kube.apply(aiservice("bad-env"), namespace)
    kube.apply(aiservice("negative", retry={"backoffSeconds": [1]}), namespace)
    wait_all_ready(kube, namespace, "aiservices", 2)


def test_deletion_garbage_collects_and_handles_queues(
    cluster: Kube, namespace: str, broker: Broker, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    operator()
    kube.apply(aiservice("empty"), namespace)
    kube.apply(aiservice("busy"), namespace)
    kube.apply(aiservice("kept", queueDeletionPolicy="Retain"), namespace)
    kube.apply(aiservice("purged", queueDeletionPolicy="Delete"), namespace)
    wait_all_ready(kube, namespace, "aiservices", 4)
    broker.publish("busy", 2)
    broker.publish("purged", 1)
    kube.wait_until(
        lambda: get(kube, "aiservice", "busy", namespace)["status"]["queue"]["messages"] == 2,
        what="the queue depth in the status",
    )
    row = kube.kubectl("get", "ais", "busy", "-n", namespace).stdout.splitlines()[1].split()
    assert row[3] == "2"  # the QUEUE DEPTH column

    kube.kubectl(
        "delete", "aiservice", "empty", "kept", "purged", "busy", "-n", namespace, "--wait=false"
    )
    # While the busy queue keeps messages the deletion waits, and the status says why.
    kube.wait_until(
        lambda: (
            conditions(get(kube, "aiservice", "busy", namespace))
            .get("QueueReady", {})
            .get("reason")
            == "QueueNotEmpty"
        ),
        interval=0.3,
        what="QueueNotEmpty while deleting",
    )
    kube.wait_until(
        lambda: not items(kube, "aiservices", namespace), timeout=60, what="AIServices gone"
    )
    for kind in ("deployments", "services", "hpa"):
        kube.wait_until(
            lambda kind=kind: (
                not items(kube, kind, namespace, "-l", "app.kubernetes.io/managed-by=aiso-operator")
            ),
            what=f"{kind} garbage-collected",
        )
    queues = broker.queues()
    assert "aiso.svc.empty" not in queues and "aiso.svc.empty.dead" not in queues
    assert "aiso.svc.purged" not in queues
    assert queues["aiso.svc.busy"] == 2
    assert queues["aiso.svc.kept"] == 0
    for name, reason in (
        ("busy", "QueueNotEmpty"),
        ("kept", "QueueRetained"),
        ("empty", "QueueDeleted"),
        ("purged", "QueueDeleted"),
    ):
        kube.wait_until(
            lambda name=name, reason=reason: events(kube, namespace, name, reason),
            what=f"{reason} event for {name}",
        )


def test_operator_killed_midway_converges_without_duplicates(
    cluster: Kube, namespace: str, broker: Broker, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    op = operator()
    kube.kubectl("apply", "-n", namespace, "-f", str(MANIFESTS))
    kube.wait_until(
        lambda: len(items(kube, "deployments", namespace)) >= 2, interval=0.1, what="some work done"
    )
    op.kill()
    # While it is down: a spec change and a deleted child wait for the next operator.
    kube.kubectl(
        "patch",
        "aiservice",
        "stats",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"concurrency": 5}}',
    )
    if exists(kube, "deployment", "normalize", namespace):
        kube.kubectl("delete", "deployment", "normalize", "-n", namespace)
    op.start()
    wait_all_ready(kube, namespace, "aiservices", len(CATALOG.services), timeout=120)
    wait_all_ready(kube, namespace, "pipelines", len(CATALOG.pipelines))

    for kind in ("deployments", "services", "hpa"):
        names = [o["metadata"]["name"] for o in items(kube, kind, namespace)]
        assert sorted(names) == sorted(CATALOG.services), kind
    for name in CATALOG.services:
        owners = get(kube, "deployment", name, namespace)["metadata"]["ownerReferences"]
        assert len(owners) == 1 and owners[0]["name"] == name
    args = get(kube, "deployment", "stats", namespace)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert args[-1] == "5"
    assert set(broker.queues()) == {
        q for name in CATALOG.services for q in (f"aiso.svc.{name}", f"aiso.svc.{name}.dead")
    }


async def test_wrapper_in_cluster_mode_refuses_pipelines_that_are_not_ready(
    cluster: Kube,
    namespace: str,
    broker: Broker,
    operator: Callable[..., Operator],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = cluster
    docs = list(yaml.safe_load_all(PLATFORM_RBAC.read_text()))
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
    kube.apply({"apiVersion": "v1", "kind": "List", "items": docs})
    monkeypatch.setenv(
        "KUBECONFIG", str(token_kubeconfig(kube, namespace, "aiso-platform", tmp_path / "kc"))
    )
    operator()
    for name in ("normalize", "stats", "text-stats"):
        kube.apply(manifest(name, namespace))
    lonely = {
        "apiVersion": "aiso.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "lonely"},
        "spec": {"input": "text", "steps": [{"name": "think", "service": "llm"}]},
    }
    kube.apply(lonely, namespace)
    wait_all_ready(kube, namespace, "aiservices", 2)
    kube.wait_until(
        lambda: conditions(get(kube, "pipeline", "lonely", namespace)).get("Ready"),
        what="the operator's verdict on 'lonely'",
    )

    settings = Settings(
        registry="kubernetes",
        namespace=namespace,
        amqp_url=broker.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'aiso.db'}",
    )
    registry = registry_from_settings(settings)
    assert isinstance(registry, KubernetesRegistry)
    app = create_app(settings, registry)
    text = {"payload_type": "text", "payload": {"text": "Hello there. Bye."}}
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                listed = (await client.get("/v1/pipelines")).json()
                by_name = {p["name"]: p for p in listed}
                assert set(by_name) == {"text-stats", "lonely"}
                assert by_name["text-stats"]["ready"] is True
                assert (by_name["lonely"]["ready"], by_name["lonely"]["reason"]) == (
                    False,
                    "ServiceNotFound",
                )

                refused = await client.post("/v1/tasks", json={"pipeline": "lonely", "input": text})
                assert refused.status_code == 409, refused.text
                assert refused.json()["reason"] == "ServiceNotFound"
                assert "'llm' not found" in refused.json()["detail"]
                accepted = await client.post(
                    "/v1/tasks", json={"pipeline": "text-stats", "input": text}
                )
                assert accepted.status_code == 202, accepted.text

                # The watch follows the cluster: without 'stats' the pipeline is refused.
                kube.kubectl("delete", "aiservice", "stats", "-n", namespace, "--wait=false")
                deadline = time.monotonic() + 60
                while True:
                    response = await client.post(
                        "/v1/tasks", json={"pipeline": "text-stats", "input": text}
                    )
                    if response.status_code == 409 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                assert response.status_code == 409, response.text
                assert response.json()["reason"] == "ServiceNotFound"
    finally:
        registry.close()

    # A gateway that made its registry itself stops the watch threads when it shuts down.
    def watching() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("registry-")]

    assert watching() == []
    owned = create_app(settings)
    async with owned.router.lifespan_context(owned):
        assert sorted(watching()) == ["registry-aiservices", "registry-pipelines"]
    assert watching() == []


def _install_keda_crds(kube: Kube) -> None:
    """Stand-ins for KEDA's CRDs (schema-less): enough for the operator to use KEDA."""
    for name in KEDA_CRDS:
        plural, group = name.split(".", 1)
        kind = {"scaledobjects": "ScaledObject", "triggerauthentications": "TriggerAuthentication"}
        kube.apply(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "scope": "Namespaced",
                    "names": {"plural": plural, "singular": plural[:-1], "kind": kind[plural]},
                    "versions": [
                        {
                            "name": "v1alpha1",
                            "served": True,
                            "storage": True,
                            "subresources": {"status": {}},
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    ],
                },
            }
        )
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in KEDA_CRDS)
    )


def test_keda_replaces_the_hpa_when_installed(
    cluster: Kube, namespace: str, operator: Callable[..., Operator]
) -> None:
    kube = cluster
    first = operator()
    kube.apply(manifest("normalize", namespace))
    wait_all_ready(kube, namespace, "aiservices", 1)
    assert exists(kube, "hpa", "normalize", namespace)
    first.stop()
    _install_keda_crds(kube)
    try:
        operator()  # KEDA is detected at start
        kube.wait_until(
            lambda: (
                exists(kube, "scaledobjects.keda.sh", "normalize", namespace)
                and not exists(kube, "hpa", "normalize", namespace)
            ),
            what="a ScaledObject instead of the HPA",
        )
        scaled = get(kube, "scaledobjects.keda.sh", "normalize", namespace)["spec"]
        (trigger, cpu) = scaled["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"] == {
            "protocol": "amqp",
            "mode": "QueueLength",
            "value": "50",
            "queueName": "aiso.svc.normalize",
        }
        assert trigger["authenticationRef"] == {"name": "normalize-broker"}
        assert cpu["type"] == "cpu"
        auth = get(kube, "triggerauthentications.keda.sh", "normalize-broker", namespace)["spec"]
        assert auth["secretTargetRef"] == [
            {"parameter": "host", "name": "aiso-broker", "key": "url"}
        ]
        kube.wait_until(
            lambda: events(kube, namespace, "normalize", "HPAReplaced"), what="HPAReplaced"
        )
        wait_all_ready(kube, namespace, "aiservices", 1)
    finally:
        kube.kubectl("delete", "crd", *KEDA_CRDS, "--ignore-not-found", "--wait=false", check=False)
