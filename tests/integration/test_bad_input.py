"""Bad input that used to crash, through the installed CLI and the real `docker compose`: each
kind exits 2 with one message naming the file and the fix, no traceback, and creates nothing;
`status | head -1` ends without a BrokenPipeError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, labelled

PROJECT = "cmbadinput"
COMPOSE = f"""
name: {PROJECT}
x-composemirror:
  target: TARGET
  namespace: shop
  services: [web]
services:
  web:
    image: composemirror/sandbox:0.1
"""


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "compose.yaml"
    path.write_text(body)
    return path


def _refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("composemirror: ")
    assert len(result.stderr) < 1000, "the message echoes the input"
    assert labelled(f"com.docker.compose.project={PROJECT}") == {
        "container": [],
        "network": [],
        "volume": [],
    }
    return result.stderr


def test_a_huge_target_name(engine: None, tmp_path: Path) -> None:
    file = _write(tmp_path, COMPOSE.replace("TARGET", "deployment/" + "a" * 100_000))
    err = _refused(cli("-f", str(file), "up", "-d"))
    assert "x-composemirror.target" in err and "at most 253 characters" in err


def test_a_binary_env_file(engine: None, tmp_path: Path) -> None:
    (tmp_path / "bin.env").write_bytes(bytes(range(256)) * 4)
    body = COMPOSE.replace("TARGET", "deployment/checkout").replace(
        "namespace: shop", "namespace: shop\n  feature: {env: {env_file: bin.env}}"
    )
    err = _refused(cli("-f", str(_write(tmp_path, body)), "up", "-d"))
    assert "feature.env.env_file" in err and "bin.env is not UTF-8 text" in err


def test_a_binary_config_file(engine: None, tmp_path: Path) -> None:
    file = _write(tmp_path, COMPOSE.replace("TARGET", "deployment/checkout"))
    config = tmp_path / "mirror.yaml"
    config.write_bytes(b"\xff\xfe\x00\x01target: \x80")
    err = _refused(cli("-f", str(file), "--config", str(config), "up", "-d"))
    assert f"{config}: not UTF-8 text" in err


@pytest.mark.parametrize("depth", [900, 5000])
def test_deeply_nested_yaml_in_the_compose_file(engine: None, tmp_path: Path, depth: int) -> None:
    """900 levels pass compose and Python's JSON reader, 5000 only compose (limit 10,000)."""
    body = COMPOSE.replace("TARGET", "deployment/checkout") + (
        "    labels: {a: b}\nx-deep: " + "[" * depth + "]" * depth + "\n"
    )
    err = _refused(cli("-f", str(_write(tmp_path, body)), "config"))
    assert "nested" in err


def test_status_into_a_reader_that_is_gone(engine: None, tmp_path: Path) -> None:
    """`composemirror status | head -1` where head has gone before status writes (`true` reads
    nothing): no BrokenPipeError traceback, exit 1 as the Python docs' SIGPIPE note suggests."""
    file = _write(tmp_path, COMPOSE.replace("TARGET", "deployment/checkout"))
    for reader in ("true", "head -c 0"):
        command = f"{sys.executable} -m composemirror -f {file} status | {reader}"
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.stderr == "", result.stderr
        assert result.returncode == 1


TICKING = """
name: cmpipe
x-composemirror:
  target: docker://cmpipe-target
  services: [web]
services:
  web:
    image: composemirror/sandbox:0.1
    command: ["sh", "-c", "while true; do echo tick; sleep 0.2; done"]
"""


def test_compose_passthrough_ends_with_its_reader(engine: None, tmp_path: Path) -> None:
    """`composemirror compose -- logs -f web | head -1` ends once head has its line, as plain
    `docker compose logs -f | head -1` does: compose meets the closed pipe, no traceback, no
    hang."""
    file = _write(tmp_path, TICKING)
    target = ["docker", "run", "-d", "--name", "cmpipe-target", "composemirror/base:bookworm"]
    subprocess.run([*target, "sleep", "600"], check=True, capture_output=True)
    try:
        up = cli("-f", str(file), "up", "-d")
        assert up.returncode == 0, up.stdout + up.stderr
        command = f"{sys.executable} -m composemirror -f {file} compose -- logs -f web | head -1"
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout.strip().endswith("| tick"), result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 1  # the reader went first, as for `status | head -1`
    finally:
        cli("-f", str(file), "down")
        subprocess.run(["docker", "rm", "-f", "cmpipe-target"], capture_output=True)
