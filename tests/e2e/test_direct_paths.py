"""The sidecar's direct paths on a real engine: local TCP connections (spliced) and local UDP flows.

With an outgoing filter in `remote` mode the firewall diverts all of the app's traffic, the
project's own included, so a compose service is reached through the sidecar's proxies and sent
directly from there: the TCP proxy splices the app's connection to its own, the UDP proxy keeps a
direct flow. The target is a container of the test's own (`docker://`); nothing goes through the
tunnel here. Everything carries the project's name (`cmdirect`) and is removed at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, docker, exec_in, wait_for

PROJECT = "cmdirect"
IMAGE = "composemirror/sandbox:0.1"
"""Has python3 (the servers and the clients here)."""
TARGET = f"{PROJECT}-target"
APP = f"{PROJECT}-app-1"
SIDECAR = f"{PROJECT}-app-mirror-1"
LABEL = f"io.composemirror.test={PROJECT}"

SERVERS = """
import socket, threading
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 9999))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"echo " + data, peer)
def tcp():
    server = socket.create_server(("0.0.0.0", 7000))
    while True:
        conn, _ = server.accept()
        size = 0
        while chunk := conn.recv(65536):  # to the client's EOF
            size += len(chunk)
        conn.sendall(b"received %d" % size)  # answered after the half-close
        conn.close()
threading.Thread(target=udp, daemon=True).start()
tcp()
"""


@pytest.fixture(scope="module")
def project(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The mirrored project with its local servers, up; removed (by name) afterwards."""
    compose_file = tmp_path_factory.mktemp("direct") / "compose.yaml"
    compose_file.write_text(
        json.dumps(
            {
                "name": PROJECT,
                "x-composemirror": {
                    "target": f"docker://{TARGET}",
                    "services": ["app"],
                    # Only this (unused) range is remote: everything else, the project's own
                    # services included, goes through the sidecar and directly from there.
                    "feature": {"network": {"outgoing": {"filter": {"remote": ["10.123.0.0/16"]}}}},
                },
                "services": {
                    "app": {"image": IMAGE, "command": ["sleep", "infinity"], "init": True},
                    "servers": {"image": IMAGE, "command": ["python3", "-c", SERVERS]},
                },
            }
        )
    )
    try:
        docker("rm", "-f", TARGET)
        started = docker(
            "run", "-d", "--init", "--name", TARGET, "--label", LABEL, IMAGE, "sleep", "infinity"
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        result = cli("-f", str(compose_file), "up", "-d")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: _counters().get("tcp_local") is not None, timeout=60)
        yield compose_file
    finally:
        cli("-f", str(compose_file), "down", "-v")
        docker("rm", "-f", TARGET)


def _counters() -> dict[str, Any]:
    result = exec_in(SIDECAR, ["cat", "/run/composemirror-status.json"])
    if result.returncode != 0:
        return {}
    counters: dict[str, Any] = json.loads(result.stdout).get("counters", {})
    return counters


def test_a_local_udp_service_answers_through_the_sidecars_direct_flow(project: Path) -> None:
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(5)\n"
        "s.connect(('servers', 9999))\n"
        "for i in range(5):\n"
        "    s.send(b'%d' % i)\n"
        "    data, peer = s.recvfrom(100)\n"
        "    assert data == b'echo %d' % i, data\n"
        "print(peer[0] == socket.gethostbyname('servers'))\n"
    )
    result = exec_in(APP, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]  # the answers come from the service's address
    counters = wait_for(lambda: _counters().get("udp_local") and _counters(), timeout=10)
    assert counters["udp_local"] >= 1 and counters["udp_remote"] == 0


def test_a_local_tcp_service_answers_after_the_apps_half_close(project: Path) -> None:
    script = (
        "import socket\n"
        "s = socket.create_connection(('servers', 7000), timeout=10)\n"
        "s.sendall(b'x' * 3_000_000)\n"
        "s.shutdown(socket.SHUT_WR)\n"  # done sending; the answer must still arrive
        "reply = b''\n"
        "while chunk := s.recv(65536):\n"
        "    reply += chunk\n"
        "print(reply.decode())\n"
    )
    result = exec_in(APP, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "received 3000000"
    counters = wait_for(lambda: _counters().get("tcp_local") and _counters(), timeout=10)
    assert counters["tcp_local"] >= 1 and counters["tcp_remote"] == 0
