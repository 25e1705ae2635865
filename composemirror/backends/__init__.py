"""Where the target lives: the `Backend` protocol, the values it returns, and `choose()`.

A backend resolves the configured target (what it is, its environment and resolver), says where
the agent goes as pure data for the rewrite (a `Placement`), prepares what must run before the
stack starts, tears down by label what it created, and adds its own `doctor` checks. `ops` and the
CLI know only this protocol; `choose()` is the one place that maps a target to an implementation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from composemirror.config import Config
from composemirror.errors import ConfigError
from composemirror.link import LinkAddress

if TYPE_CHECKING:
    from composemirror.engine import Engine

CLUSTER_ENV = "COMPOSEMIRROR_CLUSTER"
"""`sandbox`, `kubernetes` or `auto` (the default: Kubernetes when a kube config exists)."""
RENDER_DIR = ".composemirror"
"""Where, in the project directory, the rewritten project and the session's files live."""
KEY_FILE_NAME = "tunnel-{project}.key"
"""The session's tunnel key in the render dir, one per compose project (two `-p` projects
started from one directory have keys of their own)."""

Progress = Callable[[str], None]
"""Reports a step to the person waiting (one line, no newline)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One line of `doctor`."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolver:
    """The target's resolver configuration (its resolv.conf), as the app should see it."""

    search: tuple[str, ...] = ()
    ndots: int = 1
    nameservers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Resolver:
        """The settings of a resolv.conf(5) text as glibc reads them: the last `search` or
        `domain` line wins, `ndots` is capped at 15. (The agent reads its own copy in place.)"""
        search: tuple[str, ...] = ()
        ndots = 1
        nameservers: list[str] = []
        for line in text.splitlines():
            words = line.split("#", 1)[0].split(";", 1)[0].split()
            if not words:
                continue
            if words[0] == "nameserver" and len(words) > 1:
                nameservers.append(words[1])
            elif words[0] in ("search", "domain"):
                search = tuple(w.rstrip(".") for w in words[1:] if w.rstrip("."))
            elif words[0] == "options":
                for option in words[1:]:
                    key, _, value = option.partition(":")
                    if key == "ndots" and value.isdigit():
                        ndots = min(int(value), 15)
        return cls(search=search, ndots=ndots, nameservers=tuple(nameservers))


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    """A resolved target."""

    description: str
    """For people, e.g. `deployment/checkout in namespace shop (sandbox cluster)`."""
    target: str
    """What the target resolved to, in its backend's terms: a container name, a pod's name."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The target's environment, raw (not compose-escaped)."""
    resolver: Resolver | None = None
    """The target's resolver settings, where the backend can read them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerPlacement:
    """The agent is a compose service on this engine in a container's network namespace.

    Sidecars reach it through the unix socket in the volume they share with it.
    """

    network_mode: str
    """The agent's compose `network_mode`, e.g. `container:shop-checkout-1`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardedPlacement:
    """The agent runs elsewhere (in a cluster); a forwarder started by `prepare` listens at `link`.

    The rewrite adds no agent service and no link volume; sidecars dial `link`.
    """

    link: LinkAddress
    """Where sidecars dial, e.g. `tcp:host.docker.internal:41234`."""
    extra_hosts: Mapping[str, str] = field(default_factory=dict)
    """Names the sidecars need to reach it, e.g. {"host.docker.internal": "host-gateway"}."""
    mounts: Mapping[str, str] = field(default_factory=dict)
    """Host path -> path in the sidecars: e.g. the folder of a forwarder's unix socket under the
    render dir, for a `unix:` link that only the project's sidecars can reach."""


Placement = ContainerPlacement | ForwardedPlacement


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """One `up` of one project, as a backend's `place` and `prepare` see it."""

    project: str
    """The compose project's name."""
    directory: Path
    """The user's project directory."""
    config: Config
    resolution: Resolution
    base_image: str
    """The base of composemirror's images (the sandbox builds its own image on it)."""
    placement: Placement | None = None
    """What `place` returned; set before `prepare` is called."""

    @property
    def render_dir(self) -> Path:
        """`.composemirror/` in the project directory: the rendered project and session files."""
        return self.directory / RENDER_DIR

    @property
    def key_file(self) -> Path:
        """The session's tunnel key (written before `prepare`, removed by `down`)."""
        return self.render_dir / KEY_FILE_NAME.format(project=self.project)


class Backend(Protocol):
    """A place where targets live: this engine's containers, the sandbox, a Kubernetes cluster."""

    name: str
    """Short, for messages: `docker`, `sandbox`, `kubernetes`."""

    def resolve(self, config: Config) -> Resolution:
        """Find the target. No side effects; raises ClusterError or ConfigError."""
        ...

    def place(self, config: Config, resolution: Resolution, session: SessionInfo) -> Placement:
        """Where the agent goes and how sidecars reach it. Pure."""
        ...

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        """Start or create what must run before compose starts the stack, and wait for it;
        an agent that is no longer in the target's current network namespace (the target
        restarted or was replaced) is placed again."""
        ...

    def teardown(
        self,
        project: str,
        directory: Path,
        progress: Progress,
        *,
        config: Config | None = None,
        context: str | None = None,
    ) -> list[str]:
        """Remove, by label, what this backend created for `project`; what went. Idempotent.

        `config` is the project's configuration when its files are there; `context` the
        context `--context` names (over the one the session recorded)."""
        ...

    def doctor(self, config: Config) -> list[Check]:
        """The backend's own checks (cluster reachable, permissions, ...)."""
        ...

    def session_env(self, project: str) -> Mapping[str, str] | None:
        """The target's environment as the agent reported it after `prepare` (raw), or None
        when the backend has nothing better than `Resolution.env`."""
        ...

    def release(self, project: str, directory: Path) -> None:
        """Stop what lives only as long as the command that started it (a forwarder), when
        `up` ends attached or fails. Idempotent; the cluster objects stay for `teardown`."""
        ...

    def inspect(
        self, config: Config, project: str, directory: Path, *, sidecars: Sequence[str] = ()
    ) -> list[Check]:
        """The session's state for `status` and `doctor` (a forwarder, agents left behind, an
        agent outside the target's current network namespace: a failed check whose hint says
        how to fix it); `directory` is the user's project directory, `sidecars` the project's
        sidecar services that run on the engine now (each dials the agent's link, so a link
        end that is missing is a failure while they run). Raises ClusterError when
        unreachable."""
        ...


class NoSessionState:
    """The session hooks of `Backend` for backends whose agent is a compose service: the
    environment is `Resolution.env`, nothing outlives compose, nothing to report."""

    def session_env(self, project: str) -> Mapping[str, str] | None:
        return None

    def release(self, project: str, directory: Path) -> None:
        return None

    def inspect(
        self, config: Config, project: str, directory: Path, *, sidecars: Sequence[str] = ()
    ) -> list[Check]:
        return []


def choose(
    config: Config, environ: Mapping[str, str] | None = None, engine: Engine | None = None
) -> Backend:
    """The backend for `config`'s target. COMPOSEMIRROR_CLUSTER=sandbox|kubernetes forces one."""
    # Imported here: a backend brings its client library, and only the chosen one is needed.
    from composemirror.engine import Engine

    environ = os.environ if environ is None else environ
    engine = Engine() if engine is None else engine
    if config.target.kind == "docker":
        from composemirror.backends.docker import DockerBackend

        return DockerBackend(engine)
    forced = environ.get(CLUSTER_ENV, "auto")
    listed = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if forced == "auto" and listed and not kubeconfig_present(environ):
        # kubectl would fail here too; falling back to the sandbox would fake a cluster.
        raise ConfigError(
            f"KUBECONFIG names no file that exists: {', '.join(listed)}",
            hint=f"fix KUBECONFIG, or unset it (or set {CLUSTER_ENV}=sandbox) for the sandbox "
            "cluster",
        )
    if forced == "kubernetes" or (forced == "auto" and kubeconfig_present(environ)):
        from composemirror.backends.kubernetes import KubernetesBackend, state

        return KubernetesBackend(
            gateway=engine.host_gateway,
            state_root=state.root(environ),
            kubeconfig=environ.get("KUBECONFIG") or None,
        )
    if forced not in ("sandbox", "auto"):
        raise ConfigError(
            f"{CLUSTER_ENV}={forced!r} is not a choice", hint="use sandbox, kubernetes or auto"
        )
    from composemirror.backends.sandbox import SandboxBackend

    return SandboxBackend(engine)


def recorded(project: str, environ: Mapping[str, str], engine: Engine) -> Backend | None:
    """The backend of a session recorded on this host for `project` whose configuration is
    gone (`down -p NAME` after the project's files were deleted): a Kubernetes session's
    forwarder and record outlive the project's files. None when there is none."""
    from composemirror.backends.kubernetes import forwarder, state

    root = state.root(environ)
    if state.session_dir(project, root).is_dir() or forwarder.find(project):
        from composemirror.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(
            gateway=engine.host_gateway,
            state_root=root,
            kubeconfig=session_environ(project, environ).get("KUBECONFIG") or None,
        )
    return None


def session_environ(project: str, environ: Mapping[str, str]) -> Mapping[str, str]:
    """`environ` as `project`'s recorded Kubernetes session needs it: when `environ` names no
    kube config (no KUBECONFIG), the kube config files `up` read, from the session's record,
    as KUBECONFIG; so `down` and `status` in a new terminal act on the cluster `up` changed
    (with no kube config they would choose the sandbox). Otherwise `environ` unchanged: an
    explicit KUBECONFIG wins, as `--context` does over the recorded context."""
    if environ.get("KUBECONFIG"):
        return environ
    from composemirror.backends.kubernetes import state

    record = state.read_record(state.session_dir(project, state.root(environ)))
    files = [p for p in record.kubeconfig if Path(p).is_file()]
    if not files:
        return environ
    return {**environ, "KUBECONFIG": os.pathsep.join(files)}


def stop_forwarder(project: str, environ: Mapping[str, str]) -> list[str]:
    """Stop `project`'s Kubernetes forwarder, a process of this host, whichever backend the
    configuration now chooses; what was stopped, for people (nothing when none runs)."""
    from composemirror.backends.kubernetes import forwarder, state

    folder = state.session_dir(project, state.root(environ))
    return [f"forwarder (pid {pid})" for pid in forwarder.stop(folder, project=project)]


def kubeconfig_present(environ: Mapping[str, str]) -> bool:
    paths = environ.get("KUBECONFIG", "")
    if paths:
        return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return (home / ".kube" / "config").is_file()
