"""The project composemirror loads is the one docker compose loads, on the real engine.

Run from a project directory without `-f`, as a user of compose does: override files, the
`COMPOSE_*` variables of `.env`, a `-p` given to `up` only, and host-port clashes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import docker, labelled

SANDBOX_IMAGE = "composemirror/sandbox:0.1"
MIRROR = """\
x-composemirror:
  target: deployment/checkout
  namespace: shop
  services: [web]
"""
WEB = f"""\
services:
  web:
    image: {SANDBOX_IMAGE}
    command: [python3, /opt/sandbox/services.py, orders]
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`composemirror ARGS` in `cwd`, with no COMPOSE_* variable of this process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run(
        [sys.executable, "-m", "composemirror", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def compose_model(folder: Path) -> dict[str, Any]:
    """What plain `docker compose config` loads in `folder`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        ["docker", "compose", "config", "--format", "json"],
        cwd=folder,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def assert_nothing_of(name: str) -> None:
    for label in (f"com.docker.compose.project={name}", f"io.composemirror.project={name}"):
        assert labelled(label) == {"container": [], "network": [], "volume": []}, label


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Project names whose containers, networks and volumes are removed at the end, by label."""
    names: list[str] = []
    yield names
    for name in names:
        for label in (f"com.docker.compose.project={name}", f"io.composemirror.project={name}"):
            found = labelled(label)
            if found["container"]:
                docker("rm", "-f", *found["container"])
            if found["network"]:
                docker("network", "rm", *found["network"])
            if found["volume"]:
                docker("volume", "rm", "-f", *found["volume"])


def test_the_override_file_is_loaded_as_compose_loads_it(
    sandbox: None, tmp_path: Path, cleanup: list[str]
) -> None:
    # netbox-docker's layout: the port, and here the configuration, only in the override file
    folder = write(
        tmp_path / "cm-override",
        {
            "compose.yaml": WEB,
            "compose.override.yaml": MIRROR + "services:\n  web:\n    ports: ['18093:8080']\n",
        },
    )
    cleanup.append("cm-override")
    up = run("up", "-d", cwd=folder)
    assert up.returncode == 0, up.stdout + up.stderr
    port = docker("port", "cm-override-web-mirror-1", "8080/tcp")
    assert port.returncode == 0 and ":18093" in port.stdout, port.stdout + port.stderr
    down = run("down", cwd=folder)
    assert down.returncode == 0, down.stderr
    assert_nothing_of("cm-override")


def test_compose_variables_of_dot_env_are_honoured(sandbox: None, tmp_path: Path) -> None:
    folder = write(
        tmp_path / "repo",
        {
            ".env": """\
                COMPOSE_PATH_SEPARATOR=,
                COMPOSE_FILE=deploy/base.yaml,deploy/mirror.yaml
                COMPOSE_PROJECT_NAME=cm-dotenv
                COMPOSE_PROFILES=dev
            """,
            "deploy/base.yaml": WEB + "    profiles: [dev]\n  db:\n    image: postgres:16\n",
            "deploy/mirror.yaml": MIRROR,
        },
    )
    plain = compose_model(folder)
    assert plain["name"] == "cm-dotenv" and "web" in plain["services"]
    config = run("config", cwd=folder)
    assert config.returncode == 0, config.stderr
    assert "name: cm-dotenv" in config.stdout
    assert "network_mode: service:web-mirror" in config.stdout
    without = write(
        tmp_path / "no-profile",
        {
            ".env": "COMPOSE_FILE=base.yaml:mirror.yaml\n",
            "base.yaml": WEB + "    profiles: [dev]\n  db:\n    image: postgres:16\n",
            "mirror.yaml": MIRROR,
        },
    )
    refused = run("config", cwd=without)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "'web' belongs to profile 'dev'" in refused.stderr
    assert "enable it with --profile dev or COMPOSE_PROFILES=dev" in refused.stderr


def test_down_and_status_find_the_project_up_named_with_p(
    sandbox: None, tmp_path: Path, cleanup: list[str]
) -> None:
    other = f"  other:\n    image: {SANDBOX_IMAGE}\n    command: [sleep, '600']\n"
    folder = write(tmp_path / "checkout", {"compose.yaml": MIRROR + WEB + other})
    cleanup.append("cm-named")
    up = run("-p", "cm-named", "up", "-d", cwd=folder)
    assert up.returncode == 0, up.stdout + up.stderr
    # other services still reach the app by its compose container name: the sidecar's alias
    sidecar = docker(
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        "cm-named-web-mirror-1",
    ).stdout.strip()
    lookup = docker("exec", "cm-named-other-1", "getent", "hosts", "cm-named-web-1").stdout.split()
    assert sidecar and lookup[:1] == [sidecar], lookup
    status = run("status", "--format", "json", cwd=folder)
    assert status.returncode == 0, status.stderr
    assert "cm-named-web-mirror-1" in status.stdout
    down = run("down", cwd=folder)
    assert down.returncode == 0, down.stderr
    assert_nothing_of("cm-named")
    assert not (folder / ".composemirror").exists()


def test_a_port_clash_with_an_unmirrored_service_is_refused_before_anything_starts(
    engine: None, tmp_path: Path
) -> None:
    folder = write(
        tmp_path / "cm-port-clash",
        {
            "compose.yaml": MIRROR
            + WEB
            + "    ports: ['18094:8080']\n  admin:\n    image: x\n    ports: ['18094:80']\n"
        },
    )
    up = run("up", "-d", cwd=folder)
    assert up.returncode == 2, up.stdout + up.stderr
    assert "'web' and 'admin' both publish host port 18094/tcp" in up.stderr
    assert "Traceback" not in up.stderr
    assert not (folder / ".composemirror").exists()
    assert_nothing_of("cm-port-clash")


def test_external_links_of_a_mirrored_app_work(
    sandbox: None, tmp_path: Path, cleanup: list[str]
) -> None:
    # Docker refuses links on a container that joins another's namespace; the sidecar holds them
    network, legacy = "cm-extlinks-net", "cm-extlinks-legacy"
    assert docker("network", "create", network).returncode == 0
    try:
        started = docker(
            "run", "-d", "--name", legacy, "--network", network, SANDBOX_IMAGE, "sleep", "600"
        )
        assert started.returncode == 0, started.stderr
        body = (
            MIRROR
            + WEB
            + "    external_links: ['cm-extlinks-legacy:billing.legacy']\n"
            + f"networks:\n  default:\n    name: {network}\n    external: true\n"
        )
        folder = write(tmp_path / "cm-extlinks", {"compose.yaml": body})
        cleanup.append("cm-extlinks")
        up = run("up", "-d", cwd=folder)
        assert up.returncode == 0, up.stdout + up.stderr
        address = docker(
            "inspect",
            "--format",
            '{{(index .NetworkSettings.Networks "' + network + '").IPAddress}}',
            legacy,
        ).stdout.strip()
        lookup = docker("exec", "cm-extlinks-web-1", "getent", "hosts", "billing.legacy")
        assert lookup.stdout.split()[:1] == [address], lookup.stdout + lookup.stderr
        down = run("down", cwd=folder)
        assert down.returncode == 0, down.stderr
    finally:
        docker("rm", "-f", legacy)
        docker("network", "rm", network)
