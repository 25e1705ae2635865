"""Stand-ins for the engine and a backend, so `ops` and the CLI run in-process in tests.

`FakeEngine` keeps containers, images and compose models in memory and records every compose
command, build and removal; `compose up` of a rendered project creates its containers from the
file, as compose would. `FakeBackend` resolves to a fixed target and records what it was asked.
Neither touches Docker, a cluster or the network.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from composemirror.backends import (
    Check,
    ContainerPlacement,
    NoSessionState,
    Placement,
    Progress,
    Resolution,
    SessionInfo,
)
from composemirror.config import Config
from composemirror.engine import ComposeProject, Container, Engine
from composemirror.errors import ComposeMirrorError, ConfigError, EngineError

COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_WORKDIR_LABEL = "com.docker.compose.project.working_dir"
FAKE_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
"""When the fake engine's first container starts."""


@dataclass(slots=True, kw_only=True)
class Build:
    """One image build the fake engine was asked for."""

    tag: str
    buildargs: Mapping[str, str]
    labels: Mapping[str, str]
    files: tuple[str, ...]
    """The build context's files (relative paths)."""


class FakeEngine(Engine):
    """An engine in memory. Give it the compose models it should return, by project file.

    `models` maps a compose file (resolved path) to what `docker compose config` prints for it;
    a project named with `-p` gets that name, as compose does. `exit_codes` maps a compose
    command (`up`, `down`, ...) to the exit code `compose_run` returns (default 0).
    """

    def __init__(
        self,
        *,
        models: Mapping[Path, Mapping[str, Any]] | None = None,
        images: Sequence[str] = (),
        containers: Sequence[Container] = (),
        reachable: bool = True,
        exit_codes: Mapping[str, int] | None = None,
        outputs: Mapping[str, str] | None = None,
        version: str = "20.10.24",
        compose: str = "2.40.3",
    ) -> None:
        super().__init__(docker="/usr/bin/docker")
        self.models = {path.resolve(): dict(model) for path, model in (models or {}).items()}
        self.images = set(images)
        self.running: list[Container] = list(containers)
        self.reachable = reachable
        self.exit_codes = dict(exit_codes or {})
        self.outputs = dict(outputs or {})
        """container name -> what `exec_output` prints there."""
        self.version = version
        self.compose = compose
        self.runs: list[tuple[ComposeProject, list[str]]] = []
        self.downs: list[tuple[ComposeProject, bool]] = []
        self.builds: list[Build] = []
        self.removed: list[str] = []
        self.execs: list[tuple[str, list[str]]] = []
        self.terminal = False
        """What `stdin_is_terminal` answers."""
        self._ids = itertools.count(1)

    # -- what the real engine answers -------------------------------------------------------

    def docker_binary(self) -> str:
        return "/usr/bin/docker"

    def client(self) -> Any:
        """Raises as an unreachable engine does when `reachable` is False."""
        if not self.reachable:
            raise EngineError(
                "cannot reach the Docker engine: connection refused", hint="start the Docker engine"
            )
        return self

    def engine_version(self) -> str:
        self.client()
        return self.version

    def compose_version(self) -> str:
        return self.compose

    def compose_model(self, project: ComposeProject) -> dict[str, Any]:
        """The model of the first known file; with no files, of the one nearest the project
        directory (or the current one), as compose's own discovery would find it. A model with
        `profiles` on a service leaves it out unless `--profile` names one of them (or `*`)."""
        files = [f.resolve() for f in project.files] or self._discover(project)
        for path in files:
            if path in self.models:
                model = dict(self.models[path])
                if project.name:
                    model["name"] = project.name
                active = set(project.profiles)
                model["services"] = {
                    name: spec
                    for name, spec in (model.get("services") or {}).items()
                    if not (spec or {}).get("profiles")
                    or "*" in active
                    or active & set(spec["profiles"])
                }
                return model
        missing = files[0] if files else "no configuration file provided"
        raise ConfigError(
            f"docker compose rejected the project: {missing}: not found",
            hint="fix the compose file(s) named above",
        )

    def compose_down(self, project: ComposeProject, *, volumes: bool) -> None:
        self.client()
        self.downs.append((project, volumes))
        name = project.name or self._name_of(project)
        self._remove(lambda c: c.labels.get(COMPOSE_PROJECT_LABEL) == name)

    def compose_run(self, project: ComposeProject, args: Sequence[str]) -> int:
        self.runs.append((project, list(args)))
        command = args[0] if args else ""
        code = self.exit_codes.get(command, 0)
        if command == "up" and code == 0:
            if "--force-recreate" in args:
                named = {a for a in args[1:] if not a.startswith("-")}
                name = project.name or self._name_of(project)
                self._remove(
                    lambda c: (
                        c.labels.get(COMPOSE_PROJECT_LABEL) == name
                        and c.labels.get(COMPOSE_SERVICE_LABEL) in named
                    )
                )
            self._start(project)
        return code

    def stdin_is_terminal(self) -> bool:
        return self.terminal

    def host_gateway(self) -> str:
        self.client()
        return "172.17.0.1"

    def image_exists(self, tag: str) -> bool:
        self.client()
        return tag in self.images

    def build_image(
        self,
        context: Path,
        tag: str,
        *,
        buildargs: Mapping[str, str],
        labels: Mapping[str, str],
        progress: Callable[[str], None],
    ) -> None:
        files = tuple(
            sorted(str(p.relative_to(context)) for p in context.rglob("*") if p.is_file())
        )
        self.builds.append(
            Build(tag=tag, buildargs=dict(buildargs), labels=dict(labels), files=files)
        )
        progress(f"Successfully tagged {tag}")
        self.images.add(tag)

    def containers(self, labels: Mapping[str, str]) -> list[Container]:
        self.client()
        return [c for c in self.running if _matches(c, labels)]

    def inspect_container(self, name: str) -> Container | None:
        self.client()
        return next((c for c in self.running if name in (c.name, c.id)), None)

    def exec_output(self, container_id: str, command: Sequence[str]) -> str | None:
        container = self.inspect_container(container_id)
        self.execs.append((container_id, list(command)))
        if container is None or container.state != "running":
            return None
        return self.outputs.get(container.name)

    def remove_labelled(self, labels: Mapping[str, str], *, volumes: bool) -> list[str]:
        self.client()
        return self._remove(lambda c: _matches(c, labels))

    # -- helpers for tests ------------------------------------------------------------------

    def add_container(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        state: str = "running",
        health: str | None = None,
        env: Mapping[str, str] | None = None,
        image: str = "example/app",
        network_mode: str = "",
    ) -> Container:
        """A container that started now (each one a second after the one before)."""
        number = next(self._ids)
        container = Container(
            id=f"c{number:04d}",
            name=name,
            labels=dict(labels or {}),
            state=state,
            health=health,
            env=dict(env or {}),
            image=image,
            network_mode=network_mode,
            started_at=FAKE_EPOCH + timedelta(seconds=number) if state == "running" else None,
        )
        self.running.append(container)
        return container

    def restart(self, name: str) -> Container:
        """`docker restart`: the same container, started now (after every other)."""
        number = next(self._ids)
        self.running = [
            replace(c, state="running", started_at=FAKE_EPOCH + timedelta(seconds=number))
            if c.name == name
            else c
            for c in self.running
        ]
        found = self.inspect_container(name)
        assert found is not None, name
        return found

    def set_state(self, name: str, state: str) -> None:
        self.running = [replace(c, state=state) if c.name == name else c for c in self.running]

    def set_health(self, name: str, health: str | None) -> None:
        """What the container's healthcheck says (`healthy`, `unhealthy`, `starting`)."""
        self.running = [replace(c, health=health) if c.name == name else c for c in self.running]

    def commands(self) -> list[list[str]]:
        """The compose commands run, without their project flags."""
        return [args for _, args in self.runs]

    def _start(self, project: ComposeProject) -> None:
        """Every service of the rendered file (with their dependencies, compose starts all)."""
        if not project.files or not project.files[0].is_file():
            return
        model = yaml.safe_load(project.files[0].read_text()) or {}
        name = project.name or str(model.get("name", ""))
        services = model.get("services") or {}
        # Those that join another's namespace start after it, as compose starts them.
        for service, spec in sorted(
            services.items(), key=lambda item: _joins(item[1] or {}) is not None
        ):
            container_name = (spec or {}).get("container_name") or f"{name}-{service}-1"
            if self.inspect_container(container_name) is not None:
                continue
            values = dict(project.overrides)
            labels = {
                **{
                    k: _interpolate(str(v), values)
                    for k, v in ((spec or {}).get("labels") or {}).items()
                },
                COMPOSE_PROJECT_LABEL: name,
                COMPOSE_SERVICE_LABEL: service,
                COMPOSE_WORKDIR_LABEL: str(project.files[0].resolve().parent),
            }
            joined = _joins(spec or {})
            owner = None
            if joined is not None:
                owner_spec = services.get(joined) or {}
                owner = self.inspect_container(
                    owner_spec.get("container_name") or f"{name}-{joined}-1"
                )
            environment = (spec or {}).get("environment") or {}
            self.add_container(
                container_name,
                labels=labels,
                env={k: _interpolate(str(v), values) for k, v in dict(environment).items()},
                image=str((spec or {}).get("image", "")),
                network_mode=f"container:{owner.id}" if owner else "",
            )

    def _discover(self, project: ComposeProject) -> list[Path]:
        start = (project.directory or Path.cwd()).resolve()
        for folder in (start, *start.parents):
            known = sorted(path for path in self.models if path.parent == folder)
            if known:
                return known[:1]
        return []

    def _name_of(self, project: ComposeProject) -> str | None:
        try:
            return str(self.compose_model(project)["name"])
        except ConfigError:
            return None

    def _remove(self, chosen: Callable[[Container], bool]) -> list[str]:
        gone = [c for c in self.running if chosen(c)]
        self.running = [c for c in self.running if not chosen(c)]
        names = [f"container {c.name}" for c in gone]
        self.removed += names
        return names


def _joins(spec: Mapping[str, Any]) -> str | None:
    """The service whose namespace a service joins (`network_mode: service:NAME`), if any."""
    mode = str(spec.get("network_mode") or "")
    return mode.removeprefix("service:") if mode.startswith("service:") else None


def _interpolate(value: str, values: Mapping[str, str]) -> str:
    """`value` as compose interpolates it: `${NAME}` and `${NAME:-default}` from `values`, `$$`
    a literal `$` (the forms the rendered project uses)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return values.get(match.group(1)) or (match.group(2) or "")

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", one, value)


def _matches(container: Container, labels: Mapping[str, str]) -> bool:
    return all(container.labels.get(k) == v for k, v in labels.items())


@dataclass(slots=True, kw_only=True)
class FakeBackend(NoSessionState):
    """A backend whose target is always found (unless `error` is set), recording its calls."""

    name: str = "fake"
    resolution: Resolution = field(
        default_factory=lambda: Resolution(
            description="fake target", target="fake-target", env={"FROM_TARGET": "yes"}
        )
    )
    placement: Placement = field(
        default_factory=lambda: ContainerPlacement(network_mode="container:fake-target")
    )
    error: Exception | None = None
    """Raised by `resolve`, e.g. a ClusterError."""
    checks: list[Check] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    """What `teardown` reports removed."""
    reported_env: Mapping[str, str] | None = None
    """What `session_env` returns (the agent's report, for backends that have one)."""
    session: list[Check] = field(default_factory=list)
    """What `inspect` returns."""
    sidecars_seen: list[str] = field(default_factory=list)
    """The running sidecars `inspect` was last given."""
    calls: list[tuple[str, Any]] = field(default_factory=list)
    """(method, its main argument) in call order."""

    def resolve(self, config: Config) -> Resolution:
        self.calls.append(("resolve", config.target))
        if self.error is not None:
            raise self.error
        return self.resolution

    def place(self, config: Config, resolution: Resolution, session: SessionInfo) -> Placement:
        self.calls.append(("place", session.project))
        return self.placement

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        self.calls.append(("prepare", session))
        progress(f"prepared {self.resolution.target}")

    def teardown(
        self,
        project: str,
        directory: Path,
        progress: Progress,
        *,
        config: Config | None = None,
        context: str | None = None,
    ) -> list[str]:
        self.calls.append(("teardown", project))
        return list(self.torn_down)

    def doctor(self, config: Config) -> list[Check]:
        self.calls.append(("doctor", config.target))
        return list(self.checks)

    def session_env(self, project: str) -> Mapping[str, str] | None:
        self.calls.append(("session_env", project))
        return self.reported_env

    def release(self, project: str, directory: Path) -> None:
        self.calls.append(("release", project))

    def inspect(
        self, config: Config, project: str, directory: Path, *, sidecars: Sequence[str] = ()
    ) -> list[Check]:
        self.calls.append(("inspect", project))
        self.sidecars_seen = list(sidecars)
        if isinstance(self.error, ComposeMirrorError):
            raise self.error
        return list(self.session)

    def chooser(self) -> Callable[[Config, Mapping[str, str], Engine], FakeBackend]:
        """For `ops.Runtime(choose=...)`: this backend whatever the configuration."""
        return lambda config, environ, engine: self
