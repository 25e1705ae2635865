"""The CLI against the real engine: bad input, up/down lifecycle, attached mode, passthrough.

Every bad-input case must exit 2 with one clear message and create nothing; `down` must leave
nothing behind and be safe to run twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, docker, labelled, wait_for

SANDBOX_IMAGE = "composemirror/sandbox:0.1"
MIRROR = """
x-composemirror:
  target: deployment/checkout
  namespace: shop
  services: [web]
"""
WEB = f"""
  web:
    image: {SANDBOX_IMAGE}
    command: [python3, /opt/sandbox/services.py, orders]
"""


def project(tmp_path: Path, name: str, body: str) -> Path:
    """Write a compose file for project `name`; return its path."""
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "compose.yaml"
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return path


def assert_nothing_of(name: str) -> None:
    for label in (f"com.docker.compose.project={name}", f"io.composemirror.project={name}"):
        assert labelled(label) == {"container": [], "network": [], "volume": []}, label


BAD_INPUT = {
    "network-mode": (
        MIRROR + "services:\n  web:\n    image: x\n    network_mode: host\n",
        "has `network_mode: host`",
    ),
    "port-collision": (
        MIRROR.replace("[web]", "[web, api]")
        + "services:\n  web:\n    image: x\n    ports: ['18090:80']\n"
        + "  api:\n    image: x\n    ports: ['127.0.0.1:18090:81']\n",
        "both publish host port 18090/tcp",
    ),
    "hosts-missing-service": (
        MIRROR
        + "  hosts:\n    postgres.shop.svc.cluster.local: dbb\n"
        + "services:\n  web:\n    image: x\n  db:\n    image: x\n",
        "'dbb' is not a service of this project",
    ),
    "unknown-key": (
        MIRROR.replace("services:", "servces:") + "services:\n  web:\n    image: x\n",
        "x-composemirror.servces: unknown key",
    ),
    "bad-filter": (
        MIRROR
        + "  feature:\n    network:\n      outgoing:\n        filter:\n"
        + "          local: ['tcp://db:5432', 'meow://x']\n"
        + "services:\n  web:\n    image: x\n",
        "x-composemirror.feature.network.outgoing.filter.local[1]",
    ),
    "no-config": ("services:\n  web:\n    image: x\n", "no composemirror configuration"),
    "bad-target": (
        MIRROR.replace("deployment/checkout", "checkout") + "services:\n  web:\n    image: x\n",
        "'checkout' is not a target",
    ),
    "unknown-service": (
        MIRROR.replace("[web]", "[wbe]") + "services:\n  web:\n    image: x\n",
        "did you mean 'web'?",
    ),
    "bad-yaml": ("services:\n  web: [\n", "docker compose rejected the project"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_exits_2_with_one_message_and_creates_nothing(
    engine: None, tmp_path: Path, case: str
) -> None:
    body, expected = BAD_INPUT[case]
    name = f"cm-bad-{case}"
    path = project(tmp_path, name, body)
    result = cli("-f", str(path), "up", "-d")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("composemirror: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (path.parent / ".composemirror").exists()
    assert_nothing_of(name)


def test_missing_compose_file_is_bad_input(engine: None, tmp_path: Path) -> None:
    result = cli("-f", str(tmp_path / "nope.yaml"), "config")
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_a_docker_target_that_does_not_exist_is_a_runtime_error(
    engine: None, tmp_path: Path
) -> None:
    body = MIRROR.replace("deployment/checkout", "docker://cm-no-such-container") + (
        "services:" + WEB
    )
    path = project(tmp_path, "cm-no-target", body)
    result = cli("-f", str(path), "up", "-d")
    assert result.returncode == 1
    assert "there is no container 'cm-no-such-container'" in result.stderr
    assert "hint: start it" in result.stderr
    assert_nothing_of("cm-no-target")


def test_config_prints_the_rewritten_model_and_changes_nothing(
    sandbox: None, tmp_path: Path
) -> None:
    path = project(tmp_path, "cm-config", MIRROR + "services:" + WEB)
    result = cli("-f", str(path), "config")
    assert result.returncode == 0, result.stderr
    assert "network_mode: service:web-mirror" in result.stdout
    assert "composemirror-agent:" in result.stdout
    assert not (path.parent / ".composemirror").exists()
    assert_nothing_of("cm-config")


@pytest.fixture
def small_project(sandbox: None, tmp_path: Path, project_cleanup: Callable[[Path], None]) -> Path:
    body = MIRROR + "services:" + WEB + "    ports: ['18081:8080']\n"
    path = project(tmp_path, "cm-lifecycle", body)
    project_cleanup(path)
    return path


def test_down_removes_everything_and_is_safe_twice(small_project: Path) -> None:
    up = cli("-f", str(small_project), "up", "-d")
    assert up.returncode == 0, up.stdout + up.stderr
    assert labelled("io.composemirror.project=cm-lifecycle")["container"]
    passthrough = cli("-f", str(small_project), "compose", "--", "ps", "--format", "json")
    assert passthrough.returncode == 0
    assert "web-mirror" in passthrough.stdout
    doctor = cli("-f", str(small_project), "doctor")
    assert doctor.returncode == 0, doctor.stdout
    assert "ok    agent link of web-mirror: connected" in doctor.stdout
    down = cli("-f", str(small_project), "down")
    assert down.returncode == 0, down.stderr
    assert_nothing_of("cm-lifecycle")
    assert not (small_project.parent / ".composemirror").exists()
    again = cli("-f", str(small_project), "down")
    assert again.returncode == 0, again.stderr


def test_doctor_names_a_killed_agent_and_its_fix_works(small_project: Path) -> None:
    up = cli("-f", str(small_project), "up", "-d")
    assert up.returncode == 0, up.stdout + up.stderr
    killed = docker("kill", "cm-lifecycle-composemirror-agent-1")
    assert killed.returncode == 0, killed.stderr

    def broken() -> bool:
        return cli("-f", str(small_project), "doctor").returncode == 1

    wait_for(broken, timeout=60)
    doctor = cli("-f", str(small_project), "doctor")
    assert "the agent container cm-lifecycle-composemirror-agent-1 is exited" in doctor.stdout
    assert "run `composemirror up -d` to start it again" in doctor.stdout
    again = cli("-f", str(small_project), "up", "-d")  # what the hint says
    assert again.returncode == 0, again.stdout + again.stderr

    def connected() -> bool:
        return (
            "ok    agent link of web-mirror: connected"
            in cli("-f", str(small_project), "doctor").stdout
        )

    wait_for(connected, timeout=60)


def test_attached_up_streams_logs_and_stops_on_ctrl_c_exiting_130(small_project: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "composemirror", "-f", str(small_project), "up"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _state("cm-lifecycle-web-1") == "running", timeout=120)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output  # as compose's own, and a shell's, after SIGINT
    assert "web-mirror-1" in output  # compose's log prefix: logs were streamed
    assert _state("cm-lifecycle-web-1") == "exited"
    assert _state("cm-lifecycle-web-mirror-1") == "exited"


@pytest.fixture
def interrupted_project(
    sandbox: None, tmp_path: Path, project_cleanup: Callable[[Path], None]
) -> Path:
    path = project(tmp_path, "cm-interrupted", MIRROR + "services:" + WEB)
    project_cleanup(path)
    return path


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0, 2.0, 4.0])
def test_ctrl_c_at_any_point_of_up_exits_130_and_leaves_nothing_running(
    interrupted_project: Path, delay: float
) -> None:
    """`setsid composemirror up & sleep D; kill -INT -- -$!` from a script: the shell starts a
    background job with SIGINT ignored, which compose itself does not heed. Wherever the
    signal lands (loading the project, preparing, compose starting the stack), the command
    exits 130, says it was interrupted (not that the project was rejected), and nothing it
    started is left running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "composemirror", "-f", str(interrupted_project), "up"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_ignore_sigint,
    )
    try:
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, output
    assert "rejected" not in output, output
    running = docker(
        "ps", "-q", "--filter", "label=com.docker.compose.project=cm-interrupted"
    )  # fmt: skip
    assert running.stdout.split() == [], output


def _state(container: str) -> str:
    result = docker("inspect", "--format", "{{json .State.Status}}", container)
    return str(json.loads(result.stdout)) if result.returncode == 0 else "missing"


def test_config_can_live_beside_the_compose_file_or_be_named(sandbox: None, tmp_path: Path) -> None:
    path = project(tmp_path, "cm-config-file", "services:" + WEB)
    (path.parent / "composemirror.yaml").write_text(
        "target: deployment/checkout\nnamespace: shop\nservices: [web]\n"
    )
    beside = cli("-f", str(path), "config")
    assert beside.returncode == 0, beside.stderr
    assert "network_mode: service:web-mirror" in beside.stdout
    # A mirrord config pastes in: its feature block, with keys that mean nothing here.
    mirrord = tmp_path / "mirrord.yaml"
    mirrord.write_text(
        textwrap.dedent("""\
        target: {path: deployment/checkout, namespace: shop}
        services: [web]
        feature:
          fs: read
          env: {include: "DATABASE_URL;ORDERS_URL"}
          network:
            incoming: mirror
            outgoing: {filter: {remote: ["orders.shop.svc.cluster.local"]}}
    """)
    )
    named = cli("-f", str(path), "--config", str(mirrord), "config")
    assert named.returncode == 0, named.stderr
    assert "ignored (no effect at the network level): x-composemirror.feature.fs" in named.stderr
    assert "DATABASE_URL:" in named.stdout and "LOG_LEVEL" not in named.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("target: deployment/checkout\nservices: [web]\nfeature: {netwrok: {}}\n")
    bad = cli("-f", str(path), "--config", str(broken), "config")
    assert bad.returncode == 2
    assert f"{broken}: x-composemirror.feature.netwrok: unknown key" in bad.stderr
    assert "did you mean `network`?" in bad.stderr
