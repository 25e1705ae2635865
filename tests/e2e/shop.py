"""The sandbox's shop on the real cluster, and `composemirror` run against it as a user does.

`shop_on_cluster()` side-loads the images (no registry), applies
composemirror/sandbox/kubernetes.yaml (namespace `shop`, PodSecurity `restricted`) and waits for
its rollouts; `remove_shop()` deletes the namespace when these tests created it. `run()` is the
CLI with the cluster's kube config, the cluster's own kubectl for the forwarder and the agent
image loaded into the node. A missing cluster fails the tests: the cluster is built by
`make cluster`, which `make test` runs first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from composemirror.backends.kubernetes import state as session_state
from tests.cluster.kube import CLUSTER_SCRIPT, KUBECONFIG, KUBECTL, get_json, kubectl, ok
from tests.conftest import ROOT, docker

EXAMPLE = ROOT / "examples" / "local-database" / "compose.yaml"
RENDER_DIR = EXAMPLE.parent / ".composemirror"
MANIFESTS = ROOT / "composemirror" / "sandbox" / "kubernetes.yaml"
NAMESPACE = "shop"
SANDBOX_IMAGE = "composemirror/sandbox:0.1"
AGENT_IMAGE = "composemirror/base:bookworm"
"""The agent's image: no registry here, so the local base image (Debian's python3), loaded into
the node; the agent's code is still carried in the session's Secret."""
CREATED_LABEL = "io.composemirror.role=e2e-shop"


@dataclass(frozen=True, slots=True)
class Shop:
    """The shop's addresses in the cluster, as the API reports them."""

    checkout_pod: str
    checkout_ip: str
    orders_ip: str
    """The orders Service's ClusterIP."""
    postgres_ip: str


def environment(**extra: str) -> dict[str, str]:
    """The CLI's environment: the test cluster, its kubectl, the loaded agent image."""
    env = dict(os.environ)
    env.update(
        KUBECONFIG=str(KUBECONFIG),
        COMPOSEMIRROR_CLUSTER="kubernetes",
        COMPOSEMIRROR_KUBECTL=str(KUBECTL),
        COMPOSEMIRROR_AGENT_IMAGE=AGENT_IMAGE,
    )
    env.update(extra)
    return env


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`composemirror ARGS` against the test cluster."""
    return subprocess.run(
        [sys.executable, "-m", "composemirror", *args],
        cwd=ROOT,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def require_cluster() -> None:
    if not KUBECONFIG.exists() or not KUBECTL.exists():
        pytest.fail(f"no cluster: {KUBECONFIG} is missing; run `make cluster` (make test does)")
    ready = kubectl("get", "--raw", "/readyz", timeout=30)
    if ready.returncode != 0:
        pytest.fail(f"the cluster does not answer: {ready.stderr} (run `make cluster`)")


def load_images(images: Sequence[str]) -> None:
    """Build the sandbox image when missing, then side-load each image into the node."""
    if docker("image", "inspect", SANDBOX_IMAGE).returncode != 0:
        build = docker(
            "build",
            "-q",
            "--build-arg",
            f"BASE_IMAGE={AGENT_IMAGE}",
            "-t",
            SANDBOX_IMAGE,
            str(ROOT / "composemirror" / "sandbox"),
            timeout=900,
        )
        assert build.returncode == 0, build.stderr
    load = subprocess.run(
        [str(CLUSTER_SCRIPT), "load", *images], capture_output=True, text=True, timeout=900
    )
    assert load.returncode == 0, load.stdout + load.stderr


def shop_on_cluster() -> tuple[Shop, bool]:
    """Apply the shop and wait for it; (its addresses, whether this call created the
    namespace)."""
    require_cluster()
    load_images([SANDBOX_IMAGE, AGENT_IMAGE])
    # a namespace deleted by an earlier run goes away first (it cannot be applied to meanwhile)
    phase = kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}").stdout
    if phase == "Terminating":
        kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=120s", timeout=150)
    created = kubectl("get", "namespace", NAMESPACE).returncode != 0
    ok(kubectl("apply", "-f", str(MANIFESTS)))
    if created:
        ok(kubectl("label", "namespace", NAMESPACE, CREATED_LABEL, "--overwrite"))
    for deployment in ("postgres", "orders", "checkout"):
        ok(
            kubectl(
                "-n",
                NAMESPACE,
                "rollout",
                "status",
                f"deployment/{deployment}",
                "--timeout=180s",
                timeout=200,
            )
        )
    return addresses(), created


def addresses() -> Shop:
    pods = get_json("-n", NAMESPACE, "pods", "-l", "app=checkout")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    return Shop(
        checkout_pod=live[0]["metadata"]["name"],
        checkout_ip=live[0]["status"]["podIP"],
        orders_ip=get_json("-n", NAMESPACE, "service", "orders")["spec"]["clusterIP"],
        postgres_ip=get_json("-n", NAMESPACE, "service", "postgres")["spec"]["clusterIP"],
    )


def remove_shop(created: bool) -> None:
    """Delete the namespace if these tests created it (never one that was there before)."""
    if created:
        kubectl("delete", "namespace", NAMESPACE, "--wait=false")


def session_folder(project: str) -> Path:
    """The project's session folder (the forwarder's state and log, the record), where the
    CLI run with `environment()` keeps it."""
    return session_state.session_dir(project, session_state.root(environment()))


def forwarder_state(project: str) -> dict[str, Any]:
    """The forwarder's state file of `project`'s session."""
    state: dict[str, Any] = json.loads((session_folder(project) / "forwarder.json").read_text())
    return state


def agent_states(pod: str, project: str) -> list[str]:
    """The states (`running`, `terminated`, ...) of `project`'s agents in `pod`."""
    status = get_json("-n", NAMESPACE, "pod", pod)["status"]
    return [
        next(iter(entry.get("state") or {"waiting": {}}))
        for entry in status.get("ephemeralContainerStatuses") or []
        if f"-{project}-" in entry["name"]
    ]


def process_alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
