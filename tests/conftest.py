"""Shared helpers: run the CLI as a user does, and reach the Docker engine the tests need."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`composemirror ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "composemirror", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def exec_in(
    container: str, command: Sequence[str] | str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a container; a string runs through sh -c."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    return docker("exec", container, *argv, timeout=timeout)


def labelled(label: str) -> dict[str, list[str]]:
    """Containers, networks and volumes carrying `label` (key=value)."""
    found = {}
    for kind in ("container", "network", "volume"):
        listing = ["container", "ls", "-a"] if kind == "container" else [kind, "ls"]
        result = docker(*listing, "-q", "--filter", f"label={label}")
        found[kind] = result.stdout.split()
    return found


def wait_for(check: Callable[[], Any], *, timeout: float = 30, interval: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; fail the test with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"gave up after {timeout} s waiting; last value: {value!r}")


def status(compose_file: Path) -> dict[str, Any]:
    result = cli("-f", str(compose_file), "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="session")
def engine() -> None:
    """A running Docker engine with the compose plugin. Missing is a failure, never a skip."""
    if docker("info").returncode != 0:
        pytest.fail("no Docker engine answers: run scripts/setup (make test does)")
    if docker("compose", "version").returncode != 0:
        pytest.fail("the docker compose plugin is missing: run scripts/setup")


@pytest.fixture(scope="session")
def sandbox(engine: None) -> None:
    """The sandbox cluster, started once (it is left running, as a cluster would be)."""
    result = cli("sandbox", "up")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def static_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/clients/httpget.c built with musl-gcc -static: its own resolver, no libc hooks."""
    binary = tmp_path_factory.mktemp("clients") / "httpget"
    subprocess.run(
        [
            "musl-gcc",
            "-static",
            "-O2",
            "-o",
            str(binary),
            str(ROOT / "tests" / "clients" / "httpget.c"),
        ],
        check=True,
    )
    return binary


@pytest.fixture
def project_cleanup() -> Iterator[Callable[[Path], None]]:
    """Register compose files whose projects are taken down (and swept by label) at the end."""
    files: list[Path] = []
    yield files.append
    for compose_file in files:
        cli("-f", str(compose_file), "down", "-v")
