"""The real cluster does what composemirror's Kubernetes backend relies on a cluster doing:
a Ready node at the real version, pods from locally loaded images, Services, cluster DNS,
port-forward, ephemeral containers, PodSecurity and RBAC, and no way in but the API."""

from __future__ import annotations

import base64
import functools
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from tests.cluster.kube import (
    KUBECONFIG,
    KUBECTL,
    NODE,
    POD_CIDR_PREFIX,
    SERVICE_CIDR_PREFIX,
    VERSION,
    apply,
    deploy_app,
    exec_pod,
    get_json,
    kubectl,
    ok,
    run_pod,
)
from tests.conftest import docker, wait_for

SLEEP = ["sleep", "3600"]


def http_get(url: str) -> str | None:
    """The body of a GET, or None when it cannot be had (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_node_is_ready_at_the_real_version(cluster: None) -> None:
    node = get_json("node", NODE)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["nodeInfo"]["kubeletVersion"] == VERSION
    assert node["status"]["nodeInfo"]["kubeProxyVersion"] in ("", VERSION)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    server = yaml.safe_load(ok(kubectl("version", "-o", "yaml")))["serverVersion"]
    assert server["gitVersion"] == VERSION
    assert ok(kubectl("get", "--raw", "/readyz")) == "ok"


def test_deployment_of_a_local_image_is_reached_through_its_service(
    namespace: str, app_image: str
) -> None:
    app = deploy_app(namespace, app_image)
    assert app.pod_ip.startswith(POD_CIDR_PREFIX)
    assert app.service_ip.startswith(SERVICE_CIDR_PREFIX)
    run_pod(namespace, "client", app_image, SLEEP)
    answer = exec_pod(namespace, "client", f"curl -fsS --max-time 5 http://{app.service_ip}/")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == app.pod


def test_cluster_dns_search_domains_and_nxdomain(namespace: str, app_image: str) -> None:
    app = deploy_app(namespace, app_image)
    run_pod(namespace, "client", app_image, SLEEP)
    resolv = ok(exec_pod(namespace, "client", "cat /etc/resolv.conf"))
    assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in resolv
    assert "options ndots:5" in resolv

    api = ok(exec_pod(namespace, "client", "getent hosts kubernetes.default.svc.cluster.local"))
    assert api.split()[0] == "10.43.0.1"
    # A short name goes through the search list, as the app's own resolver does it.
    short = ok(exec_pod(namespace, "client", "getent hosts web"))
    assert short.split()[0] == app.service_ip
    assert ok(exec_pod(namespace, "client", "curl -fsS --max-time 5 http://web/")) == app.pod

    # A missing name is NXDOMAIN from the cluster DNS, answered at once (no timeout, no retry).
    started = time.monotonic()
    missing = ok(
        exec_pod(namespace, "client", f"dig +tries=1 +time=2 missing.{namespace}.svc.cluster.local")
    )
    assert "status: NXDOMAIN" in missing
    assert "flags: qr aa" in missing
    assert time.monotonic() - started < 5
    started = time.monotonic()
    lookup = exec_pod(namespace, "client", "getent hosts no-such-service")
    assert lookup.returncode == 2  # getent: key not found
    assert time.monotonic() - started < 5


def test_port_forward_from_the_host_reaches_a_pod(namespace: str, app_image: str) -> None:
    app = deploy_app(namespace, app_image)
    forward = subprocess.Popen(
        [
            str(KUBECTL),
            "--kubeconfig",
            str(KUBECONFIG),
            "-n",
            namespace,
            "port-forward",
            f"pod/{app.pod}",
            ":8080",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        match = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        failed = forward.stderr.read() if forward.stderr and forward.poll() is not None else ""
        assert match, line + failed
        url = f"http://127.0.0.1:{match.group(1)}/"
        for _ in range(3):  # several connections over the one forward
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read().decode() == app.pod
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_kubectl_debug_runs_an_ephemeral_container_in_the_pods_network(
    namespace: str, app_image: str
) -> None:
    app = deploy_app(namespace, app_image)
    ok(
        kubectl(
            "-n",
            namespace,
            "debug",
            f"pod/{app.pod}",
            "--image",
            app_image,
            "--image-pull-policy",
            "IfNotPresent",
            "--container",
            "debugger",
            "--profile",
            "general",
            "--",
            "curl",
            "-fsS",
            "--max-time",
            "5",
            "http://127.0.0.1:8080/",
        )
    )

    def terminated() -> dict[str, object] | None:
        pod = get_json("-n", namespace, "pod", app.pod)
        for status in pod["status"].get("ephemeralContainerStatuses", []):
            if status["name"] == "debugger" and "terminated" in status["state"]:
                return dict(status["state"]["terminated"])
        return None

    state = wait_for(terminated, timeout=90, interval=1)
    assert state["exitCode"] == 0, state
    # 127.0.0.1:8080 inside the debug container is the app's server: the netns is shared.
    assert ok(kubectl("-n", namespace, "logs", app.pod, "-c", "debugger")) == app.pod


def test_podsecurity_restricted_refuses_a_privileged_pod(namespace: str, app_image: str) -> None:
    ok(kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"))
    privileged = kubectl(
        "-n",
        namespace,
        "run",
        "privileged",
        "--image",
        app_image,
        "--image-pull-policy",
        "IfNotPresent",
        "--restart",
        "Never",
        "--privileged",
        "--",
        "sleep",
        "60",
    )
    assert privileged.returncode != 0
    assert "violates PodSecurity" in privileged.stderr
    assert "restricted" in privileged.stderr
    assert get_json("-n", namespace, "pods")["items"] == []


def test_service_account_is_refused_what_its_role_does_not_grant(
    namespace: str, tmp_path: Path
) -> None:
    apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "limited", "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "pod-reader", "namespace": namespace},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "limited-reads-pods", "namespace": namespace},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "pod-reader",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": namespace}],
            },
        ]
    )
    token = ok(kubectl("-n", namespace, "create", "token", "limited")).strip()
    admin = yaml.safe_load(KUBECONFIG.read_text())
    cluster = admin["clusters"][0]["cluster"]
    limited = tmp_path / "limited.kubeconfig"
    limited.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "limited",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "limited", "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "limited",
                        "context": {"cluster": "c", "user": "limited", "namespace": namespace},
                    }
                ],
            }
        )
    )
    assert base64.b64decode(cluster["certificate-authority-data"])  # verified TLS, not insecure

    who = ok(
        kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=limited)
    )
    assert who == f"system:serviceaccount:{namespace}:limited"
    assert kubectl("get", "pods", kubeconfig=limited).returncode == 0
    for refused in (
        ["get", "secrets"],
        ["get", "pods", "-n", "default"],
        ["create", "configmap", "x", "--from-literal=a=b"],
        ["get", "nodes"],
    ):
        result = kubectl(*refused, kubeconfig=limited)
        assert result.returncode != 0, refused
        assert "Forbidden" in result.stderr or "forbidden" in result.stderr, result.stderr


def test_pod_and_service_addresses_are_unreachable_from_docker_containers(
    namespace: str, app_image: str
) -> None:
    app = deploy_app(namespace, app_image)
    # The node itself reaches both (once kube-proxy has written the new Service's rules): the
    # addresses are live, the isolation is what refuses.
    for address in (f"{app.pod_ip}:8080", f"{app.service_ip}:80"):
        assert wait_for(functools.partial(http_get, f"http://{address}/"), timeout=30) == app.pod
    probe = (
        f"for a in {app.pod_ip}:8080 {app.service_ip}:80; do "
        "curl -sS --max-time 3 -o /dev/null http://$a/ && echo reached $a; done; "
        "dig +tries=1 +time=2 @10.43.0.10 kubernetes.default.svc.cluster.local "
        "| grep -q 'status: NOERROR' && echo reached dns; true"
    )
    result = docker("run", "--rm", "composemirror/base:bookworm", "sh", "-c", probe)
    assert result.returncode == 0, result.stderr
    assert "reached" not in result.stdout, result.stdout
    assert result.stderr.count("timed out") + result.stderr.count("Failed to connect") == 2, (
        result.stderr
    )
