"""A hostile but fair app and neighbour, on the real engine: the sidecar and the agent stay up
and bounded.

A stand-in cluster: one container is its DNS (dnsmasq: `ok.test` is itself, where an HTTP server
listens on 8080; `*.never.test` is forwarded to an address that never answers; the rest is
NXDOMAIN) and a target container resolves with it. A project mirrors the target with
`docker://`. Everything carries the project's name (`cmhostile`) and is removed at the end.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, docker, exec_in, wait_for

PROJECT = "cmhostile"
IMAGE = "composemirror/sandbox:0.1"
NETWORK = f"{PROJECT}-cluster"
DNS = f"{PROJECT}-clusterdns"
TARGET = f"{PROJECT}-target"
APP = f"{PROJECT}-app-1"
SIDECAR = f"{PROJECT}-app-mirror-1"
AGENT = f"{PROJECT}-composemirror-agent-1"
LABEL = f"io.composemirror.test={PROJECT}"
OK_URL = "http://ok.test:8080/"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def mirrored(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stand-in cluster and the mirrored project, up; removed (by name) afterwards."""
    directory = tmp_path_factory.mktemp("hostile")
    compose_file = directory / "compose.yaml"
    try:
        _cluster()
        compose_file.write_text(
            json.dumps(
                {
                    "name": PROJECT,
                    "x-composemirror": {"target": f"docker://{TARGET}", "services": ["app"]},
                    "services": {
                        "app": {"image": IMAGE, "command": ["sleep", "infinity"], "init": True}
                    },
                }
            )
        )
        result = cli("-f", str(compose_file), "up", "-d")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(lambda: _fetch(APP) == "200", timeout=60)
        yield compose_file
    finally:
        cli("-f", str(compose_file), "down", "-v")
        docker("rm", "-f", TARGET, DNS)
        docker("network", "rm", NETWORK)


def _cluster() -> None:
    docker("rm", "-f", TARGET, DNS)
    docker("network", "rm", NETWORK)
    made = docker("network", "create", "--label", LABEL, NETWORK)
    assert made.returncode == 0, made.stderr
    script = (
        'ip=$(hostname -i | cut -d" " -f1); echo "$ip ok.test" > /tmp/cluster-hosts; '
        "python3 -m http.server 8080 --directory /tmp >/dev/null 2>&1 & "
        "exec dnsmasq --keep-in-foreground --log-facility=- --no-resolv --no-hosts "
        "--addn-hosts=/tmp/cluster-hosts --server=/never.test/192.0.2.1 --address=/#/"
    )
    started = docker(
        "run", "-d", "--name", DNS, "--label", LABEL, "--network", NETWORK,
        IMAGE, "sh", "-c", script,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    address = _address(DNS)
    started = docker(
        "run", "-d", "--init", "--name", TARGET, "--label", LABEL, "--network", NETWORK,
        "--dns", address, IMAGE, "sleep", "infinity",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    wait_for(lambda: _fetch(TARGET) == "200", timeout=30)


def _address(container: str) -> str:
    return docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
    ).stdout.strip()  # fmt: skip


def _fetch(container: str) -> str:
    result = exec_in(container, ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                                 OK_URL])  # fmt: skip
    return result.stdout.strip()


def _pid(container: str) -> int:
    return int(docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _files(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _python(container: str, script: str, timeout: float = 120) -> dict[str, object]:
    result = exec_in(container, ["python3", "-c", textwrap.dedent(script)], timeout=timeout)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def _running(container: str) -> tuple[bool, int]:
    state = docker("inspect", "-f", "{{.State.Running}} {{.RestartCount}}", container).stdout
    running, restarts = state.split()
    return running == "true", int(restarts)


# Fault 1: the app dials the transparent proxy's own port.


def test_the_app_cannot_make_the_proxy_dial_itself(mirrored: Path) -> None:
    pid = _pid(SIDECAR)
    before = _files(pid)
    started = time.monotonic()
    result = exec_in(APP, ["su", "nobody", "-s", "/bin/sh", "-c",
                           "curl -sS -m 10 http://127.0.0.1:15001/"])  # fmt: skip
    assert result.returncode in (7, 52, 56), result.stderr  # reset at once, not served
    assert time.monotonic() - started < 5
    time.sleep(3)  # the old proxy looped here until EMFILE, and the sidecar died
    assert _running(SIDECAR) == (True, 0)
    assert _pid(SIDECAR) == pid
    assert _files(pid) < before + 20
    assert _fetch(APP) == "200"  # the app still has its network, the cluster included
    report = json.loads(exec_in(SIDECAR, ["cat", "/run/composemirror-status.json"]).stdout)
    assert report["counters"]["tcp_refused"] >= 1


# Fault 5: connections to the agent that never authenticate.

SILENT = """
    import json, socket, time
    conns = []
    for _ in range({n}):
        s = socket.socket(socket.AF_UNIX)
        s.connect("/run/composemirror/agent.sock")
        s.recv(1024)  # the agent's HELLO; then say nothing
        conns.append(s)
    print("open", flush=True)
    started = time.monotonic()
    closed = []
    for s in conns:
        s.settimeout(max(0.01, 15 - (time.monotonic() - started)))
        try:
            if s.recv(1024) == b"":
                closed.append(time.monotonic() - started)
        except OSError:
            pass
    print(json.dumps({{"closed": len(closed), "last": max(closed, default=None)}}))
"""


def test_silent_connections_to_the_agent_are_dropped_and_cost_little(mirrored: Path) -> None:
    pid = _pid(AGENT)
    n = 300
    baseline = _rss(pid)
    with subprocess.Popen(
        ["docker", "exec", SIDECAR, "python3", "-c", textwrap.dedent(SILENT.format(n=n))],
        stdout=subprocess.PIPE,
        text=True,
    ) as silent:
        assert silent.stdout is not None
        assert silent.stdout.readline().strip() == "open"
        held = _rss(pid)  # all n connected, none authenticated
        out, _ = silent.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["closed"] == n  # the agent hung up on every one
    assert report["last"] < 5 + 3  # the handshake timeout (5 s), and some slack
    assert held - baseline < 40 * MIB, f"{(held - baseline) / MIB:.0f} MiB for {n} connections"
    assert _fetch(APP) == "200"


# Fault 6: a flood of lookups for names that never resolve.

FLOOD = """
    import json, random, socket, struct, time

    def query(name, ident):
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\\0\\0\\1\\0\\1"

    server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.connect((server, 53))
    flood.setblocking(False)
    sent, answers = {{}}, {{}}
    started = time.monotonic()
    normal = None
    for i in range({n}):
        ident = i % 65536
        flood.send(query(f"f{{i}}-{{random.random()}}.never.test", ident))
        sent[ident] = time.monotonic()
        if i % 100 == 99:
            time.sleep(0.1 * {seconds} * 1000 / {n})  # about {n} queries in {seconds} s
        if normal is None and time.monotonic() - started > {seconds} / 2:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probe.settimeout(5)
            asked = time.monotonic()
            probe.sendto(query("ok.test", 4242), (server, 53))
            try:
                reply = probe.recv(4096)
            except TimeoutError:
                reply = bytes([0, 0, 0, 255]) + bytes(8)  # no answer: rcode 15
            normal = {{"seconds": time.monotonic() - asked, "rcode": reply[3] & 15,
                       "answers": struct.unpack("!H", reply[6:8])[0]}}
        try:
            while True:
                reply = flood.recv(4096)
                ident = struct.unpack("!H", reply[:2])[0]
                answers.setdefault(ident, (reply[3] & 15, time.monotonic() - sent[ident]))
        except BlockingIOError:
            pass
    flood.settimeout(6)
    try:
        while len(answers) < len(sent):
            reply = flood.recv(4096)
            ident = struct.unpack("!H", reply[:2])[0]
            answers.setdefault(ident, (reply[3] & 15, time.monotonic() - sent[ident]))
    except OSError:
        pass
    fast_servfail = sum(1 for rcode, s in answers.values() if rcode == 2 and s < 1)
    print(json.dumps({{"sent": len(sent), "answered": len(answers),
                       "fast_servfail": fast_servfail, "normal": normal}}))
"""


def test_a_flood_of_unresolvable_names_is_capped_and_other_names_still_resolve(
    mirrored: Path,
) -> None:
    pid = _pid(AGENT)
    baseline_rss = _rss(pid)
    peak_files = 0
    with subprocess.Popen(
        [
            "docker",
            "exec",
            APP,
            "python3",
            "-c",
            textwrap.dedent(FLOOD.format(n=1500, seconds=1.5)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as flood:
        while flood.poll() is None:
            peak_files = max(peak_files, _files(pid))
            time.sleep(0.05)
        out, _ = flood.communicate(timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["normal"]["rcode"] == 0 and report["normal"]["answers"] >= 1
    assert report["normal"]["seconds"] < 1, report  # a normal remote lookup answers promptly
    # Beyond the cap the flood is SERVFAIL at once instead of waiting out the timeouts (UDP may
    # drop some queries on a busy machine; of those answered, most are SERVFAIL within 1 s).
    assert report["answered"] > report["sent"] // 2, report
    assert report["fast_servfail"] > 0.8 * report["answered"], report
    assert peak_files < 256 + 100, f"{peak_files} open files in the agent"
    assert _fetch(APP) == "200"  # remote TCP is not stalled
    time.sleep(10)  # the capped lookups time out (2 attempts of 5 s, from the flood on)
    assert _files(pid) < 100
    assert _rss(pid) - baseline_rss < 30 * MIB
