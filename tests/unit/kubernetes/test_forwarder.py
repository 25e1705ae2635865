"""The forwarder's supervision: what it runs, when it restarts, and that stopping it leaves no
process behind. The port-forward command is a small script here (the real kubectl against a
real cluster is exercised by tests/e2e/test_kubernetes_local_database.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from composemirror.backends.kubernetes import forwarder
from composemirror.backends.kubernetes.backend import forwarder_check
from composemirror.errors import ClusterError


def spec(kubectl: str = "/usr/bin/kubectl") -> forwarder.Spec:
    return forwarder.Spec(
        kubectl=kubectl,
        context="dev",
        namespace="shop",
        pod="checkout-1",
        remote_port=47017,
        address="172.17.0.1",
        local_port=41234,
    )


def script(tmp_path: Path, body: str) -> str:
    """An executable standing in for kubectl: it prints what kubectl prints, then `body`."""
    path = tmp_path / "kubectl"
    path.write_text(
        "#!/bin/sh\n"
        'echo "Forwarding from 172.17.0.1:41234 -> 47017"\n'
        'echo "Handling connection for 41234"\n' + body + "\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_it_forwards_from_the_gateway_address_only_with_the_same_context() -> None:
    assert spec().command() == [
        "/usr/bin/kubectl",
        "--context",
        "dev",
        "-n",
        "shop",
        "port-forward",
        "--address",
        "172.17.0.1",
        "pod/checkout-1",
        "41234:47017",
    ]
    assert spec().describe() == "172.17.0.1:41234 -> pod/checkout-1:47017 in namespace shop"


def test_kubectl_is_found_or_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    chosen = script(tmp_path, "exit 0")
    assert forwarder.find_kubectl({forwarder.KUBECTL_ENV: chosen}) == chosen
    assert forwarder.find_kubectl({"PATH": str(tmp_path)}) == chosen
    with pytest.raises(ClusterError) as missing:
        forwarder.find_kubectl({"PATH": str(tmp_path / "nothing")})
    assert "kubectl is not installed" in missing.value.message
    assert missing.value.hint == forwarder.INSTALL_HINT
    with pytest.raises(ClusterError, match="is not an executable"):
        forwarder.find_kubectl({forwarder.KUBECTL_ENV: str(tmp_path / "nothing")})
    with pytest.raises(ClusterError, match="does not run"):
        forwarder.kubectl_version(chosen)  # prints no version


def test_a_dropped_forward_is_restarted_with_bounded_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 6:
            supervisor.stop_now()

    supervisor = forwarder.Supervisor(
        spec(script(tmp_path, "echo 'lost connection to pod'; exit 1")), tmp_path, sleep=sleep
    )
    assert supervisor.run() == 0
    # Each run forwarded before it dropped: the delay starts again from the first one.
    assert sleeps == [forwarder.BACKOFF_FIRST] * 6
    state = json.loads((tmp_path / forwarder.STATE_FILE).read_text())
    assert state["state"] == "reconnecting" and state["restarts"] == 6
    assert "lost connection to pod" in state["error"]
    assert "Handling connection" not in state["error"]


def test_a_forward_that_never_starts_backs_off_then_gives_up(tmp_path: Path) -> None:
    never = tmp_path / "never"
    never.write_text(
        "#!/bin/sh\necho 'error: unable to upgrade connection: Unauthorized' >&2\nexit 1\n"
    )
    never.chmod(0o755)
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds + 30

    supervisor = forwarder.Supervisor(spec(str(never)), tmp_path, sleep=sleep, clock=lambda: now[0])
    assert supervisor.run() == 1
    assert sleeps[:5] == [0.2, 0.4, 0.8, 1.6, 2.0]
    assert max(sleeps) == forwarder.BACKOFF_MAX
    state = json.loads((tmp_path / forwarder.STATE_FILE).read_text())
    assert state["state"] == "failed" and "Unauthorized" in state["error"]


def test_start_waits_for_the_forward_and_stop_leaves_no_process(tmp_path: Path) -> None:
    directory = tmp_path / ".composemirror"
    state = forwarder.start(spec(script(tmp_path, "exec sleep 600")), directory, project="shop")
    supervisor, child = int(state["pid"]), int(state["kubectl_pid"])
    assert state["state"] == "forwarding"
    assert forwarder_check(directory).ok
    assert "pid" in forwarder_check(directory).detail
    assert forwarder.stop(directory) == [supervisor]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (alive(supervisor) or alive(child)):
        time.sleep(0.05)
    assert not alive(supervisor) and not alive(child)
    assert forwarder.stop(directory, project="shop") == []  # idempotent
    assert forwarder_check(directory).detail.startswith("not running")


def test_a_forward_that_cannot_start_fails_with_kubectls_words(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'error: unable to listen on any of the requested ports'\n")
    broken.chmod(0o755)
    with pytest.raises(ClusterError) as failed:
        forwarder.start(spec(str(broken)), tmp_path / ".composemirror", project="x", timeout=1.5)
    assert "did not start" in failed.value.message
    assert "unable to listen" in failed.value.message
    assert forwarder.read_state(tmp_path / ".composemirror") is None


def test_a_dead_forwarder_is_reported_with_what_to_do(tmp_path: Path) -> None:
    record = {"pid": 2**22 + 1, "state": "forwarding", "forwards": "x", "error": None}
    (tmp_path / forwarder.STATE_FILE).write_text(json.dumps(record))
    check = forwarder_check(tmp_path)
    assert not check.ok and check.detail.startswith("exited")
    assert check.hint is not None and "up -d" in check.hint
    assert forwarder.stop(tmp_path) == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_interrupted_start_leaves_no_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = real_popen(["sleep", "60"], start_new_session=True)
        started.append(process)
        return process

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(time, "sleep", interrupt)
    spec = forwarder.Spec(
        kubectl="kubectl",
        context="c",
        namespace="n",
        pod="p",
        address="127.0.0.1",
        local_port=1,
        remote_port=2,
    )
    with pytest.raises(KeyboardInterrupt):
        forwarder.start(spec, tmp_path, project="x")
    (process,) = started
    monkeypatch.undo()
    assert process.wait(timeout=5) is not None  # signalled: ended, not left running


def test_a_projects_forwarder_is_found_by_its_command_line_and_only_its_own(
    tmp_path: Path,
) -> None:
    """Two projects started from one directory: each has its own forwarder; stopping one
    (even with its state folder deleted) leaves the other running."""
    kubectl = script(tmp_path, "exec sleep 600")
    first = forwarder.start(spec(kubectl), tmp_path / "shop-a", project="shop-a")
    second = forwarder.start(spec(kubectl), tmp_path / "shop-b", project="shop-b")
    try:
        assert forwarder.find("shop-a") == [first["pid"]]
        assert forwarder.stop(tmp_path / "unused", project="unused") == []
        assert alive(first["pid"]) and alive(second["pid"])
        (tmp_path / "shop-a" / forwarder.STATE_FILE).unlink()  # its state is gone
        assert forwarder.stop(tmp_path / "shop-a", project="shop-a") == [first["pid"]]
        wait_gone(first["pid"], first["kubectl_pid"])
        assert alive(second["pid"]) and forwarder.find("shop-b") == [second["pid"]]
    finally:
        forwarder.stop(tmp_path / "shop-b", project="shop-b")
    wait_gone(second["pid"], second["kubectl_pid"])


def wait_gone(*pids: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_a_gone_pod_stops_the_retries_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kubectl forwarded, lost the pod, and the API server now says it does not exist: no
    restart can reach that agent, so the supervisor says why and exits at once."""
    gone = tmp_path / "gone"
    gone.write_text(
        "#!/bin/sh\n"
        "echo 'E1201 lost connection to pod'\n"
        "echo 'Error from server (NotFound): pods \"checkout-1\" not found' >&2\n"
        "exit 1\n"
    )
    gone.chmod(0o755)
    sleeps: list[float] = []
    supervisor = forwarder.Supervisor(spec(str(gone)), tmp_path, sleep=sleeps.append)
    assert supervisor.run() == 1
    assert sleeps == []  # no retry
    state = json.loads((tmp_path / forwarder.STATE_FILE).read_text())
    assert state["state"] == "failed" and state["pod_gone"] is True
    assert "pod checkout-1 in namespace shop is gone" in state["error"]
    assert "composemirror up" in state["error"]
    assert any("is gone" in r.getMessage() for r in caplog.records)  # the forwarder's log
    state["pid"] = os.getpid()  # as `status` sees it while the process lingers, or after
    (tmp_path / forwarder.STATE_FILE).write_text(json.dumps(state))
    check = forwarder_check(tmp_path)
    assert not check.ok and "is gone" in check.detail


REFUSED = (
    'echo "E1201 08:01:02 portforward.go:424 an error occurred forwarding 41234 -> 47017: '
    "error forwarding port 47017 to pod 9f1, uid : failed to connect to localhost:47017 inside "
    'namespace 9f1: connect: connection refused"\n'
    'echo "error: lost connection to pod"\n'
    "exit 1"
)


def test_a_forward_that_kubectl_leaves_at_each_connection_is_restarting(tmp_path: Path) -> None:
    """The pod terminating: kubectl says `Forwarding from`, then exits at the first connection
    (the pod's port refuses). The forwarder is `forwarding` again between drops, yet `status`
    and `doctor` fail it with kubectl's last error, not `forwarding (N restarts)`."""
    count = tmp_path / "count"
    body = (
        f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n"
        f'if [ "$n" -lt 3 ]; then\n{REFUSED}\nfi\nexec sleep 30'
    )
    supervisor = forwarder.Supervisor(spec(script(tmp_path, body)), tmp_path, sleep=lambda s: None)
    runner = threading.Thread(target=supervisor.run)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = forwarder.read_state(tmp_path) or {}
            if state.get("state") == "forwarding" and len(state.get("drops") or []) == 3:
                break
            time.sleep(0.05)
        assert state["state"] == "forwarding" and state["restarts"] == 3
        check = forwarder_check(tmp_path)
    finally:
        supervisor.stop_now()
        runner.join(10)
    assert not check.ok
    assert check.detail.startswith("restarting: E1201")
    assert "connect: connection refused" in check.detail
    assert "lost connection to pod" in check.detail
    assert "exited 3 times in the last 60 s" in check.detail
    assert check.hint is not None and "up -d" in check.hint


def test_one_drop_a_while_ago_is_not_a_failure(tmp_path: Path) -> None:
    now = time.time()
    record = {
        "pid": os.getpid(),
        "state": "forwarding",
        "forwards": "x",
        "restarts": 2,
        "drops": [now - 600, now - 5],
        "last_error": "error: lost connection to pod",
    }
    (tmp_path / forwarder.STATE_FILE).write_text(json.dumps(record))
    check = forwarder_check(tmp_path, now=now)
    assert check.ok and check.detail.startswith("forwarding (")
    record["drops"] = [now - 30, now - 5]  # two within the window
    (tmp_path / forwarder.STATE_FILE).write_text(json.dumps(record))
    assert not forwarder_check(tmp_path, now=now).ok


def test_no_forwarder_while_the_projects_sidecars_run_is_a_failure(tmp_path: Path) -> None:
    """A failed `up -d` released the forwarder; the containers of the project still run."""
    check = forwarder_check(tmp_path, sidecars=["web-mirror", "worker-mirror"])
    assert not check.ok
    assert check.detail == (
        "not running, while the project's sidecars web-mirror, worker-mirror run and dial it: "
        "their link to the agent is down"
    )
    assert check.hint is not None and "`composemirror up -d`" in check.hint
    assert "`composemirror down`, then `composemirror up -d`" in check.hint
    idle = forwarder_check(tmp_path)  # nothing of the project runs: nothing dials it
    assert idle.ok and idle.detail == "not running (no `up` holds a session)"
