"""A session's life against the real cluster: `down` leaves nothing behind, and a limited
account (no `pods/ephemeralcontainers`) is told what is missing and gets a Job instead.

Both run examples/local-database unchanged against the shop in namespace `shop` (see
tests/e2e/shop.py), one after the other (the example publishes port 8080).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemirror.backends.kubernetes import manifests
from composemirror.backends.kubernetes.access import role_manifest
from tests.cluster.kube import KUBECONFIG, get_json, kubectl, ok, token_kubeconfig
from tests.conftest import ROOT, exec_in, labelled, wait_for
from tests.e2e.shop import (
    EXAMPLE,
    NAMESPACE,
    RENDER_DIR,
    Shop,
    agent_states,
    environment,
    forwarder_state,
    process_alive,
    run,
    session_folder,
)

pytestmark = pytest.mark.cluster


def test_down_leaves_no_forwarder_job_secret_agent_or_project(shop: Shop) -> None:
    project = "cm-k8s-down"
    up = run("-f", str(EXAMPLE), "-p", project, "up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = forwarder_state(project)
        supervisor, port_forward = int(state["pid"]), int(state["kubectl_pid"])
        assert process_alive(supervisor) and process_alive(port_forward)
        # one agent runs (earlier runs of this project left terminated entries)
        assert agent_states(shop.checkout_pod, project).count("running") == 1
    finally:
        down = run("-f", str(EXAMPLE), "-p", project, "down")
    assert down.returncode == 0, down.stderr
    assert f"removed forwarder (pid {supervisor})" in down.stderr
    assert not process_alive(supervisor) and not process_alive(port_forward)
    selector = manifests.project_selector(project)
    for resource in ("jobs", "secrets", "pods"):
        assert get_json("-n", NAMESPACE, resource, "-l", selector)["items"] == []
    assert labelled(f"com.docker.compose.project={project}") == {
        "container": [],
        "network": [],
        "volume": [],
    }
    assert not RENDER_DIR.exists()
    # The ephemeral agent cannot be deleted: with no link it exits by itself after its ttl.
    deadline = time.monotonic() + 60
    while "running" in agent_states(shop.checkout_pod, project):
        assert time.monotonic() < deadline, agent_states(shop.checkout_pod, project)
        time.sleep(1)


@pytest.fixture
def limited(shop: Shop, tmp_path: Path) -> Iterator[Path]:
    """A ServiceAccount kube config whose Role is the minimal one minus
    `pods/ephemeralcontainers`; the account and its Role are removed afterwards."""
    name = f"cm-limited-{secrets.token_hex(2)}"
    role: dict[str, Any] = role_manifest(NAMESPACE)
    role["metadata"]["name"] = name
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["pods/ephemeralcontainers"]]
    ok(kubectl("-n", NAMESPACE, "create", "serviceaccount", name))
    try:
        ok(kubectl("apply", "-f", "-", input=yaml.safe_dump(role)))
        ok(
            kubectl(
                "-n",
                NAMESPACE,
                "create",
                "rolebinding",
                name,
                f"--role={name}",
                f"--serviceaccount={NAMESPACE}:{name}",
            )
        )
        token = ok(kubectl("-n", NAMESPACE, "create", "token", name)).strip()
        path = token_kubeconfig(KUBECONFIG, token, NAMESPACE, tmp_path / "limited.kubeconfig")
        yield path
    finally:
        for kind in ("rolebinding", "role", "serviceaccount"):
            kubectl("-n", NAMESPACE, "delete", kind, name, "--ignore-not-found")


def test_a_limited_account_is_told_the_missing_rule_and_gets_a_job(
    shop: Shop, limited: Path
) -> None:
    env = environment(KUBECONFIG=str(limited))
    doctor = run("-f", str(EXAMPLE), "doctor", env=env)
    assert "pods/ephemeralcontainers" in doctor.stdout, doctor.stdout
    assert "the agent will run as a Job beside the target" in doctor.stdout
    project = "cm-k8s-job"
    up = run("-f", str(EXAMPLE), "-p", project, "up", "-d", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert manifests.JOB_WARNING in up.stderr
        selector = manifests.project_selector(project)
        assert len(get_json("-n", NAMESPACE, "jobs", "-l", selector)["items"]) == 1
        answer = wait_for(
            lambda: (
                exec_in(
                    f"{project}-web-1", ["curl", "-fsS", "-m", "5", "http://orders:8080/orders"]
                ).stdout
                or None
            ),
            timeout=60,
        )
        assert '"source": "cluster"' in answer
    finally:
        down = run("-f", str(EXAMPLE), "-p", project, "down", env=env)
    assert down.returncode == 0, down.stderr
    assert get_json("-n", NAMESPACE, "jobs", "-l", selector)["items"] == []


def test_an_attached_up_holds_the_forwarder_and_ctrl_c_stops_it(shop: Shop, tmp_path: Path) -> None:
    project = "cm-k8s-attached"
    command = [sys.executable, "-m", "composemirror", "-f", str(EXAMPLE), "-p", project, "up"]
    output = tmp_path / "up.log"  # a file, not a pipe: nobody reads while it runs
    with output.open("w") as log:
        up = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    try:
        app = f"{project}-web-1"
        wait_for(
            lambda: exec_in(app, ["curl", "-fsS", "-m", "5", "http://orders:8080/orders"]).stdout,
            timeout=120,
        )
        supervisor = int(forwarder_state(project)["pid"])
        assert process_alive(supervisor)
        os.killpg(up.pid, signal.SIGINT)  # Ctrl-C: the stack stops and, as compose, exit 130
        assert up.wait(timeout=120) == 130, output.read_text()[-3000:]
        assert not process_alive(supervisor)
        assert not (session_folder(project) / "forwarder.json").exists()
        # what it created in the cluster went with it
        selector = manifests.project_selector(project)
        assert get_json("-n", NAMESPACE, "secrets", "-l", selector)["items"] == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        run("-f", str(EXAMPLE), "-p", project, "down")
