"""What a session leaves behind and how it fails, against the real cluster.

Each test runs the CLI on a small project of its own (an app service and its sidecar) whose
target is `deployment/target` in a namespace of this module (PodSecurity `restricted`), so
deleting the target's pod disturbs nobody else: a repeated `up -d` keeps the session, a failed
`up` and an interrupted attached `up` delete what they created, `down` needs nothing of
`.composemirror/` and stops only its own project's forwarder, a replaced pod is reported.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from composemirror.backends.kubernetes import forwarder, manifests
from tests.cluster.kube import CLUSTER_SCRIPT, KUBECONFIG, get_json, kubectl, ok
from tests.conftest import ROOT, docker, wait_for
from tests.e2e.shop import (
    AGENT_IMAGE,
    environment,
    forwarder_state,
    process_alive,
    require_cluster,
    session_folder,
)

pytestmark = pytest.mark.cluster

TARGET = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: target}
spec:
  replicas: 1
  selector: {matchLabels: {app: target}}
  template:
    metadata: {labels: {app: target}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000,
                        seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: app
        image: IMAGE
        imagePullPolicy: Never
        command: [python3, -m, http.server, "8080"]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
        securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
        env: [{name: GREETING, value: from-the-target}]
"""
COMPOSE = """
services:
  web:
    image: IMAGE
    command: [sleep, infinity]
x-composemirror:
  target: deployment/target
  namespace: NAMESPACE
  services: [web]
  agent: {ttl: 10}
"""


@dataclass(frozen=True)
class Cluster:
    namespace: str
    compose: Path
    """A compose file whose target is `deployment/target` in `namespace`."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_cluster()
    load = subprocess.run(
        [str(CLUSTER_SCRIPT), "load", AGENT_IMAGE], capture_output=True, text=True, timeout=900
    )
    assert load.returncode == 0, load.stdout + load.stderr
    namespace = f"cm-faults-{secrets.token_hex(3)}"
    ok(kubectl("create", "namespace", namespace))
    try:
        ok(
            kubectl(
                "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
            )
        )
        ok(kubectl("-n", namespace, "apply", "-f", "-", input=TARGET.replace("IMAGE", AGENT_IMAGE)))
        ok(
            kubectl(
                "-n",
                namespace,
                "rollout",
                "status",
                "deployment/target",
                "--timeout=180s",
                timeout=200,
            )
        )
        folder = tmp_path_factory.mktemp("faults")
        compose = folder / "compose.yaml"
        compose.write_text(COMPOSE.replace("IMAGE", AGENT_IMAGE).replace("NAMESPACE", namespace))
        yield Cluster(namespace=namespace, compose=compose)
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false")


def cli(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "composemirror", "-f", str(cluster.compose), *args],
        cwd=ROOT,
        env=env or environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def secrets_of(cluster: Cluster, project: str) -> list[str]:
    selector = manifests.project_selector(project)
    items = get_json("-n", cluster.namespace, "secrets", "-l", selector)["items"]
    return sorted(i["metadata"]["name"] for i in items)


def target_pod(cluster: Cluster) -> dict[str, object]:
    pods = get_json("-n", cluster.namespace, "pods", "-l", "app=target")["items"]
    [pod] = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return dict(pod)


def agents(cluster: Cluster) -> list[str]:
    spec = target_pod(cluster)["spec"]
    assert isinstance(spec, dict)
    return [c["name"] for c in spec.get("ephemeralContainers") or []]


def container_id(name: str) -> str:
    return docker("inspect", "--format", "{{.Id}}", name).stdout.strip()


def test_a_repeated_up_keeps_the_running_session(cluster: Cluster) -> None:
    project = "cm-faults-again"
    first = cli(cluster, "-p", project, "up", "-d")
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        secret, pid = secrets_of(cluster, project), forwarder_state(project)["pid"]
        entries, app = agents(cluster), container_id(f"{project}-web-1")
        assert len(secret) == 1
        again = cli(cluster, "-p", project, "up", "-d")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reusing the running session" in again.stderr
        assert secrets_of(cluster, project) == secret
        assert agents(cluster) == entries  # no second ephemeral container
        assert forwarder_state(project)["pid"] == pid
        assert container_id(f"{project}-web-1") == app  # compose changed nothing either
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr
    assert secrets_of(cluster, project) == []


def test_a_dead_forwarder_fails_status_and_doctor_and_a_lost_record_leaves_no_secret(
    cluster: Cluster,
) -> None:
    """The forwarder stops (as a failed `up -d` releases it) while the project's containers
    run: `doctor` fails it with the fix and `status` shows FAIL lines once the sidecar is
    unhealthy. Then the state folder is deleted and `up -d` makes a new session: the earlier
    Secret goes at once, not at `down`."""
    project = "cm-faults-dead-link"
    first = cli(cluster, "-p", project, "up", "-d")
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        [earlier] = secrets_of(cluster, project)
        assert forwarder.stop(session_folder(project), project=project)
        sidecar = f"{project}-web-mirror-1"
        wait_for(
            lambda: (
                docker("inspect", "--format", "{{.State.Health.Status}}", sidecar).stdout.strip()
                == "unhealthy"
            ),
            timeout=90,
        )
        doctor = cli(cluster, "-p", project, "doctor")
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert (
            "FAIL  forwarder: not running, while the project's sidecars web-mirror run and dial "
            "it: their link to the agent is down" in doctor.stdout
        ), doctor.stdout
        assert "hint: run `composemirror up -d` to start the session again" in doctor.stdout
        status = cli(cluster, "-p", project, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "FAIL forwarder: not running, while" in status.stdout, status.stdout
        assert "FAIL agent link of web-mirror: " in status.stdout, status.stdout
        # the containers go too, so this `up` starts the stack afresh (the Secret is the point)
        removed = cli(cluster, "-p", project, "compose", "--", "down")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        shutil.rmtree(session_folder(project))
        again = cli(cluster, "-p", project, "up", "-d")
        assert again.returncode == 0, again.stdout + again.stderr
        [now] = secrets_of(cluster, project)
        assert now != earlier
        assert f"secret/{earlier}" in again.stderr
        healthy = cli(cluster, "-p", project, "doctor")
        assert "FAIL  forwarder" not in healthy.stdout, healthy.stdout
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr
    assert secrets_of(cluster, project) == []


def test_two_concurrent_ups_of_one_project_make_one_session(cluster: Cluster) -> None:
    """Two terminals run `up -d` of one project at once: one prepares the session, the other
    waits for it and keeps it, so one Secret, one agent and one forwarder exist, not two."""
    project = "cm-faults-twice"
    entries = agents(cluster)
    command = [sys.executable, "-m", "composemirror", "-f", str(cluster.compose), "-p", project]
    started = [
        subprocess.Popen(
            [*command, "up", "-d"],
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=600)[0] for process in started]
        codes = [process.returncode for process in started]
        assert 0 in codes, outputs
        assert len(secrets_of(cluster, project)) == 1, outputs
        assert len(agents(cluster)) == len(entries) + 1, outputs
        assert len(forwarder.find(project)) == 1, outputs
        assert any("waiting for another `up`" in output for output in outputs), outputs
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr
    assert secrets_of(cluster, project) == []


def test_down_needs_no_local_state_and_stops_only_its_own_project(cluster: Cluster) -> None:
    project = "cm-faults-gone"
    up = cli(cluster, "-p", project, "up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = forwarder_state(project)
        supervisor, port_forward = int(state["pid"]), int(state["kubectl_pid"])
        other = cli(cluster, "-p", "cm-faults-unused", "down")  # same directory, another -p
        assert other.returncode == 0, other.stderr
        assert process_alive(supervisor) and process_alive(port_forward)
        assert len(secrets_of(cluster, project)) == 1
        shutil.rmtree(cluster.compose.parent / ".composemirror")
        shutil.rmtree(session_folder(project))  # even the state folder
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr
    assert f"removed forwarder (pid {supervisor})" in down.stderr
    wait_for(lambda: not process_alive(supervisor) and not process_alive(port_forward), timeout=10)
    assert secrets_of(cluster, project) == []
    assert (
        docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout == ""
    )


def test_an_interrupted_attached_up_deletes_its_secret(cluster: Cluster, tmp_path: Path) -> None:
    project = "cm-faults-ctrl-c"
    output = tmp_path / "up.log"
    with output.open("w") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "composemirror",
                "-f",
                str(cluster.compose),
                "-p",
                project,
                "up",
            ],
            cwd=ROOT,
            env=environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: (
                "running"
                in docker("inspect", "--format", "{{.State.Status}}", f"{project}-web-1").stdout
            ),
            timeout=240,
        )
        assert len(secrets_of(cluster, project)) == 1
        supervisor = int(forwarder_state(project)["pid"])
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=120) == 130, output.read_text()[-3000:]
        assert secrets_of(cluster, project) == [], output.read_text()[-3000:]
        assert not process_alive(supervisor)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        cli(cluster, "-p", project, "down")


def test_a_replaced_target_pod_is_reported_and_not_retried(cluster: Cluster) -> None:
    project = "cm-faults-replaced"
    up = cli(cluster, "-p", project, "up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        supervisor = int(forwarder_state(project)["pid"])
        old = str(target_pod(cluster)["metadata"]["name"])  # type: ignore[index]
        ok(kubectl("-n", cluster.namespace, "delete", "pod", old, "--wait=true", timeout=120))
        # the supervisor stops at once instead of retrying for minutes
        wait_for(lambda: not process_alive(supervisor), timeout=60)
        state = forwarder_state(project)
        assert state["state"] == "failed" and state["pod_gone"], state
        log = (session_folder(project) / "forwarder.log").read_text()
        assert f"the agent's pod {old} in namespace {cluster.namespace} is gone" in log
        status = cli(cluster, "-p", project, "status")
        assert status.returncode == 0, status.stdout + status.stderr  # a report; doctor fails
        assert f"FAIL agent pod: pod {old} in namespace {cluster.namespace}" in status.stdout
        doctor = cli(cluster, "-p", project, "doctor")
        assert doctor.returncode == 1
        assert f"pod {old} in namespace {cluster.namespace}" in doctor.stdout
        # What the hint says repairs it, once the sidecar has given up on its old forwarder.
        wait_for(lambda: _health(f"{project}-web-mirror-1") == "unhealthy", timeout=90)
        ok(kubectl("-n", cluster.namespace, "rollout", "status", "deployment/target", timeout=200))
        again = cli(cluster, "-p", project, "up", "-d")
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(lambda: _linked(cluster, project), timeout=60)
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr


def test_up_after_the_rendered_files_and_key_were_deleted_relinks_with_the_new_key(
    cluster: Cluster,
) -> None:
    """`.composemirror/` (the tunnel key with it) deleted under a running project: the next
    `up -d` makes a new key, and the sidecar, made with the old one, is recreated with it."""
    project = "cm-faults-rekeyed"
    up = cli(cluster, "-p", project, "up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        sidecar = container_id(f"{project}-web-mirror-1")
        shutil.rmtree(cluster.compose.parent / ".composemirror")
        again = cli(cluster, "-p", project, "up", "-d")
        assert again.returncode == 0, again.stdout + again.stderr
        assert container_id(f"{project}-web-mirror-1") != sidecar
        wait_for(lambda: _linked(cluster, project), timeout=60)
    finally:
        down = cli(cluster, "-p", project, "down")
    assert down.returncode == 0, down.stderr


def _health(container: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()


def _linked(cluster: Cluster, project: str) -> bool:
    doctor = cli(cluster, "-p", project, "doctor")
    return doctor.returncode == 0 and "agent link of web-mirror: connected" in doctor.stdout


def test_an_image_the_cluster_cannot_get_fails_fast_and_leaves_no_secret(cluster: Cluster) -> None:
    project = "cm-faults-image"
    image = "composemirror.invalid/agent:none"
    env = environment(COMPOSEMIRROR_AGENT_IMAGE=image)
    try:
        started = time.monotonic()
        up = cli(cluster, "-p", project, "up", "-d", env=env)
        assert up.returncode == 1, up.stdout + up.stderr
        assert time.monotonic() - started < 120  # not the 120 s startup timeout
        assert f"the cluster cannot get the agent's image {image}" in up.stderr, up.stderr
        assert f"scripts/cluster load {image}" in up.stderr
        assert secrets_of(cluster, project) == []
        assert not session_folder(project).joinpath("forwarder.json").exists()
        doctor = cli(cluster, "-p", project, "doctor", env=env)
        assert doctor.returncode == 1
        assert "FAIL  agent image (cluster): an earlier agent in pod" in doctor.stdout
        assert f"could not get {image}" in doctor.stdout, doctor.stdout
    finally:
        cli(cluster, "-p", project, "down", env=env)


def test_bad_input_and_certificates_are_named(cluster: Cluster, tmp_path: Path) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    compose = folder / "compose.yaml"
    compose.write_text(cluster.compose.read_text())
    project = "cm-faults-fresh"

    def fresh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "composemirror", "-f", str(compose), "-p", project, *args],
            cwd=ROOT,
            env=env or environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    config = fresh("config")
    assert config.returncode == 0, config.stderr
    assert not (folder / ".composemirror").exists()  # config writes nothing
    assert not session_folder(project).exists()
    missing = fresh("-n", "cm-faults-no-such-namespace", "config")
    assert missing.returncode == 2, missing.stderr
    assert "namespace 'cm-faults-no-such-namespace' does not exist" in missing.stderr
    doctor = fresh("doctor")
    assert [line.split(":")[0] for line in doctor.stdout.splitlines()].count("ok    target") == 1
    # a kube config whose CA did not sign the API server's certificate
    kubeconfig = yaml.safe_load(KUBECONFIG.read_text())
    for entry in kubeconfig["clusters"]:
        entry["cluster"].pop("certificate-authority-data", None)
        entry["cluster"]["certificate-authority"] = "/etc/ssl/certs/ca-certificates.crt"
    wrong = tmp_path / "wrong-ca.kubeconfig"
    wrong.write_text(yaml.safe_dump(kubeconfig))
    tls = fresh("doctor", env=environment(KUBECONFIG=str(wrong)))
    assert tls.returncode == 1
    assert "TLS with the Kubernetes API server at https://" in tls.stdout, tls.stdout
    assert "cannot reach" not in tls.stdout
    assert "certificate-authority /etc/ssl/certs/ca-certificates.crt" in tls.stdout


def test_down_uses_the_context_up_used_unless_told_another(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The kube config's current context is one that cannot be reached: `up --context` used
    the good one, and `down` with no --context still cleans up there, saying so."""
    kubeconfig = yaml.safe_load(KUBECONFIG.read_text())
    [good] = kubeconfig["contexts"]
    [server] = kubeconfig["clusters"]
    nowhere = {"name": "nowhere", "cluster": {**server["cluster"], "server": "https://127.0.0.1:9"}}
    kubeconfig["clusters"].append(nowhere)
    kubeconfig["contexts"].append(
        {"name": "unreachable", "context": {**good["context"], "cluster": "nowhere"}}
    )
    kubeconfig["current-context"] = "unreachable"
    path = tmp_path / "two-contexts.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    env = environment(KUBECONFIG=str(path))
    project = "cm-faults-context"
    up = cli(cluster, "-p", project, "--context", good["name"], "up", "-d", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(secrets_of(cluster, project)) == 1
        elsewhere = cli(cluster, "-p", project, "--context", "unreachable", "down", env=env)
        assert elsewhere.returncode == 1  # the explicit flag wins, and that cluster is not there
        assert "cannot reach the Kubernetes API server at https://127.0.0.1:9" in elsewhere.stderr
    finally:
        down = cli(cluster, "-p", project, "down", env=env)
    assert down.returncode == 0, down.stderr
    assert f"cleaning up in context {good['name']} (the one `up` used)" in down.stderr
    assert secrets_of(cluster, project) == []


def test_down_status_and_up_in_a_new_terminal_reach_the_cluster_up_used(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`up -d` with KUBECONFIG, then `status`, `up -d` and `down` in a shell without it (and
    with no ~/.kube/config): the recorded kube config is read, so the forwarder is reported, the
    session kept, then stopped and the Secret deleted, instead of the sandbox being chosen."""
    project = "cm-faults-terminal"
    up = cli(cluster, "-p", project, "up", "-d")
    terminal = {
        k: v for k, v in environment().items() if k not in ("KUBECONFIG", "COMPOSEMIRROR_CLUSTER")
    }
    # no ~/.kube/config either; docker keeps its own configuration (the compose plugin)
    terminal["DOCKER_CONFIG"] = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    terminal["HOME"] = str(tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = forwarder_state(project)
        supervisor, port_forward = int(state["pid"]), int(state["kubectl_pid"])
        assert len(secrets_of(cluster, project)) == 1
        status = cli(cluster, "-p", project, "status", env=terminal)
        assert status.returncode == 0, status.stderr
        assert "forwarder: forwarding" in status.stdout, status.stdout
        again = cli(cluster, "-p", project, "up", "-d", env=terminal)  # not the sandbox
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reusing the running session" in again.stderr, again.stderr
        assert "composemirror-agent" not in again.stderr
        down = cli(cluster, "-p", project, "down", env=terminal)
        assert down.returncode == 0, down.stderr
        assert f"removed forwarder (pid {supervisor})" in down.stderr
        context = yaml.safe_load(KUBECONFIG.read_text())["current-context"]
        assert f"cleaning up in context {context}" in down.stderr, down.stderr
    finally:
        cli(cluster, "-p", project, "down")
    wait_for(lambda: not process_alive(supervisor) and not process_alive(port_forward), timeout=10)
    assert secrets_of(cluster, project) == []


def test_a_job_agent_gives_the_app_the_targets_environment(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`agent: {ephemeral: false}`: the agent runs as a Job, `up` warns that its pod identity
    differs from the target's, the app still gets the target's env (computed from the API),
    and `status` lists the Job agent."""
    folder = tmp_path / "job"
    folder.mkdir()
    compose = folder / "compose.yaml"
    compose.write_text(
        cluster.compose.read_text().replace("{ttl: 10}", "{ttl: 10, ephemeral: false}")
    )
    project = "cm-faults-job"

    def job(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "composemirror", "-f", str(compose), "-p", project, *args],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    up = job("up", "-d")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert manifests.JOB_WARNING in up.stderr
        assert "(environment from the API: pod spec of target-" in up.stderr, up.stderr
        env = docker("exec", f"{project}-web-1", "env").stdout.splitlines()
        assert "GREETING=from-the-target" in env
        jobs = get_json("-n", cluster.namespace, "jobs", "-l", manifests.project_selector(project))
        [name] = [j["metadata"]["name"] for j in jobs["items"]]
        status = job("status")
        assert f"agent {name}: Job {name} in namespace {cluster.namespace}, pod {name}-" in (
            status.stdout
        ), status.stdout
    finally:
        down = job("down")
    assert down.returncode == 0, down.stderr
    assert secrets_of(cluster, project) == []
    left = get_json("-n", cluster.namespace, "jobs", "-l", manifests.project_selector(project))
    assert left["items"] == []


def test_a_typo_in_a_service_name_changes_nothing_in_the_cluster(cluster: Cluster) -> None:
    project = "cm-faults-typo"
    before = agents(cluster)
    try:
        up = cli(cluster, "-p", project, "up", "-d", "wbe")
        assert up.returncode == 2, up.stdout + up.stderr
        assert "no service 'wbe' in this project" in up.stderr
        assert "did you mean 'web'?" in up.stderr
        assert "Traceback" not in up.stderr
        assert secrets_of(cluster, project) == []
        assert agents(cluster) == before  # no ephemeral container added to the target pod
        assert not session_folder(project).joinpath("forwarder.json").exists()
        assert (
            docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout
            == ""
        )
    finally:
        cli(cluster, "-p", project, "down")


def test_down_from_an_empty_folder_with_all_local_state_gone(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`down -p NAME` in a folder with no compose file, after `.composemirror/` and the session
    folder were deleted: nothing says where the Secret is, so it is found by its label in
    every namespace (this account may list them), and deleted."""
    project = "cm-faults-empty"
    up = cli(cluster, "-p", project, "up", "-d")
    empty = tmp_path / "empty"
    empty.mkdir()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(secrets_of(cluster, project)) == 1
        shutil.rmtree(cluster.compose.parent / ".composemirror")
        shutil.rmtree(session_folder(project))
        down = subprocess.run(
            [sys.executable, "-m", "composemirror", "-p", project, "down"],
            cwd=empty,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert down.returncode == 0, down.stderr
        assert "deleting its Jobs and Secrets in every namespace" in down.stderr, down.stderr
        assert f"in namespace {cluster.namespace}" in down.stderr
    finally:
        cli(cluster, "-p", project, "down")
    assert secrets_of(cluster, project) == []


def test_an_unknown_context_is_bad_input_and_a_wrong_port_one_clean_error(
    cluster: Cluster, tmp_path: Path
) -> None:
    project = "cm-faults-port"
    context = yaml.safe_load(KUBECONFIG.read_text())["current-context"]
    unknown = cli(cluster, "-p", project, "--context", "nosuchctx", "up", "-d")
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "has no context 'nosuchctx'" in unknown.stderr
    assert f"its contexts: {context}" in unknown.stderr
    kubeconfig = yaml.safe_load(KUBECONFIG.read_text())
    for entry in kubeconfig["clusters"]:
        entry["cluster"]["server"] = "https://127.0.0.1:9"
    wrong = tmp_path / "wrong-port.kubeconfig"
    wrong.write_text(yaml.safe_dump(kubeconfig))
    try:
        up = cli(cluster, "-p", project, "up", "-d", env=environment(KUBECONFIG=str(wrong)))
        assert up.returncode == 1, up.stdout + up.stderr
        lines = [line for line in up.stderr.splitlines() if line.strip()]
        assert lines[0].startswith(
            "composemirror: cannot reach the Kubernetes API server at https://127.0.0.1:9"
        ), up.stderr
        assert "urllib3" not in up.stderr and "Retrying" not in up.stderr
    finally:
        cli(cluster, "-p", project, "down")
    assert secrets_of(cluster, project) == []
