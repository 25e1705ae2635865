"""Faults a session must survive or report, on the real engine: a restarted sidecar, a restarted
target, an app that flushes the nat table, a link that is down, and the secrets on disk.

Each test runs its own project against its own `docker://` target: a container on a network of
its own with a peer (an HTTP server) that only the target can resolve and reach (`<name>-peer`),
so curl of the peer in the app proves the whole remote path (sidecar DNS and proxy, tunnel,
agent in the target's namespace).
Everything carries the test's name and is removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, docker, exec_in, labelled, status, wait_for

IMAGE = "composemirror/sandbox:0.1"
"""Has getent, python3 and iptables."""


class Session:
    """A target with a peer, and a project mirroring it; `up()` starts the project."""

    def __init__(self, name: str, folder: Path, app: dict[str, Any] | None = None) -> None:
        self.name = name
        self.folder = folder
        self.file = folder / "compose.yaml"
        self.token = "tok-" + secrets.token_hex(12)
        self.target = f"{name}-target"
        self.peer = f"{name}-peer"
        self.app = f"{name}-app-1"
        self.sidecar = f"{name}-app-mirror-1"
        self.agent = f"{name}-composemirror-agent-1"
        self.app_spec = {
            "image": IMAGE,
            "command": ["sleep", "infinity"],
            "init": True,
            **(app or {}),
        }

    def create(self) -> None:
        self.remove_target()
        made = docker(
            "network", "create", "--label", f"io.composemirror.test={self.name}", self.network
        )
        assert made.returncode == 0, made.stderr
        for container, extra, command in (
            (self.peer, [], ["python3", "-m", "http.server", "8080"]),
            (self.target, ["-e", f"API_TOKEN={self.token}"], ["sleep", "infinity"]),
        ):
            started = docker(
                "run", "-d", "--init", "--name", container, "--network", self.network,
                *extra, IMAGE, *command,
            )  # fmt: skip
            assert started.returncode == 0, started.stderr
        self.file.write_text(
            json.dumps(
                {
                    "name": self.name,
                    "x-composemirror": {"target": f"docker://{self.target}", "services": ["app"]},
                    "services": {
                        "app": self.app_spec,
                        "db": {"image": IMAGE, "command": ["sleep", "infinity"], "init": True},
                    },
                }
            )
        )

    @property
    def network(self) -> str:
        return f"{self.name}-net"

    def up(self) -> subprocess.CompletedProcess[str]:
        result = cli("-f", str(self.file), "up", "-d")
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def remote_works(self) -> bool:
        """Whether the app reaches the peer's HTTP server by name, which only the target's
        resolver knows and only the target's network reaches."""
        command = ["curl", "-sf", "-m", "5", "-o", "/dev/null", f"http://{self.peer}:8080/"]
        return exec_in(self.app, command, timeout=20).returncode == 0

    def doctor(self) -> subprocess.CompletedProcess[str]:
        return cli("-f", str(self.file), "doctor")

    def status(self) -> dict[str, Any]:
        return status(self.file)

    def row(self, service: str) -> dict[str, Any]:
        return next(s for s in self.status()["services"] if s["service"] == service)

    def remove_target(self) -> None:
        docker("rm", "-f", self.target, self.peer)
        docker("network", "rm", self.network)


@pytest.fixture
def session(
    engine: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Session]]:
    """Makes a `Session` (target, peer and project written, not started); removes it after."""
    made: list[Session] = []

    def make(name: str, app: dict[str, Any] | None = None) -> Session:
        folder = tmp_path / name
        folder.mkdir()
        found = Session(name, folder, app)
        made.append(found)
        found.create()
        return found

    yield make
    for found in made:
        cli("-f", str(found.file), "down", "-v")
        found.remove_target()


def interfaces(container: str) -> list[str]:
    """The network interfaces a container's processes see."""
    lines = exec_in(container, ["cat", "/proc/net/dev"]).stdout.splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def failing(doctor_output: str) -> list[str]:
    return [line for line in doctor_output.splitlines() if line.startswith("FAIL")]


# Issue 13, fault 2: a restarted sidecar leaves the app cut off.


def test_a_restarted_sidecar_is_reported_and_up_puts_the_app_back_in_its_namespace(
    session: Callable[..., Session],
) -> None:
    s = session("cmh-sidecar")
    s.up()
    wait_for(s.remote_works, timeout=60)
    first_app = docker("inspect", "-f", "{{.Id}}", s.app).stdout.strip()

    assert docker("restart", s.sidecar).returncode == 0
    assert interfaces(s.app) == ["lo"]  # the app is left in the old namespace
    namespace = s.row("app")["namespace"]
    assert namespace["ok"] is False and "restarted" in namespace["detail"], namespace
    doctor = s.doctor()
    assert doctor.returncode == 1
    assert any("network namespace of app" in line for line in failing(doctor.stdout)), doctor.stdout

    result = s.up()
    assert "recreating app" in result.stderr
    assert docker("inspect", "-f", "{{.Id}}", s.app).stdout.strip() != first_app
    assert "eth0" in interfaces(s.app)
    wait_for(s.remote_works, timeout=30)
    assert s.row("app")["namespace"]["ok"] is True
    doctor = wait_for(lambda: (d := s.doctor()).returncode == 0 and d, timeout=30)
    assert "network namespace of app: shares app-mirror's" in doctor.stdout


def test_up_after_the_sidecar_died_brings_the_app_back(session: Callable[..., Session]) -> None:
    s = session("cmh-died")
    s.up()
    wait_for(s.remote_works, timeout=60)
    assert docker("kill", s.sidecar).returncode == 0
    namespace = s.row("app")["namespace"]
    assert namespace["ok"] is False and "has no network" in namespace["detail"], namespace

    result = s.up()
    assert "recreating app" in result.stderr
    wait_for(s.remote_works, timeout=30)
    assert s.row("app")["namespace"]["ok"] is True


# Issue 13, fault 3: a restarted target leaves the agent in an empty namespace.


def test_the_agent_follows_a_restarted_target(session: Callable[..., Session]) -> None:
    s = session("cmh-follow")
    s.up()
    wait_for(s.remote_works, timeout=60)

    assert docker("restart", s.target).returncode == 0
    # The agent left in the old namespace exits; the engine starts it in the target's new one.
    wait_for(s.remote_works, timeout=30)
    assert "eth0" in interfaces(s.agent)
    checks = {c["name"]: c for c in s.status()["session"]}
    assert checks["agent namespace"] == {
        "name": "agent namespace",
        "ok": True,
        "detail": f"shares {s.target}'s",
        "hint": None,
    }
    wait_for(lambda: s.doctor().returncode == 0, timeout=30)


def test_a_target_stopped_and_started_again_is_reported_and_up_moves_the_agent_into_it(
    session: Callable[..., Session],
) -> None:
    s = session("cmh-target")
    s.up()
    wait_for(s.remote_works, timeout=60)

    assert docker("stop", s.target).returncode == 0
    # The agent exits with the target's network; the engine cannot start it in a namespace
    # that is gone, and does not try again once the target is back.
    wait_for(lambda: "non running" in docker("inspect", "-f", "{{.State.Error}}", s.agent).stdout)
    assert docker("start", s.target).returncode == 0
    assert not s.remote_works()
    checks = wait_for(
        lambda: (
            (c := {c["name"]: c for c in s.status()["session"]})["agent namespace"]["ok"] is False
            and c
        ),
        timeout=15,
    )
    assert "the agent" in checks["agent namespace"]["detail"], checks
    table = cli("-f", str(s.file), "status")
    assert table.returncode == 0, table.stderr
    assert "FAIL agent namespace:" in table.stdout, table.stdout
    doctor = s.doctor()
    assert doctor.returncode == 1
    assert any("agent namespace" in line for line in failing(doctor.stdout)), doctor.stdout
    assert "composemirror up -d" in doctor.stdout

    result = s.up()
    assert "recreating the agent" in result.stderr
    wait_for(s.remote_works, timeout=30)
    assert "eth0" in interfaces(s.agent)
    wait_for(lambda: s.doctor().returncode == 0, timeout=30)


# Issue 10, fault 11, and issue 13, fault 8: an app with NET_ADMIN flushes the nat table.


def test_rules_flushed_by_the_app_are_restored_and_reported(
    session: Callable[..., Session],
) -> None:
    s = session("cmh-nat", app={"cap_add": ["NET_ADMIN"]})
    s.up()
    wait_for(s.remote_works, timeout=60)
    assert s.row("app-mirror")["link"]["rules"]["restored"] == 0
    assert s.doctor().returncode == 0

    flushed = exec_in(s.app, "iptables-nft -t nat -F; iptables-legacy -t nat -F; echo done")
    assert flushed.stdout.strip() == "done", flushed.stderr

    rules = wait_for(
        lambda: (r := s.row("app-mirror")["link"]["rules"])["restored"] >= 1 and r, timeout=15
    )
    assert rules["state"] == "in place" and "COMPOSEMIRROR" in rules["drift"], rules
    # Interception is back: cluster names through the agent, local names through Docker's DNS.
    wait_for(s.remote_works, timeout=10)
    assert exec_in(s.app, ["getent", "hosts", "db"]).returncode == 0
    doctor = s.doctor()
    assert doctor.returncode == 1
    [line] = [f for f in failing(doctor.stdout) if "interception rules of app-mirror" in f]
    assert "restored 1 time(s)" in line, doctor.stdout
    assert "NET_ADMIN" in doctor.stdout
    table = cli("-f", str(s.file), "status").stdout
    assert "rules in place (restored 1x)" in table, table


def test_the_held_syns_rules_flushed_by_the_app_are_restored(
    session: Callable[..., Session],
) -> None:
    """Without the mangle chain that holds SYNs (and the filter chain that answers them), a
    refused port would reach the app as a reset again: the guard puts both back."""
    s = session("cmh-syn", app={"cap_add": ["NET_ADMIN"]})
    s.up()
    wait_for(s.remote_works, timeout=60)
    closed = ["curl", "-sS", "-m", "5", "-o", "/dev/null", f"http://{s.peer}:8081/"]
    assert exec_in(s.app, closed).returncode == 7  # refused, as in the target

    flush = "for t in mangle filter; do iptables-nft -t $t -F; iptables-legacy -t $t -F; done"
    flushed = exec_in(s.app, f"{flush}; echo done")
    assert flushed.stdout.strip() == "done", flushed.stderr
    rules = wait_for(
        lambda: (r := s.row("app-mirror")["link"]["rules"])["restored"] >= 1 and r, timeout=15
    )
    assert "COMPOSEMIRROR_SYN" in rules["drift"] and "filter" in rules["drift"], rules
    assert rules["state"] == "in place", rules
    assert exec_in(s.app, closed).returncode == 7
    assert s.remote_works()


# Issue 13, fault 8: the sidecar's health follows its link.


def test_the_sidecar_is_unhealthy_while_its_link_is_down(session: Callable[..., Session]) -> None:
    s = session("cmh-link")
    s.up()
    wait_for(s.remote_works, timeout=60)

    def health() -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", s.sidecar).stdout.strip()

    assert health() == "healthy"
    assert docker("stop", s.agent).returncode == 0
    wait_for(lambda: health() == "unhealthy", timeout=40)
    row = s.row("app-mirror")
    assert row["health"] == "unhealthy" and row["link"]["agent"] != "connected", row
    assert s.row("app-mirror")["link"]["rules"]["state"] == "in place"
    doctor = s.doctor()
    assert doctor.returncode == 1
    assert any("agent link of app-mirror" in line for line in failing(doctor.stdout))
    # up starts the agent and waits for the sidecar to link again (compose would refuse to
    # start anything behind an unhealthy sidecar).
    result = s.up()
    assert "waiting for cmh-link-app-mirror-1 to link to the agent again" in result.stderr
    assert health() == "healthy"
    wait_for(s.remote_works, timeout=10)


# docs/security.md: who reaches the sidecar and the agent.


def test_only_the_apps_namespace_reaches_the_sidecar_and_the_app_has_no_way_to_the_agent(
    session: Callable[..., Session],
) -> None:
    s = session("cmh-reach")
    s.up()
    wait_for(s.remote_works, timeout=60)
    address = docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", s.sidecar
    ).stdout.strip()
    neighbour = f"{s.name}-db-1"
    # The sidecar's DNS server and proxy listen on the loopback of the app's namespace only.
    probe = (
        "import socket, sys; c = socket.socket(); c.settimeout(3); "
        "sys.exit(c.connect_ex((sys.argv[1], int(sys.argv[2]))))"
    )
    for port in ("53", "15001"):
        refused = exec_in(neighbour, ["python3", "-c", probe, address, port])
        assert refused.returncode == 111, (port, refused.returncode)  # ECONNREFUSED
    dig = exec_in(neighbour, ["dig", "+time=2", "+tries=1", f"@{address}", s.peer])
    assert dig.returncode == 9, dig.stdout  # no server answered
    # The agent's socket (the link volume) and the tunnel key are not in the app's container.
    assert exec_in(s.app, ["ls", "/run/composemirror"]).returncode != 0
    assert exec_in(s.app, ["test", "-e", "/run/secrets/composemirror-key"]).returncode == 1
    assert exec_in(s.sidecar, ["test", "-S", "/run/composemirror/agent.sock"]).returncode == 0


# Issue 13, fault 4: the rendered files hold the target's secrets.


def test_files_with_imported_values_are_private_and_down_by_name_removes_them(
    session: Callable[..., Session], tmp_path: Path
) -> None:
    s = session("cmh-files")
    s.up()
    rendered = s.folder / ".composemirror"
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o700
    holders = [p for p in rendered.iterdir() if s.token in p.read_text(errors="replace")]
    assert rendered / "compose.yaml" in holders
    for path in rendered.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # A file left more open by an earlier version is tightened by the next up.
    os.chmod(rendered, 0o755)
    os.chmod(rendered / "compose.yaml", 0o644)
    s.up()
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o700
    assert stat.S_IMODE((rendered / "compose.yaml").stat().st_mode) == 0o600

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("-p", s.name, "down", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert not rendered.exists()
    for label in (f"com.docker.compose.project={s.name}", f"io.composemirror.project={s.name}"):
        assert labelled(label) == {"container": [], "network": [], "volume": []}, label
