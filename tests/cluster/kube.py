"""Helpers for tests against the real cluster: its kubectl, and the objects the tests run in it.

The cluster is found through this checkout's `.cluster/kubeconfig` and `.cluster/bin/kubectl`,
which `make cluster` writes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
KUBECTL = ROOT / ".cluster" / "bin" / "kubectl"
CLUSTER_SCRIPT = ROOT / "scripts" / "cluster"
VERSION = "v1.34.4"
NODE = "composemirror-node"
POD_CIDR_PREFIX = "10.42."
SERVICE_CIDR_PREFIX = "10.43."
APP_IMAGE = "composemirror/cluster-test-app:1"

# A tiny HTTP server answering with the pod's name: the image is built from the local base
# image (no registry), so the Dockerfile needs no build context.
APP_DOCKERFILE = """\
FROM composemirror/base:bookworm
LABEL io.composemirror.role=cluster-test-app
CMD ["python3", "-c", "import http.server, socket\\n\
class H(http.server.BaseHTTPRequestHandler):\\n\
    def do_GET(self):\\n\
        body = socket.gethostname().encode()\\n\
        self.send_response(200)\\n\
        self.send_header('Content-Length', str(len(body)))\\n\
        self.end_headers()\\n\
        self.wfile.write(body)\\n\
http.server.ThreadingHTTPServer(('', 8080), H).serve_forever()"]
"""


def kubectl(
    *args: str,
    input: str | None = None,
    kubeconfig: Path = KUBECONFIG,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """The cluster's own kubectl (built with the cluster), never one found on PATH."""
    return subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: {result.stdout}{result.stderr}"
    return result.stdout


def get_json(*args: str) -> Any:
    return json.loads(ok(kubectl("get", *args, "-o", "json")))


@dataclass(frozen=True)
class App:
    """The test app deployed in a namespace: its Service and one ready pod."""

    namespace: str
    service_ip: str
    pod: str
    pod_ip: str


def apply(manifest: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    items = [manifest] if isinstance(manifest, dict) else list(manifest)
    ok(
        kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )
    )


def deploy_app(namespace: str, image: str) -> App:
    """A Deployment of the test image behind a ClusterIP Service `web`, waited until ready."""
    labels = {"app": "web"}
    apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [
                                {
                                    "name": "web",
                                    "image": image,
                                    "imagePullPolicy": "IfNotPresent",
                                    "ports": [{"containerPort": 8080}],
                                    "readinessProbe": {
                                        "tcpSocket": {"port": 8080},
                                        "periodSeconds": 1,
                                    },
                                }
                            ]
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {
                    "type": "ClusterIP",
                    "selector": labels,
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            },
        ]
    )
    ok(
        kubectl(
            "-n", namespace, "rollout", "status", "deployment/web", "--timeout=120s", timeout=150
        )
    )
    pods = get_json("-n", namespace, "pods", "-l", "app=web")["items"]
    running = [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    assert running, pods
    service = get_json("-n", namespace, "service", "web")
    return App(
        namespace=namespace,
        service_ip=service["spec"]["clusterIP"],
        pod=running[0]["metadata"]["name"],
        pod_ip=running[0]["status"]["podIP"],
    )


def run_pod(namespace: str, name: str, image: str, command: Sequence[str]) -> None:
    """A pod running `command` (e.g. sleep), waited until Ready."""
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": name,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": list(command),
                    }
                ],
            },
        }
    )
    ok(
        kubectl(
            "-n",
            namespace,
            "wait",
            f"pod/{name}",
            "--for=condition=Ready",
            "--timeout=120s",
            timeout=150,
        )
    )


def exec_pod(
    namespace: str, pod: str, command: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`kubectl exec` a shell command in a pod (through the API server and the kubelet)."""
    return kubectl("-n", namespace, "exec", pod, "--", "sh", "-c", command, timeout=timeout)


def token_kubeconfig(admin: Path, token: str, namespace: str, out: Path) -> Path:
    """A kube config at `out` for a ServiceAccount `token` on `admin`'s cluster, its context's
    namespace `namespace`: how a user with only that account's rights reaches the cluster."""
    cluster = yaml.safe_load(admin.read_text())["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "limited",
        "clusters": [cluster],
        "users": [{"name": "limited", "user": {"token": token}}],
        "contexts": [
            {
                "name": "limited",
                "context": {"cluster": cluster["name"], "user": "limited", "namespace": namespace},
            }
        ],
    }
    out.write_text(yaml.safe_dump(config))
    return out
