"""The Kubernetes backend against a real cluster: manifests accepted in a `restricted`
namespace (server-side dry run), permissions and their fallback with a limited ServiceAccount,
and the agent started in a target pod and reached through a port-forward.

The cluster is the one `scripts/cluster up` makes (its kubeconfig in `.cluster/kubeconfig`) or
any other named by COMPOSEMIRROR_TEST_KUBECONFIG. Its node must have the image named by
COMPOSEMIRROR_TEST_AGENT_IMAGE (default `composemirror.local/k8s-dev-python:3.11`; load it with
`scripts/cluster load`). Without a cluster these tests are skipped, except in CI (CI=true), where
that is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import QTYPE, DNSRecord

from composemirror.backends import Resolution, SessionInfo
from composemirror.backends.kubernetes import client, manifests, targets
from composemirror.backends.kubernetes.access import role_manifest
from composemirror.backends.kubernetes.backend import KubernetesBackend, permissions_check
from composemirror.backends.kubernetes.carry import bundle
from composemirror.backends.kubernetes.link import ForwardTarget
from composemirror.config import AgentSettings, Config, Target
from composemirror.errors import ClusterError
from composemirror.link import LinkAddress, TcpAddress
from composemirror.protocol import key_to_text, new_key
from composemirror.sidecar.tunnel import TunnelClient
from tests.cluster.kube import token_kubeconfig
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.cluster

IMAGE = os.environ.get("COMPOSEMIRROR_TEST_AGENT_IMAGE", "composemirror.local/k8s-dev-python:3.11")
PYTHON_POD = """
apiVersion: v1
kind: Pod
metadata: {name: target, labels: {app: target}}
spec:
  securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000,
                    seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: app
    image: IMAGE
    imagePullPolicy: Never
    command: [python3, -m, http.server, "8080"]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    env:
    - {name: GREETING, value: from-the-target}
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: MEMORY_MI
      valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}
    resources: {limits: {memory: 128Mi, cpu: 200m}}
"""


def kubeconfig_path() -> Path:
    chosen = os.environ.get("COMPOSEMIRROR_TEST_KUBECONFIG")
    candidates = [Path(chosen)] if chosen else [ROOT / ".cluster" / "kubeconfig"]
    for path in candidates:
        if path.is_file():
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("no Kubernetes cluster for the e2e tests: run `scripts/cluster up`")
    pytest.skip("no Kubernetes cluster (scripts/cluster up, or COMPOSEMIRROR_TEST_KUBECONFIG)")


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and done.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)}: {done.stderr}")
    return done


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """The test cluster's kube config (skips, or fails in CI, without one)."""
    return kubeconfig_path()


@pytest.fixture(scope="session")
def agent_image(kubeconfig: Path) -> str:
    """The agent's image on the cluster's node: without a registry, the local base image
    (Debian's python3 3.11) is loaded with `scripts/cluster load` when that script is here."""
    loader = ROOT / "scripts" / "cluster"
    if "COMPOSEMIRROR_TEST_AGENT_IMAGE" not in os.environ and loader.is_file():
        subprocess.run(["docker", "tag", "composemirror/base:bookworm", IMAGE], check=True)
        subprocess.run([str(loader), "load", IMAGE], check=True, timeout=600)
    return IMAGE


@pytest.fixture
def cluster_ns(kubeconfig: Path, agent_image: str) -> Iterator[tuple[Path, str]]:
    """A fresh namespace enforcing PodSecurity `restricted`, deleted afterwards."""
    path = kubeconfig
    namespace = f"cm-e2e-{secrets.token_hex(3)}"
    kubectl(path, "create", "namespace", namespace)
    kubectl(path, "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    # pods need the namespace's default ServiceAccount, which a controller adds shortly after
    wait_for(
        lambda: (
            kubectl(
                path, "-n", namespace, "get", "serviceaccount", "default", check=False
            ).returncode
            == 0
        ),
        timeout=30,
    )
    try:
        yield path, namespace
    finally:
        kubectl(path, "delete", "namespace", namespace, "--wait=false", check=False)


def connect(path: Path, namespace: str) -> client.Cluster:
    return client.connect(None, namespace, {"KUBECONFIG": str(path)})


def target_pod(path: Path, namespace: str) -> dict[str, Any]:
    kubectl(path, "-n", namespace, "apply", "-f", "-", stdin=PYTHON_POD.replace("IMAGE", IMAGE))
    return connect(path, namespace).get("pods", "target", namespace)


def config(namespace: str, **agent: Any) -> Config:
    return Config(
        source="test",
        target=Target(kind="pod", name="target"),
        namespace=namespace,
        services=("web",),
        agent=AgentSettings(image=IMAGE, image_pull_policy="Never", **agent),
    )


def test_every_manifest_is_accepted_in_a_restricted_namespace(cluster_ns: tuple[Path, str]) -> None:
    path, namespace = cluster_ns
    cluster = connect(path, namespace)
    pod = target_pod(path, namespace)
    found = targets.resolve(Target(kind="pod", name="target"), pod)
    backend = KubernetesBackend(connect=lambda c, n: cluster)
    check = backend.dry_run_check(cluster, config(namespace), namespace, found)
    assert check.ok, check
    job = backend.dry_run_check(cluster, config(namespace, ephemeral=False), namespace, found)
    assert job.ok and "Job" in job.detail, job
    targetless = Config(
        source="test",
        target=Target(kind="targetless"),
        namespace=namespace,
        services=("web",),
        agent=AgentSettings(image=IMAGE),
    )
    assert backend.dry_run_check(cluster, targetless, namespace, None).ok


def limited_kubeconfig(path: Path, namespace: str, tmp_path: Path) -> Path:
    """A ServiceAccount's kube config whose Role lacks `pods/ephemeralcontainers`."""
    role: dict[str, Any] = role_manifest(namespace)
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["pods/ephemeralcontainers"]]
    kubectl(path, "-n", namespace, "create", "serviceaccount", "limited")
    kubectl(path, "apply", "-f", "-", stdin=yaml.safe_dump(role))
    kubectl(
        path,
        "-n",
        namespace,
        "create",
        "rolebinding",
        "limited",
        "--role=composemirror",
        f"--serviceaccount={namespace}:limited",
    )
    token = kubectl(path, "-n", namespace, "create", "token", "limited").stdout.strip()
    return token_kubeconfig(path, token, namespace, tmp_path / "limited.kubeconfig")


def test_missing_ephemeral_rule_is_named_and_refused(
    cluster_ns: tuple[Path, str], tmp_path: Path
) -> None:
    path, namespace = cluster_ns
    pod = target_pod(path, namespace)
    limited = connect(limited_kubeconfig(path, namespace, tmp_path), namespace)
    check = permissions_check(limited, namespace, config(namespace))
    assert check.ok, check  # Jobs are allowed: the agent can still run
    assert "patch pods/ephemeralcontainers" in check.detail
    assert check.hint is not None and "pods/ephemeralcontainers" in check.hint
    found = targets.resolve(Target(kind="pod", name="target"), pod)
    backend = KubernetesBackend(connect=lambda c, n: limited)
    where = manifests.placement("e2e", namespace, config(namespace).agent, "pod/target")
    plan_container = manifests.ephemeral_patch(
        manifests.ephemeral_container(where, bundle(), found.spec, pod)
    )
    with pytest.raises(ClusterError) as refused:
        limited.add_ephemeral_container("target", namespace, plan_container)
    assert "forbidden: cannot patch pods/target (ephemeralcontainers)" in refused.value.message
    assert "pods/ephemeralcontainers" in str(refused.value.hint)
    assert backend.dry_run_check(limited, config(namespace, ephemeral=False), namespace, found).ok


def session_of(project: str, directory: Path, cfg: Config) -> tuple[SessionInfo, bytes]:
    """A session as `up` makes it: the project, and its key file under `.composemirror/`."""
    info = SessionInfo(
        project=project,
        directory=directory,
        config=cfg,
        resolution=Resolution(description="e2e", target="pod/target"),
        base_image="composemirror/base:bookworm",
    )
    key = new_key()
    info.render_dir.mkdir(parents=True, exist_ok=True)
    info.key_file.write_text(key_to_text(key) + "\n")
    return info, key


def link_port(placement: Any) -> int:
    assert isinstance(placement.link, TcpAddress)
    return placement.link.port


def port_forward(path: Path, started: list[subprocess.Popen[bytes]]) -> Any:
    """A Forwarder made of `kubectl port-forward` (the real one is built separately)."""

    def forward(target: ForwardTarget) -> None:
        process = subprocess.Popen(
            [
                "kubectl",
                "--kubeconfig",
                str(path),
                "-n",
                target.namespace,
                "port-forward",
                f"pod/{target.pod}",
                f"{target.local_port}:{target.remote_port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        assert process.stdout is not None
        process.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> PORT"

    return forward


async def resolve_through(address: str, key: bytes, name: str) -> list[str]:
    link = TunnelClient(LinkAddress.parse(address), key)
    task = asyncio.ensure_future(link.run())
    try:
        for _ in range(100):
            if link.state == "connected":
                break
            await asyncio.sleep(0.1)
        answer = await link.current().query(DNSRecord.question(name, "A").pack())
        return [str(r.rdata) for r in DNSRecord.parse(answer).rr if r.rtype == QTYPE.A]
    finally:
        task.cancel()


def test_agent_in_the_target_pod(cluster_ns: tuple[Path, str], tmp_path: Path) -> None:
    """up's cluster half: Secret, ephemeral agent, ready line, env from the target process,
    a tunnel through the port-forward answering DNS from the pod's resolver; then down."""
    path, namespace = cluster_ns
    target_pod(path, namespace)
    cluster = connect(path, namespace)
    wait_for(lambda: targets.is_ready(cluster.get("pods", "target", namespace)), timeout=90)
    started: list[subprocess.Popen[bytes]] = []
    messages: list[str] = []
    backend = KubernetesBackend(connect=lambda c, n: cluster, forward=port_forward(path, started))
    cfg = config(namespace, ttl=10)
    session, key = session_of(f"e2e-{namespace}", tmp_path, cfg)
    checks = backend.doctor(cfg)
    assert all(c.ok for c in checks), checks
    assert "v1." in checks[0].detail
    try:
        resolution = backend.resolve(cfg)
        assert resolution.env["GREETING"] == "from-the-target"
        placement = backend.place(cfg, resolution, session)
        backend.prepare(session, messages.append)
        reported = backend.session_env(session.project)
        assert reported is not None
        assert reported["POD_NAME"] == "target" and reported["MEMORY_MI"] == "128"
        assert any("environment from process" in m for m in messages), messages
        port = link_port(placement)
        addresses = asyncio.run(
            resolve_through(f"tcp:127.0.0.1:{port}", key, "kubernetes.default.svc.cluster.local")
        )
        assert addresses, "no A record from the pod's resolver"
        secret_value = base64.b64decode(cluster.find("secrets", namespace)[0]["data"]["key"])
        logs = cluster.pod_log("target", namespace, backend.plans[session.project].where.name)
        assert secret_value.decode() not in logs
    finally:
        for process in started:
            process.terminate()
        removed = backend.teardown(session.project, tmp_path, messages.append)
    assert any(r.startswith("secret/") for r in removed)
    assert cluster.find("secrets", namespace, manifests.project_selector(session.project)) == []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the agent exits by itself, ttl after the last link
        statuses = (
            cluster.get("pods", "target", namespace)["status"].get("ephemeralContainerStatuses")
            or []
        )
        if statuses and "terminated" in (statuses[0].get("state") or {}):
            break
        time.sleep(1)
    else:
        pytest.fail("the agent did not exit after its ttl with no link")


def test_limited_account_runs_the_agent_as_a_job(
    cluster_ns: tuple[Path, str], tmp_path: Path
) -> None:
    """Without `pods/ephemeralcontainers`, `up` falls back to a Job (with the warning), reached
    through a port-forward made with the same limited credentials; `down` removes it."""
    path, namespace = cluster_ns
    target_pod(path, namespace)
    admin = connect(path, namespace)
    wait_for(lambda: targets.is_ready(admin.get("pods", "target", namespace)), timeout=90)
    limited_path = limited_kubeconfig(path, namespace, tmp_path)
    limited = connect(limited_path, namespace)
    started: list[subprocess.Popen[bytes]] = []
    messages: list[str] = []
    backend = KubernetesBackend(
        connect=lambda c, n: limited, forward=port_forward(limited_path, started)
    )
    cfg = config(namespace, ttl=10)
    session, key = session_of(f"e2e-job-{namespace}", tmp_path, cfg)
    try:
        resolution = backend.resolve(cfg)
        assert resolution.env["POD_NAME"] == "target"  # resolved from the API
        placement = backend.place(cfg, resolution, session)
        backend.prepare(session, messages.append)
        assert any(manifests.JOB_WARNING in m for m in messages), messages
        assert backend.plans[session.project].mode == "job"
        port = link_port(placement)
        addresses = asyncio.run(
            resolve_through(f"tcp:127.0.0.1:{port}", key, "kubernetes.default.svc.cluster.local")
        )
        assert addresses
    finally:
        for process in started:
            process.terminate()
        removed = backend.teardown(session.project, tmp_path, messages.append)
    assert sorted(r.split("/")[0] for r in removed) == ["job", "secret"]
    selector = manifests.project_selector(session.project)
    assert admin.find("jobs", namespace, selector) == []
