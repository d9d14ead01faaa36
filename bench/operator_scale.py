"""How the operator copes with many AIServices: time to Ready, CPU and memory.

    python bench/operator_scale.py [--services 100] [--idle 60]

Runs ``aiso operator`` (as the ServiceAccount of ``hack/operator-rbac.yaml``) against the
local control plane (``hack/control-plane.sh``: a real kube-apiserver, controllers, kwok fake
nodes; started if ``KUBECONFIG`` names no reachable cluster) and a fresh vhost of the local
RabbitMQ. It applies N AIServices in one ``kubectl apply`` and reports:

* the seconds until every one is Ready (Deployment available with its pods Running under
  kwok, Service, HPA, queues declared, status written);
* the operator's CPU seconds for that, then per minute while idle (the queue-depth timer of
  every AIService keeps ticking), and its peak resident memory (``VmHWM``);
* the seconds until all N are deleted again (finalizer: Deployment deleted, empty queues
  deleted).

psutil is not needed: CPU and memory are read from ``/proc/<pid>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONTROL_PLANE = ROOT / "hack" / "control-plane.sh"
TICK = os.sysconf("SC_CLK_TCK")


def sh(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}… failed: {result.stderr.strip()}")
    return result.stdout


class Cluster:
    """kubectl with the admin kubeconfig of the control plane."""

    def __init__(self) -> None:
        self.started = False
        kubeconfig = os.environ.get("KUBECONFIG")
        cache = Path(os.environ.get("AISO_CACHE", Path.home() / ".cache" / "aiso"))
        self.kubectl_bin = str(cache / "bin" / "kubectl")
        if not (kubeconfig and self._reachable(kubeconfig)):
            self.started = (
                subprocess.run(
                    ["bash", str(CONTROL_PLANE), "status"], capture_output=True
                ).returncode
                != 0
            )
            exports = sh("bash", str(CONTROL_PLANE), "start")
            kubeconfig = next(
                line.split("=", 1)[1].strip('"')
                for line in exports.splitlines()
                if line.startswith("export KUBECONFIG=")
            )
        self.kubeconfig = kubeconfig

    def _reachable(self, kubeconfig: str) -> bool:
        probe = subprocess.run(
            [self.kubectl_bin, "--request-timeout=5s", "get", "--raw", "/readyz"],
            env={**os.environ, "KUBECONFIG": kubeconfig},
            capture_output=True,
            text=True,
        )
        return probe.returncode == 0

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return sh(self.kubectl_bin, *args, stdin=stdin, env={"KUBECONFIG": self.kubeconfig})

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def stop(self) -> None:
        if self.started:
            sh("bash", str(CONTROL_PLANE), "stop")


def token_kubeconfig(cluster: Cluster, path: Path) -> Path:
    token = cluster.kubectl("create", "token", "aiso-operator", "-n", "aiso-system").strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
                "current-context": "c",
            }
        )
    )
    return path


def cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces) start at index 2 (state).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_true(cluster: Cluster, namespace: str, condition: str) -> int:
    """AIServices whose ``condition`` is True for their current generation."""
    count = 0
    for obj in cluster.json("get", "aiservices", "-n", namespace)["items"]:
        status = obj.get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == condition]
        if (
            found
            and found[0]["status"] == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
        ):
            count += 1
    return count


def aiservices(n: int) -> str:
    docs = [
        {
            "apiVersion": "aiso.dev/v1alpha1",
            "kind": "AIService",
            "metadata": {"name": f"svc-{i:03d}"},
            "spec": {
                "handler": "aiso.services.normalize:service",
                "input": ["text"],
                "output": "text",
            },
        }
        for i in range(n)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def wait(what: str, done: Any, timeout: float) -> None:
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    args = parser.parse_args()
    n = args.services

    cluster = Cluster()
    server = cluster.json("version")["serverVersion"]["gitVersion"]
    run = uuid.uuid4().hex[:6]
    namespace, vhost = f"bench-operator-{run}", f"bench-operator-{run}"
    workdir = Path(tempfile.gettempdir()) / namespace
    workdir.mkdir(parents=True, exist_ok=True)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/aiservices.aiso.dev")
    cluster.kubectl("apply", "-f", str(ROOT / "hack" / "operator-rbac.yaml"))
    cluster.kubectl("create", "namespace", namespace)
    sh("rabbitmqctl", "-q", "add_vhost", vhost)
    sh("rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    amqp_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "aiso-broker",
        "-n",
        namespace,
        f"--from-literal=url={amqp_url}",
    )
    log = workdir / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(token_kubeconfig(cluster, workdir / "kubeconfig")),
        "AISO_AMQP_URL": amqp_url,
    }
    with log.open("wb") as out:
        operator = subprocess.Popen(
            [str(Path(sys.executable).with_name("aiso")), "operator", "--namespace", namespace],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait("the operator to start", lambda: "autoscaling with" in log.read_text(), 60)
        time.sleep(2)
        cpu0 = cpu_seconds(operator.pid)
        start = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=aiservices(n))
        applied = time.monotonic() - start
        # QueueReady is the operator's own work (children applied, queues declared); Ready
        # also waits for the Deployments, i.e. controller-manager, scheduler and kwok.
        wait("children and queues", lambda: count_true(cluster, namespace, "QueueReady") == n, 600)
        reconciled = time.monotonic() - start
        wait(f"{n} AIServices Ready", lambda: count_true(cluster, namespace, "Ready") == n, 600)
        ready = time.monotonic() - start
        cpu_ready = cpu_seconds(operator.pid) - cpu0
        deployments = len(cluster.json("get", "deployments", "-n", namespace)["items"])
        cpu1 = cpu_seconds(operator.pid)
        time.sleep(args.idle)
        idle_per_minute = (cpu_seconds(operator.pid) - cpu1) * 60 / args.idle
        peak = peak_rss_mib(operator.pid)
        start = time.monotonic()
        cluster.kubectl("delete", "aiservices", "--all", "-n", namespace, "--wait=false")
        wait(
            f"{n} AIServices deleted",
            lambda: not cluster.json("get", "aiservices", "-n", namespace)["items"],
            600,
        )
        deleted = time.monotonic() - start
        peak = max(peak, peak_rss_mib(operator.pid))
    finally:
        operator.terminate()
        operator.wait(30)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        sh("rabbitmqctl", "-q", "delete_vhost", vhost)
        cluster.stop()

    print(
        f"\naiso operator, {n} AIServices, kubernetes {server} (kwok nodes), {os.cpu_count()} CPUs"
    )
    rows = [
        (f"kubectl apply of {n} AIServices", applied, "s", "one request per object"),
        ("all reconciled, from the apply start", reconciled, "s", "children, queues"),
        ("all Ready, from the apply start", ready, "s", f"{deployments} Deployments"),
        ("operator CPU until all Ready", cpu_ready, "s", ""),
        ("operator CPU while idle", idle_per_minute, "s per minute", ""),
        ("operator peak memory (VmHWM)", peak, "MiB", ""),
        ("all deleted, from kubectl delete", deleted, "s", "finalizers, queues"),
    ]
    for label, value, unit, note in rows:
        print(f"  {label:38} {value:6.1f} {unit}" + (f"   ({note})" if note else ""))
    print(f"  operator log: {log}")


if __name__ == "__main__":
    main()
