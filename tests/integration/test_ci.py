"""A test job in CI, as a CI runner runs it: no terminal, stdin closed, stdout a pipe.

`run --rm job` and `up --exit-code-from job` must return the job's own exit code by themselves,
with no escape codes in their output; the same from inside a container that reaches the host's
engine through its socket (the project only in that container); SIGTERM stops the stack; `up -d
--wait` returns once the mirrored service and its sidecar are healthy. After each test nothing
with the project's labels is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from composemirror import images
from tests.conftest import ROOT, docker, labelled, wait_for

SANDBOX_IMAGE = "composemirror/sandbox:0.1"
BASE_IMAGE = "composemirror/base:bookworm"
RUNNER_IMAGE = "composemirror-test/ci-runner"
JOB = f"""
x-composemirror:
  target: deployment/checkout
  namespace: shop
  services: [job]
services:
  job:
    image: {SANDBOX_IMAGE}
    init: true
    # Reaches the cluster's orders service through the tunnel, then exits with $JOB_EXIT.
    command:
      - python3
      - -c
      - |
        import os, sys, urllib.request
        url = "http://orders.shop.svc.cluster.local:8080/orders"
        body = urllib.request.urlopen(url, timeout=30).read()
        print("job reached the cluster:", len(body), "bytes", flush=True)
        sys.exit(int(os.environ.get("JOB_EXIT", "0")))
    environment:
      JOB_EXIT: ${{JOB_EXIT:-0}}
    depends_on: [db]
  db:
    image: {SANDBOX_IMAGE}
    init: true
    command: [sleep, infinity]
"""


def write_job(folder: Path, name: str, body: str = JOB) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compose.yaml"
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return path


def ci(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`composemirror ARGS` as a CI runner starts it: stdin closed, stdout and stderr pipes."""
    return subprocess.run(
        [sys.executable, "-m", "composemirror", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_nothing_of(name: str) -> None:
    for label in (f"com.docker.compose.project={name}", f"io.composemirror.project={name}"):
        assert labelled(label) == {"container": [], "network": [], "volume": []}, label


def assert_plain(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "\x1b" not in output, output


@pytest.fixture
def taken_down() -> Iterator[Callable[[Path], None]]:
    """Register compose files whose projects `down` removes at the end; nothing may remain."""
    files: list[Path] = []
    yield files.append
    for path in files:
        down = ci("-f", str(path), "down", "-v")
        assert down.returncode == 0, down.stderr
        assert_nothing_of(path.parent.name)


@pytest.mark.parametrize("code", [0, 3])
def test_run_rm_returns_the_jobs_code(
    sandbox: None, tmp_path: Path, taken_down: Callable[[Path], None], code: int
) -> None:
    path = write_job(tmp_path / "cm-ci-run", "cm-ci-run")
    taken_down(path)
    result = ci("-f", str(path), "run", "--rm", "-e", f"JOB_EXIT={code}", "job")
    assert result.returncode == code, result.stdout + result.stderr
    assert "job reached the cluster" in result.stdout
    assert_plain(result)
    # --rm: the one-off container is gone; its sidecar (a dependency) stays until `down`
    one_offs = labelled("com.docker.compose.oneoff=True")["container"]
    assert not set(one_offs) & set(labelled("com.docker.compose.project=cm-ci-run")["container"])


@pytest.mark.parametrize("code", [0, 4])
def test_up_exit_code_from_returns_the_jobs_code_and_stops(
    sandbox: None, tmp_path: Path, taken_down: Callable[[Path], None], code: int
) -> None:
    path = write_job(tmp_path / "cm-ci-up", "cm-ci-up")
    taken_down(path)
    result = ci("-f", str(path), "up", "--exit-code-from", "job", env={"JOB_EXIT": str(code)})
    assert result.returncode == code, result.stdout + result.stderr
    assert "job reached the cluster" in result.stdout
    assert_plain(result)
    states = docker(
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project=cm-ci-up",
        "--format",
        "{{.State}}",
    ).stdout.split()
    assert states and "running" not in states  # db, sidecar and agent were stopped too


LONG_JOB = JOB.replace('sys.exit(int(os.environ.get("JOB_EXIT", "0")))', "time.sleep(600)").replace(
    "import os, sys,", "import os, sys, time,"
)


@pytest.mark.parametrize(
    ("command", "name", "containers"),
    [
        (["up"], "cm-ci-term", 4),  # job, db, sidecar, agent
        (["run", "--rm", "job"], "cm-ci-term-run", 4),  # the one-off, db, sidecar, agent
    ],
)
def test_sigterm_stops_what_the_command_started_and_exits_non_zero(
    sandbox: None,
    tmp_path: Path,
    taken_down: Callable[[Path], None],
    command: list[str],
    name: str,
    containers: int,
) -> None:
    path = write_job(tmp_path / name, name, LONG_JOB)
    taken_down(path)
    process = subprocess.Popen(
        [sys.executable, "-m", "composemirror", "-f", str(path), *command],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _running(name) >= containers, timeout=180)
        wait_for(lambda: "job reached the cluster" in docker("logs", _job(name)).stdout, timeout=60)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)  # to the CLI only, as a CI runner's cancel does
        output, _ = process.communicate(timeout=60)
        stopped_after = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, output
    assert stopped_after < 20, output
    assert "\x1b" not in output
    if command[0] == "up":
        assert _running(name) == 0
    else:  # compose run leaves its dependencies to `down`, as compose does; the job is gone
        assert not [c for c in _names(name) if "-job-run-" in c]


def _job(project: str) -> str:
    return next(c for c in _names(project) if "-job-1" in c or "-job-run-" in c)


def _names(project: str) -> list[str]:
    result = docker(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--format",
        "{{.Names}}",
    )
    return result.stdout.split()


def _running(project: str) -> int:
    result = docker(
        "ps", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.ID}}"
    )
    return len(result.stdout.split())


def test_up_wait_returns_once_the_service_and_its_sidecar_are_healthy(
    sandbox: None, tmp_path: Path, taken_down: Callable[[Path], None]
) -> None:
    body = LONG_JOB.replace(
        "    depends_on: [db]\n",
        "    depends_on: [db]\n"
        "    healthcheck:\n"
        "      test: [CMD, python3, -c, 'import socket; socket.getaddrinfo(\"db\", 0)']\n"
        "      interval: 1s\n"
        "      retries: 30\n",
    )
    path = write_job(tmp_path / "cm-ci-wait", "cm-ci-wait", body)
    taken_down(path)
    result = ci("-f", str(path), "up", "-d", "--wait", "--wait-timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_plain(result)
    for container in ("cm-ci-wait-job-1", "cm-ci-wait-job-mirror-1"):
        health = docker("inspect", "--format", "{{.State.Health.Status}}", container)
        assert health.stdout.strip() == "healthy", container
    # The tunnel key is copied into the sidecar and agent only: in no inspect, env or log.
    key = (path.parent / ".composemirror" / "tunnel-cm-ci-wait.key").read_text().strip()
    containers = labelled("com.docker.compose.project=cm-ci-wait")["container"]
    assert key not in docker("inspect", *containers).stdout
    assert key not in docker("exec", "cm-ci-wait-job-1", "env").stdout
    assert docker("exec", "cm-ci-wait-job-1", "ls", "/run/secrets").stdout == ""
    for container in containers:
        logs = docker("logs", container)
        assert key not in logs.stdout + logs.stderr
    sidecar_key = docker("exec", "cm-ci-wait-job-mirror-1", "cat", "/run/secrets/composemirror-key")
    assert sidecar_key.stdout.strip() == key


# -- the CLI in a container, against the host's engine -------------------------------------------


@pytest.fixture(scope="session")
def runner_image(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An image with the docker CLI, the compose plugin and composemirror (from a wheel of this
    checkout, its dependencies as wheels): a CI job's container. Built offline from the local
    base image (its layers cached by the engine), removed at the end of the session."""
    context = tmp_path_factory.mktemp("runner")
    wheels = context / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    docker_cli = shutil.which("docker")
    assert docker_cli is not None
    shutil.copy(Path(docker_cli).resolve(), context / "docker")
    plugin = Path.home() / ".docker" / "cli-plugins" / "docker-compose"
    shutil.copy(plugin, context / "docker-compose")
    (context / "Dockerfile").write_text(
        textwrap.dedent(
            f"""\
            FROM {BASE_IMAGE}
            COPY docker /usr/local/bin/docker
            COPY docker-compose /usr/local/lib/docker/cli-plugins/docker-compose
            COPY wheels /tmp/wheels
            RUN for w in /tmp/wheels/*.whl; do \\
                  python3 -m zipfile -e "$w" /usr/local/lib/python3.11/dist-packages; done \\
             && rm -rf /tmp/wheels \\
             && printf '#!/bin/sh\\nexec python3 -m composemirror "$@"\\n' \\
                  > /usr/local/bin/composemirror \\
             && chmod +x /usr/local/bin/composemirror
            WORKDIR /ci
            """
        )
    )
    tag = f"{RUNNER_IMAGE}:{os.getpid()}"
    build = docker("build", "-q", "-t", tag, str(context), timeout=600)
    assert build.returncode == 0, build.stderr
    yield tag
    docker("rmi", tag)


@pytest.mark.parametrize("code", [0, 5])
def test_the_job_from_inside_a_container_with_the_hosts_socket(
    sandbox: None, runner_image: str, code: int
) -> None:
    name = "cm-ci-inside"
    # The project exists only in the runner's filesystem: written there from stdin.
    script = (
        "cat > compose.yaml"
        f" && composemirror run --rm -e JOB_EXIT={code} job </dev/null; code=$?"
        "; composemirror down -v </dev/null || exit 99"
        "; exit $code"
    )
    try:
        result = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                "-i",
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                runner_image,
                "sh",
                "-c",
                script,
            ],
            input=f"name: {name}\n" + textwrap.dedent(JOB),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == code, result.stdout + result.stderr
        assert "job reached the cluster" in result.stdout
        assert "\x1b" not in result.stdout + result.stderr
        assert_nothing_of(name)
    finally:  # should `down` inside have failed, the project's directory is gone: use -p
        ci("-p", name, "down", "-v")


def test_ctrl_c_during_an_image_build_exits_130_without_traceback_or_temp_dir(
    engine: None, tmp_path: Path
) -> None:
    # A base image of this test's own: composemirror's images for it are missing, so `up` builds.
    base = f"composemirror-test/base:interrupt-{os.getpid()}"
    assert docker("tag", BASE_IMAGE, base).returncode == 0
    temp = tmp_path / "tmp"
    temp.mkdir()
    path = write_job(tmp_path / "cm-ci-interrupt", "cm-ci-interrupt")
    env = {**os.environ, images.BASE_ENV: base, "TMPDIR": str(temp)}
    process = subprocess.Popen(
        [sys.executable, "-m", "composemirror", "-f", str(path), "up", "-d"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("building "):
                process.send_signal(signal.SIGINT)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        ci("-f", str(path), "down")
        for role in images.ROLES:
            docker("rmi", images.spec(role, base).tag)
        docker("rmi", base)
    assert process.returncode == 130, output
    assert output.endswith("composemirror: interrupted\n"), output
    assert "Traceback" not in output
    # No build context (a directory) is left. An empty, unprefixed file is sometimes left there
    # by a client library cut off mid-request (about 1 run in 7, with no composemirror name);
    # it holds nothing and is not composemirror's.
    left = [
        p for p in temp.iterdir() if p.is_dir() or p.stat().st_size or "composemirror" in p.name
    ]
    assert left == []
    assert_nothing_of("cm-ci-interrupt")


def test_compose_passthrough_builds_missing_images_first(
    sandbox: None, tmp_path: Path, taken_down: Callable[[Path], None]
) -> None:
    # A fresh runner: composemirror's images for this base do not exist yet.
    base = f"composemirror-test/base:passthrough-{os.getpid()}"
    assert docker("tag", BASE_IMAGE, base).returncode == 0
    path = write_job(tmp_path / "cm-ci-passthrough", "cm-ci-passthrough")
    taken_down(path)
    try:
        result = ci(
            "-f",
            str(path),
            "compose",
            "--",
            "up",
            "--exit-code-from",
            "job",
            env={images.BASE_ENV: base, "JOB_EXIT": "6"},
        )
        assert result.returncode == 6, result.stdout + result.stderr
        built = [line for line in result.stderr.splitlines() if line.startswith("building ")]
        assert len(built) == 2, result.stderr
        assert "job reached the cluster" in result.stdout
        assert_plain(result)
    finally:
        ci("-f", str(path), "down", env={images.BASE_ENV: base})
        for role in images.ROLES:
            docker("rmi", images.spec(role, base).tag)
        docker("rmi", base)
