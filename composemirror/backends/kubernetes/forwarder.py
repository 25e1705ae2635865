"""The host-side forwarder: a supervised `kubectl port-forward` from the Docker host gateway to
the agent in its pod, restarted with bounded backoff whenever it drops.

`start()` launches the supervisor (this module run as a program) in a session of its own, waits
until kubectl forwards, and returns; the supervisor's state file in the project's session folder
(see `state`) records its pid and what it forwards (`read_state()` for `status` and `doctor`);
`stop()` ends it, and kubectl dies with it (PR_SET_PDEATHSIG), so no process outlives it. Its
command line names its project (`--project NAME`), so `stop()` also finds it with no state file.
When the agent's pod is gone (deleted, replaced by a rollout) it says so and exits: no restart
can reach an agent that no longer exists. It listens on one address,
the host gateway that compose's `host-gateway` names, never on every address; the tunnel's key
authentication runs end to end through it. It never imports the kubernetes client.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from composemirror.backends.kubernetes import state as session_state
from composemirror.errors import ClusterError

log = logging.getLogger(__name__)

KUBECTL_ENV = "COMPOSEMIRROR_KUBECTL"
"""The kubectl to use; otherwise `kubectl` on PATH."""
STATE_FILE = "forwarder.json"
LOG_FILE = "forwarder.log"
INSTALL_HINT = (
    "install kubectl (https://kubernetes.io/docs/tasks/tools/, or `apt-get install kubectl` from "
    "the Kubernetes apt repository) or set COMPOSEMIRROR_KUBECTL to its path"
)
BACKOFF_FIRST = 0.2
"""Seconds before the first restart of a dropped port-forward; doubled each time it drops
again without having forwarded, up to BACKOFF_MAX."""
BACKOFF_MAX = 2.0
GIVE_UP_AFTER = 300.0
"""Seconds of restarts that never reached a forwarding state before the supervisor exits."""
DROPS_KEPT = 20
"""How many of kubectl's latest exits the state file lists (`drops`, Unix times)."""
POD_GONE = re.compile(r'(pods|namespaces) "([^"]+)" not found')
"""kubectl's words (the API server's NotFound) when the pod or its namespace is gone."""
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1
MODULE = "composemirror.backends.kubernetes.forwarder"


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """What one forwarder forwards: `address`:`local_port` on this host to `pod`:`remote_port`."""

    kubectl: str
    context: str
    namespace: str
    pod: str
    remote_port: int
    address: str
    """The host address it listens on (the Docker host gateway)."""
    local_port: int

    def command(self) -> list[str]:
        """kubectl's argv: the same kube config (KUBECONFIG is inherited) and context."""
        return [
            self.kubectl,
            "--context",
            self.context,
            "-n",
            self.namespace,
            "port-forward",
            "--address",
            self.address,
            f"pod/{self.pod}",
            f"{self.local_port}:{self.remote_port}",
        ]

    def describe(self) -> str:
        return (
            f"{self.address}:{self.local_port} -> pod/{self.pod}:{self.remote_port} "
            f"in namespace {self.namespace}"
        )


def find_kubectl(environ: Mapping[str, str] | None = None) -> str:
    """The kubectl to run: $COMPOSEMIRROR_KUBECTL, else kubectl on PATH. Raises ClusterError."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(KUBECTL_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ClusterError(f"{KUBECTL_ENV}={chosen} is not an executable", hint=INSTALL_HINT)
        return chosen
    found = shutil.which("kubectl", path=environ.get("PATH"))
    if found is None:
        raise ClusterError(
            "kubectl is not installed: composemirror holds the port-forward to its agent with it",
            hint=INSTALL_HINT,
        )
    return found


def kubectl_version(kubectl: str) -> str:
    """kubectl's client version, e.g. `v1.34.4`. Raises ClusterError when it does not run."""
    try:
        done = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return str(json.loads(done.stdout)["clientVersion"]["gitVersion"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        raise ClusterError(f"{kubectl} does not run: {e}", hint=INSTALL_HINT) from e


def read_state(directory: Path) -> dict[str, Any] | None:
    """The forwarder's state file in `directory` (`.composemirror/`), with `alive` added (its
    process still runs), or None when there is none."""
    path = directory / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    state["alive"] = _alive(int(state.get("pid", 0)))
    return state


def start(
    spec: Spec, directory: Path, *, project: str, timeout: float = START_TIMEOUT
) -> dict[str, Any]:
    """Start the supervisor of `project` for `spec`, recorded in `directory` (the project's
    session folder); return its state once kubectl forwards. Stops the project's earlier
    forwarder first. Stops what it started and raises ClusterError when kubectl does not forward
    within `timeout` seconds (with kubectl's last words)."""
    stop(directory, project=project)
    session_state.ensure(directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    with open(directory / LOG_FILE, "ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                MODULE,
                "--project",
                project,
                json.dumps(asdict(spec)),
                str(directory),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # Ctrl-C in the terminal is for compose; `stop` ends it
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            state = read_state(directory)
            if state and state.get("state") == "forwarding":
                return state
            if process.poll() is not None:
                break
            time.sleep(0.1)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) before it was recorded as forwarding: `stop` may not find
        # it yet, so its process group (kubectl dies with it) is ended here.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        _reap(process)
        raise
    last = (read_state(directory) or {}).get("error")
    stop(directory, project=project)
    _reap(process)
    raise ClusterError(
        f"the port-forward to the agent did not start ({spec.describe()})"
        + (f": {last}" if last else ""),
        hint=f"see {directory / LOG_FILE}; `composemirror doctor` checks kubectl and access",
    )


def stop(
    directory: Path, *, project: str | None = None, timeout: float = STOP_TIMEOUT
) -> list[int]:
    """Stop the forwarder recorded in `directory` and, with `project`, every other forwarder
    process of that project (found by its command line: a state folder deleted or moved); the
    pids stopped, each with its kubectl.

    SIGTERM to each process group, then SIGKILL after `timeout` seconds. Idempotent; a pid that
    no longer belongs to a forwarder (a stale record) is left alone.
    """
    state = read_state(directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    pids = []
    if state is not None and state["alive"] and _is_forwarder(int(state["pid"])):
        pids.append(int(state["pid"]))
    if project is not None:
        pids += [pid for pid in find(project) if pid not in pids]
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)
    return pids


def find(project: str) -> list[int]:
    """The pids of this user's forwarder supervisors for `project`, by their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if _names(argv, project):
            found.append(int(entry.name))
    return sorted(found)


class Supervisor:
    """Runs kubectl port-forward for `spec` until stopped, restarting it when it exits.

    `state` is written to `directory/forwarder.json` at each change: `starting`, `forwarding`
    (kubectl said so), `reconnecting` (with the error and the restart count), and `failed`
    (given up, or `pod_gone`: the API server says the agent's pod or namespace no longer
    exists). Every record also keeps `drops`, the Unix times of kubectl's latest exits (at
    most DROPS_KEPT), and `last_error`, kubectl's last words before the latest one, so a
    `forwarding` that kubectl leaves at each connection (it exits when the pod's port refuses,
    e.g. while the pod terminates) shows as failing. kubectl's output is read line by line and
    only the last lines are kept (bounded).
    """

    def __init__(
        self,
        spec: Spec,
        directory: Path,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.directory = directory
        self.sleep = sleep
        self.clock = clock
        self.stopping = False
        self.child: subprocess.Popen[str] | None = None
        self.restarts = 0
        self.last: collections.deque[str] = collections.deque(maxlen=5)
        self.gone: str | None = None
        """What kubectl said is gone (`pods "NAME"`), once it has said so."""
        self.drops: collections.deque[float] = collections.deque(maxlen=DROPS_KEPT)
        self.last_error: str | None = None
        self.said: collections.deque[str] = collections.deque(maxlen=5)
        """The latest run's last lines, bar `Forwarding from` (what made it end)."""

    def run(self) -> int:
        """Supervise until `stop_now()` (0), the agent's pod is gone or GIVE_UP_AFTER seconds
        passed without forwarding (1)."""
        delay = BACKOFF_FIRST
        failing_since = self.clock()
        self.write("starting")
        while not self.stopping:
            forwarded = self.run_once()
            if self.stopping:
                break
            self.drops.append(time.time())
            self.last_error = "; ".join(self.said)
            if self.gone is not None:
                error = (
                    f"the agent's pod {self.spec.pod} in namespace {self.spec.namespace} is "
                    f"gone (the API server says {self.gone} not found): it was deleted or "
                    "replaced (a rollout, an eviction); run `composemirror up` again to place "
                    "an agent in the current pod"
                )
                log.error("%s", error)
                self.write("failed", error=error, pod_gone=True)
                return 1
            now = self.clock()
            if forwarded:
                delay, failing_since = BACKOFF_FIRST, now
            elif now - failing_since > GIVE_UP_AFTER:
                self.write("failed", error=self.error())
                return 1
            self.restarts += 1
            self.write("reconnecting", error=self.error())
            log.warning("port-forward ended (%s); again in %.1f s", self.error(), delay)
            self.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        return 0

    def run_once(self) -> bool:
        """One kubectl run, to its end; whether it reached `Forwarding from`."""
        forwarded = False
        self.said.clear()
        self.child = subprocess.Popen(
            self.spec.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        assert self.child.stdout is not None
        for line in self.child.stdout:
            line = line.strip()
            if line.startswith("Handling connection"):
                continue
            self.last.append(line)
            if not line.startswith("Forwarding from"):
                self.said.append(line)
            gone = POD_GONE.search(line)
            if gone is not None:
                self.gone = f'{gone.group(1)} "{gone.group(2)}"'
            if line.startswith("Forwarding from") and not forwarded:
                forwarded = True
                self.write("forwarding")
        self.child.wait()
        self.last.append(f"kubectl exited with {self.child.returncode}")
        self.said.append(f"kubectl exited with {self.child.returncode}")
        return forwarded

    def stop_now(self, *_: Any) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()

    def error(self) -> str:
        return "; ".join(self.last)

    def write(self, state: str, *, error: str | None = None, pod_gone: bool = False) -> None:
        record = {
            "pid": os.getpid(),
            "kubectl_pid": self.child.pid if self.child else None,
            "state": state,
            "since": time.time(),
            "restarts": self.restarts,
            "error": error,
            "pod_gone": pod_gone,
            "drops": list(self.drops),
            "last_error": self.last_error,
            "forwards": self.spec.describe(),
            "spec": asdict(self.spec),
        }
        path = self.directory / STATE_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m composemirror.backends.kubernetes.forwarder --project NAME SPEC_JSON DIRECTORY`
    (the project only labels the process, for `stop` and `find`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--project"]:
        args = args[2:]
    logging.basicConfig(level=logging.INFO, format="forwarder %(levelname)s %(message)s")
    supervisor = Supervisor(Spec(**json.loads(args[0])), Path(args[1]))
    signal.signal(signal.SIGTERM, supervisor.stop_now)
    signal.signal(signal.SIGINT, supervisor.stop_now)
    return supervisor.run()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) forwards nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_forwarder(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return MODULE.encode() in command.split(b"\0")


def _names(argv: Sequence[bytes], project: str) -> bool:
    """Whether `argv` is a forwarder supervisor's command line for `project`."""
    if MODULE.encode() not in argv or b"--project" not in argv:
        return False
    at = argv.index(b"--project")
    return argv[at + 1 : at + 2] == [project.encode()]


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    sys.exit(main())
