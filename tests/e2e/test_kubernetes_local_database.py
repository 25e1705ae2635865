"""examples/local-database, unchanged, against the real cluster (`target: deployment/checkout`).

The shop runs in namespace `shop` (PodSecurity `restricted`) of the cluster `make cluster`
starts; its pod and service networks are unreachable from Docker's containers, so every remote
answer here came through the sidecar, the tunnel, the forwarder's port-forward and the agent in
the checkout pod. Real clients in the app container: psql, curl, dig, a static musl binary.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.kube import kubectl, ok
from tests.conftest import docker, exec_in, wait_for
from tests.e2e.shop import (
    EXAMPLE,
    NAMESPACE,
    Shop,
    agent_states,
    forwarder_state,
    run,
)

pytestmark = pytest.mark.cluster

PROJECT = "cm-k8s-example"
APP = f"{PROJECT}-web-1"
CLUSTER_DB = "postgres.shop.svc.cluster.local"
DATABASE_URL = f"postgresql://shop:shop-secret@{CLUSTER_DB}:5432/shop"
ORDERS = "orders.shop.svc.cluster.local"


@pytest.fixture(scope="module")
def example(shop: Shop) -> Iterator[Shop]:
    """`composemirror up -d` of the example against the cluster; `down` afterwards."""
    up = run("-f", str(EXAMPLE), "-p", PROJECT, "up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "environment from process" in up.stderr  # read from the target process
        wait_for(lambda: _remote_answers(), timeout=60)
        yield shop
    finally:
        run("-f", str(EXAMPLE), "-p", PROJECT, "down")


def _remote_answers() -> bool:
    probe = exec_in(APP, ["curl", "-fsS", "-m", "5", f"http://{ORDERS}:8080/orders"])
    return probe.returncode == 0


def test_psql_with_the_cluster_db_name_reads_the_local_rows(example: Shop) -> None:
    result = exec_in(
        APP,
        ["psql", DATABASE_URL, "-Atc", "SELECT source, count(*) FROM customers GROUP BY source"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "local|3"


def test_the_db_short_name_expands_as_in_the_pod_and_stays_local(example: Shop) -> None:
    # In the pod, `postgres` is postgres.shop.svc.cluster.local through its search list; `hosts`
    # makes that name local, so the short name must reach the local rows too, never the cluster's.
    resolv = exec_in(APP, ["cat", "/etc/resolv.conf"]).stdout
    assert "search shop.svc.cluster.local svc.cluster.local cluster.local" in resolv, resolv
    assert "ndots:5" in resolv, resolv
    url = DATABASE_URL.replace("postgres.shop.svc.cluster.local", "postgres")
    result = exec_in(APP, ["psql", url, "-Atc", "SELECT DISTINCT source FROM customers"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "local"


@pytest.mark.parametrize("host", [ORDERS, "orders"])
def test_curl_reaches_orders_in_the_cluster_from_the_target_pod(example: Shop, host: str) -> None:
    result = exec_in(APP, ["curl", "-fsS", "-m", "10", f"http://{host}:8080/orders"])
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["source"] == "cluster"
    assert body["client"] == example.checkout_ip  # the connection left from the target pod


def test_static_musl_client_agrees(example: Shop, static_client: Path) -> None:
    assert docker("cp", str(static_client), f"{APP}:/tmp/httpget").returncode == 0
    for host in (ORDERS, "orders"):
        answer = exec_in(APP, ["/tmp/httpget", host, "8080", "/orders"])
        assert answer.returncode == 0, answer.stderr
        assert '"source": "cluster"' in answer.stdout
        assert f'"client": "{example.checkout_ip}"' in answer.stdout


def test_dig_answers_from_the_cluster_dns_except_the_local_name(example: Shop) -> None:
    def dig(*args: str) -> str:
        return exec_in(APP, ["dig", "+short", "+time=5", "+tries=1", *args]).stdout.strip()

    assert dig(ORDERS) == example.orders_ip
    # dig searches only when asked, as in the pod: then with the pod's search list and ndots
    assert dig("+search", "orders") == example.orders_ip
    assert dig("orders") == ""  # `orders.` alone is no name in the cluster
    assert dig("+tcp", ORDERS) == example.orders_ip
    local = dig("db")
    assert local and dig(CLUSTER_DB) == local != example.postgres_ip
    assert dig("shop-db.shop.svc.cluster.local").splitlines()[0] == f"{CLUSTER_DB}."
    missing = exec_in(APP, ["dig", "+time=5", "+tries=1", "nothere.shop.svc.cluster.local"])
    assert "status: NXDOMAIN" in missing.stdout


@pytest.mark.parametrize("host", ["orders", ORDERS])
def test_udp_echo_reaches_the_cluster(example: Shop, host: str) -> None:
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(5)\n"
        f"s.connect(({host!r}, 9999))\n"
        "for i in range(5):\n"
        "    s.send(b'ping %d' % i)\n"
        "    data, peer = s.recvfrom(100)\n"
        "    assert data == b'ping %d' % i, data\n"
        "print(peer[0], peer[1])\n"
    )
    result = exec_in(APP, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [example.orders_ip, "9999"]


def test_imported_env_holds_configmap_secret_and_downward_api_values(example: Shop) -> None:
    env = dict(
        line.split("=", 1) for line in exec_in(APP, ["env"]).stdout.splitlines() if "=" in line
    )
    assert env["ORDERS_URL"] == f"http://{ORDERS}:8080/orders"  # ConfigMap (envFrom)
    assert env["DATABASE_URL"] == DATABASE_URL  # Secret (secretKeyRef)
    assert env["POD_NAME"] == example.checkout_pod  # downward API
    assert env["POD_NAMESPACE"] == NAMESPACE
    assert env["POD_IP"] == example.checkout_ip
    assert env["MEMORY_LIMIT_MIB"] == "256"  # resourceFieldRef
    assert env["LOG_LEVEL"] == "debug"  # compose's own environment wins over the ConfigMap's
    assert env["PAYMENTS_MODE"] == "disabled"  # override wins over everything
    assert env["APP_MODE"] == "local-development"
    assert "KUBERNETES_SERVICE_HOST" not in env  # default excludes


def test_the_restricted_namespace_runs_the_agent_in_the_target_pod(example: Shop) -> None:
    labels = json.loads(
        run_kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.metadata.labels}")
    )
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # one agent runs; earlier sessions of this project left terminated entries
    assert agent_states(example.checkout_pod, PROJECT).count("running") == 1


def test_status_and_doctor_show_the_forwarder_and_the_agent(example: Shop) -> None:
    status = run("-f", str(EXAMPLE), "-p", PROJECT, "status", "--format", "json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    sidecar = next(r for r in report["services"] if r["role"] == "sidecar")
    assert sidecar["link"]["agent"] == "connected"
    session = {c["name"]: c for c in report["session"]}
    state = forwarder_state(PROJECT)
    assert session["forwarder"]["ok"], session
    assert f"pid {state['pid']}" in session["forwarder"]["detail"]
    assert f"pod/{example.checkout_pod}:" in session["forwarder"]["detail"]
    assert state["spec"]["address"] not in ("0.0.0.0", "::", "")  # the host gateway only
    assert any(name.startswith("agent composemirror-") for name in session)
    assert "until the pod is replaced" in session["note"]["detail"]
    doctor = run("-f", str(EXAMPLE), "-p", PROJECT, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for line in ("kubernetes API", "permissions", "kubectl (port-forward)", "forwarder"):
        assert f"ok    {line}: " in doctor.stdout, doctor.stdout
    assert "ok    agent link of web-mirror: connected" in doctor.stdout


def test_a_dropped_port_forward_fails_fast_and_comes_back_alone(example: Shop) -> None:
    """The port-forward dies (kubectl killed) while the supervisor is held, so the gap is
    observable; released, it restores the link within 10 s, no app container restarted."""
    started = docker("inspect", "-f", "{{.State.StartedAt}}", APP).stdout
    state = forwarder_state(PROJECT)
    supervisor = int(state["pid"])
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(int(state["kubectl_pid"]), signal.SIGKILL)
        wait_for(lambda: not _remote_answers_within(3), timeout=15)
        began = time.monotonic()
        failed = exec_in(APP, ["curl", "-sS", "-m", "20", f"http://{ORDERS}:8080/orders"])
        assert failed.returncode != 0
        assert time.monotonic() - began < 5, "a remote connection hung while the link was down"
        local = exec_in(APP, ["psql", DATABASE_URL, "-Atc", "SELECT count(*) FROM customers"])
        assert local.stdout.strip() == "3"
    finally:
        os.kill(supervisor, signal.SIGCONT)
    released = time.monotonic()
    wait_for(_remote_answers, timeout=10, interval=0.2)
    assert time.monotonic() - released < 10
    assert forwarder_state(PROJECT)["restarts"] >= 1
    assert docker("inspect", "-f", "{{.State.StartedAt}}", APP).stdout == started


def _remote_answers_within(seconds: int) -> bool:
    probe = exec_in(APP, ["curl", "-fsS", "-m", str(seconds), f"http://{ORDERS}:8080/orders"])
    return probe.returncode == 0


def run_kubectl(*args: str) -> str:
    return ok(kubectl(*args))
