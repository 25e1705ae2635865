"""The benchmarks' imperative shell: the only module that runs docker, compose and composemirror.

`Lab.open()` builds the load generator, makes sure the sandbox cluster and the images are there,
and on the way out removes everything the suite started, even after a failure: its own containers
(labelled `io.composemirror.bench`), the benchmark project, the reference project (`--against`),
and the sandbox if it started it. It measures nothing itself; `suite` decides what to run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from benchmarks.report import Machine, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
PROJECT_FILE = HERE / "project" / "compose.yaml"
PROJECT = "cm-bench"
REFERENCE_PROJECT = "cm-bench-ref"
"""The same project run by another commit's composemirror (`--against`)."""
LABEL = "io.composemirror.bench"
"""On every container the suite starts itself (servers, the direct client)."""
CLIENT_IMAGE = "composemirror-bench/client:0.1"
BASE_ENV = "COMPOSEMIRROR_BASE_IMAGE"
LOCAL_BASE = "composemirror/base:bookworm"
PUBLIC_BASE = "debian:bookworm-slim"

SANDBOX_NETWORK = "composemirror-sandbox"
SANDBOX_TARGET = "composemirror-sandbox-checkout"
SERVER_IP = "10.96.7.50"
"""The benchmark server: on the sandbox network, reached by the agent as a cluster address."""
DIRECT_IP = "10.96.7.51"
"""The baseline client: on the same bridge as the server."""
TARGET = "cm-bench-target"
TARGET_IP = "10.96.7.52"
"""With `own_target`, the agent joins this container of the suite's (`docker://`) instead of
the sandbox's checkout: the same path for the bytes, and the sandbox's workloads are neither
needed nor started."""
TARGET_ENV = "COMPOSEMIRROR_BENCH_TARGET"
SINK_PORT, SOURCE_PORT, ECHO_PORT = 5001, 5002, 5003
LOADGEN = "/usr/local/bin/loadgen"
STATUS_FILE = "/run/composemirror-status.json"
SAMPLE_INTERVAL = 0.2


class BenchError(Exception):
    """A step of the suite failed; the message says which and what to do."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; with `check`, a failure is a BenchError naming it."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    except FileNotFoundError as e:
        raise BenchError(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"`{' '.join(argv)}` did not finish in {timeout:g} s") from e
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise BenchError(
            f"`{' '.join(argv)}` failed (exit {result.returncode}):\n  " + "\n  ".join(output)
        )
    return result


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, check=check)


def wait_until(what: str, check: Callable[[], T], *, timeout: float, interval: float = 0.25) -> T:
    """Poll `check()` until it returns something truthy; BenchError after `timeout` seconds."""
    retrying = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_fixed(interval),
        retry=retry_if_result(lambda value: not value),
    )
    try:
        return retrying(check)
    except RetryError as e:
        raise BenchError(f"gave up after {timeout:g} s waiting for {what}") from e


def base_image() -> str:
    """The base the project's images build on, as composemirror chooses it."""
    chosen = os.environ.get(BASE_ENV)
    if chosen:
        return chosen
    if docker("image", "inspect", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    return PUBLIC_BASE


def composemirror_command() -> list[str]:
    """The composemirror CLI of this interpreter's environment, as a user runs it."""
    script = Path(sys.executable).parent / "composemirror"
    return [str(script)] if script.exists() else [sys.executable, "-m", "composemirror"]


def build_loadgen(directory: Path) -> Path:
    """benchmarks/loadgen.c as a static binary: it runs in any container, whatever its libc."""
    if shutil.which("musl-gcc") is None:
        raise BenchError(
            "musl-gcc is missing (it builds the static load generator): "
            "run scripts/setup, or apt-get install musl-tools"
        )
    binary = directory / "loadgen"
    run(["musl-gcc", "-static", "-O2", "-pthread", "-o", str(binary), str(HERE / "loadgen.c")])
    return binary


class Probe:
    """Resident memory and CPU time of PID 1 of one container.

    Read from the host's /proc when the engine runs here (cheap, nothing runs in the container),
    otherwise with `docker exec`.
    """

    def __init__(self, container: str) -> None:
        self.container = container
        pid = docker("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
        self.host = Path(f"/proc/{pid}")
        try:
            nspid = next(
                line
                for line in (self.host / "status").read_text().splitlines()
                if line.startswith("NSpid:")
            )
            self.local = nspid.split()[-1] == "1"
        except (OSError, StopIteration):
            self.local = False
        self.ticks = os.sysconf("SC_CLK_TCK")

    def _read(self, name: str) -> str:
        if self.local:
            with suppress(OSError):
                return (self.host / name).read_text()
        return docker("exec", self.container, "cat", f"/proc/1/{name}", timeout=30).stdout

    def rss(self) -> int:
        """VmRSS in bytes."""
        for line in self._read("status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no VmRSS for PID 1 of {self.container}")

    def cpu(self) -> float:
        """User + system CPU seconds so far."""
        fields = self._read("stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores so far, from /proc/stat; zeros when unreadable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0, 0.0
    ticks = [int(value) for value in fields[:8]]
    idle = ticks[3] + ticks[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class Monitor:
    """Samples the sidecar's and the agent's memory and CPU while a load runs."""

    def __init__(self, probes: Mapping[str, Probe]) -> None:
        self.probes = dict(probes)
        self.usage: dict[str, Usage] = {}
        self.local = bool(probes) and all(probe.local for probe in probes.values())
        """The engine runs on this machine: its /proc/stat tells how busy the engine's CPUs are."""

    def host_cpu(self) -> tuple[float, float]:
        return host_cpu() if self.local else (0.0, 0.0)

    def snapshot(self) -> dict[str, int]:
        return {role: probe.rss() for role, probe in self.probes.items()}

    @contextmanager
    def watch(self, load: str) -> Iterator[None]:
        """Record peak RSS and CPU time of each probe while the block runs, under `load`."""
        peaks = self.snapshot()
        cpu_before = {role: probe.cpu() for role, probe in self.probes.items()}
        host_before = self.host_cpu()
        started = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_INTERVAL):
                for role, probe in self.probes.items():
                    with suppress(BenchError, OSError, ValueError):
                        peaks[role] = max(peaks[role], probe.rss())

        sampler = threading.Thread(target=sample, name=f"monitor-{load}", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            wall = time.monotonic() - started
            for role, value in self.snapshot().items():
                peaks[role] = max(peaks[role], value)
            cpu = {role: probe.cpu() - cpu_before[role] for role, probe in self.probes.items()}
            host_after = self.host_cpu()
            host = (host_after[0] - host_before[0], host_after[1] - host_before[1])
            self.usage.setdefault(load, Usage()).add(peaks, cpu, wall, host)


class Reference:
    """composemirror as of another commit, to measure beside this checkout (`--against REF`).

    `git archive` extracts the commit's package into a temporary directory; its CLI runs with this
    interpreter and that package first on PYTHONPATH, so it builds and runs its own sidecar and
    agent images (their tags hash their code). Its project is a copy of this checkout's in that
    directory, named REFERENCE_PROJECT, so that neither `up` nor `down` touches the other's
    rendered files or containers.
    """

    def __init__(self, ref: str, directory: Path, env: Mapping[str, str]) -> None:
        self.ref = ref
        self.directory = directory
        self.project_file = directory / "benchmarks" / "project" / "compose.yaml"
        self.env = {**env, "PYTHONPATH": str(directory)}

    @classmethod
    @contextmanager
    def extract(cls, ref: str, env: Mapping[str, str]) -> Iterator[Reference]:
        """The commit's code in a temporary directory, removed on the way out."""
        commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"])
        with tempfile.TemporaryDirectory(prefix="composemirror-bench-ref-") as directory:
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", ref, "composemirror"],
                capture_output=True,
                check=False,
            )
            if archive.returncode != 0:
                raise BenchError(f"--against {ref}: {archive.stderr.decode().strip()}")
            subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
            for part in ("project", "client"):
                shutil.copytree(
                    HERE / part,
                    Path(directory) / "benchmarks" / part,
                    ignore=shutil.ignore_patterns(".composemirror"),
                )
            yield cls(commit.stdout.strip(), Path(directory), env)

    def composemirror(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The commit's `composemirror -f COPY -p REFERENCE_PROJECT ARGS`."""
        return run(
            [
                sys.executable,
                "-m",
                "composemirror",
                "-f",
                str(self.project_file),
                "-p",
                REFERENCE_PROJECT,
                *args,
            ],
            timeout=timeout,
            check=check,
            env=self.env,
            # `python -m` puts the working directory first on sys.path: not this checkout's.
            cwd=self.directory,
        )

    def check(self) -> None:
        """BenchError unless the commit's CLI runs the commit's code (not this checkout's)."""
        found = run(
            [sys.executable, "-c", "import composemirror; print(composemirror.__file__)"],
            env=self.env,
            cwd=self.directory,
        ).stdout.strip()
        if not found.startswith(str(self.directory)):
            raise BenchError(
                f"--against {self.ref}: its composemirror is not the one run ({found})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirrored:
    """A running mirrored app of the benchmark project: the app, its sidecar, the agent."""

    app: str
    """The mirrored app `client`: its traffic goes through the sidecar."""
    sidecar: str
    agent: str
    label: str
    """What the tables call it: `composemirror`, or the commit it was run against."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stack:
    """The running benchmark project and the suite's own containers, by name."""

    app: str
    """The mirrored app `client`: its traffic goes through the sidecar."""
    peer: str
    """`peer`, a plain compose service: Docker's own DNS, without a sidecar."""
    sidecar: str
    agent: str
    server: str
    direct: str
    """The baseline client, on the server's bridge."""
    reference: Mirrored | None = None
    """The same app run by the `--against` commit's composemirror, when asked for."""

    @property
    def mirrored(self) -> Mirrored:
        """This checkout's app, sidecar and agent."""
        return Mirrored(app=self.app, sidecar=self.sidecar, agent=self.agent, label="composemirror")


class Lab:
    """What the benchmarks run on; see the module docstring."""

    def __init__(self, loadgen: Path, base: str, *, own_target: bool = False) -> None:
        self.loadgen_binary = loadgen
        self.base = base
        self.env = {**os.environ, BASE_ENV: base}
        self.own_target = own_target
        if own_target:
            self.env[TARGET_ENV] = f"docker://{TARGET}"
        self.started_sandbox = False
        self.stack: Stack | None = None
        self.monitor = Monitor({})
        self.reference: Reference | None = None
        self.reference_probes: dict[str, Probe] = {}
        """Role -> probe of the reference's sidecar and agent (CPU per byte moved)."""

    @classmethod
    @contextmanager
    def open(cls, against: str | None = None, *, own_target: bool = False) -> Iterator[Lab]:
        """Prepare everything the benchmarks share; remove what the suite started at the end.

        With `against` (a git commit), `up` also starts the project with that commit's
        composemirror (see `Reference`); BenchError if git cannot extract it. With
        `own_target`, the agents join a container of the suite's (see TARGET).
        """
        if docker("info", check=False, timeout=30).returncode != 0:
            raise BenchError("no Docker engine answers: run scripts/setup (or start dockerd)")
        with (
            ExitStack() as stack,
            tempfile.TemporaryDirectory(prefix="composemirror-bench-") as workdir,
        ):
            lab = cls(build_loadgen(Path(workdir)), base_image(), own_target=own_target)
            if against is not None:
                lab.reference = stack.enter_context(Reference.extract(against, lab.env))
            try:
                lab._prepare()
                yield lab
            finally:
                lab._clean_up()

    # -- commands ------------------------------------------------------------------------------

    def composemirror(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`composemirror -f benchmarks/project/compose.yaml ARGS`."""
        return run(
            [*composemirror_command(), "-f", str(PROJECT_FILE), *args],
            timeout=timeout,
            check=check,
            env=self.env,
        )

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Plain `docker compose -f benchmarks/project/compose.yaml ARGS`."""
        return run(
            ["docker", "compose", "-f", str(PROJECT_FILE), *args],
            timeout=timeout,
            check=check,
            env=self.env,
        )

    def loadgen(self, container: str, *args: object, timeout: float = 120) -> dict[str, Any]:
        """Run the load generator in `container`; its JSON report."""
        result = docker("exec", container, LOADGEN, *map(str, args), timeout=timeout)
        try:
            report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as e:
            raise BenchError(
                f"loadgen {args[0]} in {container} printed no report: "
                f"{result.stdout!r} {result.stderr!r}"
            ) from e
        return report

    def await_link(self, sidecar: str | None = None) -> None:
        """Wait until a sidecar's tunnel to its agent is up (after a drop it reconnects);
        this checkout's sidecar unless another is named."""
        assert self.stack is not None
        sidecar = sidecar or self.stack.sidecar
        wait_until(
            "the sidecar's link to the agent",
            lambda: self._link(sidecar) == "connected",
            timeout=60,
        )

    def nameserver(self, container: str) -> str:
        """The first nameserver of the container's resolv.conf: where its resolver asks."""
        text = docker("exec", container, "cat", "/etc/resolv.conf").stdout
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["nameserver"] and len(words) > 1:
                return words[1]
        raise BenchError(f"{container} has no nameserver in /etc/resolv.conf")

    # -- the benchmark project -------------------------------------------------------------

    def up(self) -> Stack:
        """`composemirror up -d` the project, start the servers, wait until the tunnel works."""
        log.info("starting the benchmark project with composemirror")
        self.composemirror("up", "-d")
        app = self._container(
            f"com.docker.compose.project={PROJECT}", "com.docker.compose.service=client"
        )
        peer = self._container(
            f"com.docker.compose.project={PROJECT}", "com.docker.compose.service=peer"
        )
        sidecar = self._container(
            f"io.composemirror.project={PROJECT}", "io.composemirror.role=sidecar"
        )
        agent = self._container(
            f"io.composemirror.project={PROJECT}", "io.composemirror.role=agent"
        )
        server = self._start("cm-bench-server", SERVER_IP, [LOADGEN, "serve"])
        direct = self._start("cm-bench-direct", DIRECT_IP, ["sleep", "infinity"])
        for container in (app, peer):
            docker("cp", str(self.loadgen_binary), f"{container}:{LOADGEN}")
        wait_until(
            "the sidecar's link to the agent",
            lambda: self._link(sidecar) == "connected",
            timeout=60,
        )
        reference = self._up_reference() if self.reference is not None else None
        stack = Stack(
            app=app,
            peer=peer,
            sidecar=sidecar,
            agent=agent,
            server=server,
            direct=direct,
            reference=reference,
        )
        wait_until("the benchmark server", lambda: self._answers(stack), timeout=30)
        self.stack = stack
        self.monitor = Monitor({"sidecar": Probe(sidecar), "agent": Probe(agent)})
        return stack

    def _up_reference(self) -> Mirrored:
        """The project again, run by the reference commit's composemirror."""
        assert self.reference is not None
        self.reference.check()
        log.info("starting the benchmark project with composemirror %s", self.reference.ref)
        self.reference.composemirror("up", "-d")
        app = self._container(
            f"com.docker.compose.project={REFERENCE_PROJECT}", "com.docker.compose.service=client"
        )
        sidecar = self._container(
            f"io.composemirror.project={REFERENCE_PROJECT}", "io.composemirror.role=sidecar"
        )
        agent = self._container(
            f"io.composemirror.project={REFERENCE_PROJECT}", "io.composemirror.role=agent"
        )
        docker("cp", str(self.loadgen_binary), f"{app}:{LOADGEN}")
        wait_until(
            f"the {self.reference.ref} sidecar's link to the agent",
            lambda: self._link(sidecar) == "connected",
            timeout=60,
        )
        self.reference_probes = {"sidecar": Probe(sidecar), "agent": Probe(agent)}
        return Mirrored(app=app, sidecar=sidecar, agent=agent, label=self.reference.ref)

    def cpu_of(self, mirrored: Mirrored) -> float:
        """CPU seconds the sidecar and the agent of `mirrored` have used so far, together."""
        assert self.stack is not None
        probes = (
            self.reference_probes if mirrored.sidecar != self.stack.sidecar else self.monitor.probes
        )
        return sum(probe.cpu() for probe in probes.values())

    def _container(self, *labels: str) -> str:
        filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
        names = docker("ps", *filters, "--format", "{{.Names}}").stdout.split()
        if len(names) != 1:
            raise BenchError(
                f"expected one running container labelled {', '.join(labels)}, "
                f"found {names or 'none'}"
            )
        return names[0]

    def _start(self, name: str, ip: str, command: Sequence[str]) -> str:
        """A container of the suite's on the sandbox network at `ip`, with the load generator."""
        docker(
            "create",
            "--name",
            name,
            "--label",
            f"{LABEL}={PROJECT}",
            # The image was built by compose, whose labels it carries: this is no service of it.
            "--label",
            "com.docker.compose.project=",
            "--label",
            "com.docker.compose.service=",
            "--init",
            "--network",
            SANDBOX_NETWORK,
            "--ip",
            ip,
            CLIENT_IMAGE,
            *command,
        )
        docker("cp", str(self.loadgen_binary), f"{name}:{LOADGEN}")
        docker("start", name)
        return name

    def _link(self, sidecar: str) -> str | None:
        result = docker("exec", sidecar, "cat", STATUS_FILE, check=False)
        if result.returncode != 0:
            return None
        state: str | None = json.loads(result.stdout).get("agent")
        return state

    def _answers(self, stack: Stack) -> bool:
        """Every path reaches the server's echo port."""
        containers = [stack.direct, stack.app]
        if stack.reference is not None:
            containers.append(stack.reference.app)
        for container in containers:
            result = docker(
                "exec",
                container,
                LOADGEN,
                "latency",
                SERVER_IP,
                str(ECHO_PORT),
                "3",
                "0",
                "64",
                check=False,
                timeout=60,
            )
            if result.returncode != 0 or '"errors": 0' not in result.stdout:
                return False
        return True

    # -- set-up and clean-up -------------------------------------------------------------------

    def _prepare(self) -> None:
        if (
            self.own_target
            and docker("network", "inspect", SANDBOX_NETWORK, check=False).returncode == 0
        ):
            log.info("the sandbox's network is there: its workloads are not needed")
        elif (
            docker(
                "container",
                "inspect",
                SANDBOX_TARGET,
                "--format",
                "{{.State.Running}}",
                check=False,
            ).stdout.strip()
            != "true"
        ):
            log.info("starting the sandbox cluster (it is removed at the end)")
            self.started_sandbox = True
            run([*composemirror_command(), "sandbox", "up"], timeout=600, env=self.env)
        log.info("building the benchmark image %s on %s", CLIENT_IMAGE, self.base)
        self.compose("build", "--quiet", timeout=600)
        # Leftovers of an interrupted run would collide with names and addresses.
        self._remove_own()
        self.composemirror("down", check=False)
        if self.reference is not None:
            self.reference.composemirror("down", check=False)
        if self.own_target:
            self._start(TARGET, TARGET_IP, ["sleep", "infinity"])

    def _remove_own(self) -> None:
        names = docker("ps", "-aq", "--filter", f"label={LABEL}={PROJECT}").stdout.split()
        if names:
            docker("rm", "-f", *names, check=False)

    def _clean_up(self) -> None:
        log.info("removing what the benchmarks started")
        steps = [
            ("the suite's containers", self._remove_own),
            ("the benchmark project", lambda: self.composemirror("down", check=False)),
            ("the plain compose project", lambda: self.compose("down", check=False)),
        ]
        reference = self.reference
        if reference is not None:
            steps.append(
                (
                    f"the project run by {reference.ref}",
                    lambda: reference.composemirror("down", check=False),
                )
            )
        if self.started_sandbox:
            steps.append(
                (
                    "the sandbox cluster",
                    lambda: run(
                        [*composemirror_command(), "sandbox", "down"], timeout=300, check=False
                    ),
                )
            )
        for what, step in steps:
            try:
                step()
            except BenchError as e:
                log.error("could not remove %s: %s", what, e)


def machine(load: Sequence[float]) -> Machine:
    """The machine and the code the figures were measured with; `load` as the run began."""
    meminfo = Path("/proc/meminfo").read_text().split()
    memory = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    code = _output([*composemirror_command(), "--version"]) or "unknown version"
    commit = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if commit:
        changed = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        code += f" at commit {commit}" + (" with uncommitted changes" if changed else "")
    return Machine(
        cpus=os.cpu_count() or 0,
        memory_bytes=memory,
        kernel=platform.release(),
        engine=_output(["docker", "version", "--format", "{{.Server.Version}}"]) or "unknown",
        compose=_output(["docker", "compose", "version", "--short"]) or "unknown",
        python=platform.python_version(),
        composemirror=code,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        load=" ".join(f"{value:.2f}" for value in load),
    )


def _output(argv: Sequence[str]) -> str:
    """A command's output, or "" when it fails: machine facts are nice to have, not needed."""
    try:
        return run(argv, timeout=60).stdout.strip()
    except BenchError:
        return ""
