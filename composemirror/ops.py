"""The operations behind the CLI: render, up, down, status, doctor, compose passthrough, sandbox.

Each returns data (or a compose exit code) and prints nothing; progress goes through a callback.
They act through a `Runtime` (the engine, how a backend is chosen, the environment), which tests
replace with fakes, and know backends only by the `Backend` protocol. They find what composemirror
created by label, so an interrupted `up` leaves nothing that `down` cannot remove, and no state
file is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dotenv
import yaml
from tenacity import (
    Retrying,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
)

import composemirror
from composemirror import backends, compose, images, namespaces
from composemirror.backends import (
    RENDER_DIR,
    Backend,
    Check,
    ForwardedPlacement,
    Placement,
    Progress,
    Resolution,
    SessionInfo,
)
from composemirror.backends.sandbox import SandboxBackend
from composemirror.config import (
    BLOCK,
    CONFIG_FILE_NAME,
    MAX_DEPTH,
    Config,
    check_depth,
    load,
)
from composemirror.engine import ComposeProject, Container, Engine
from composemirror.errors import ComposeMirrorError, ConfigError, EngineError
from composemirror.link import ENV_VAR, STATUS_FILE

__all__ = [
    "Check",
    "Options",
    "Progress",
    "Project",
    "Rendered",
    "Runtime",
    "ServiceStatus",
    "UpFlags",
]

log = logging.getLogger(__name__)

COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
"""compose-go's `DefaultFileNames`, in its order of preference."""
OVERRIDE_FILES = (
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
)
"""compose-go's `DefaultOverrideFileNames`: loaded after the default file found beside them."""
COMPOSE_WORKDIR_LABEL = "com.docker.compose.project.working_dir"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
AGENT_IMAGE_ENV = "COMPOSEMIRROR_AGENT_IMAGE"
"""Overrides the configuration's `agent.image` (Kubernetes targets)."""

_T = TypeVar("_T")

Chooser = Callable[[Config, Mapping[str, str], Engine], Backend]
"""How a backend is picked for a configuration: `backends.choose`, or a fake in tests."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """What the operations act through; the defaults are the real ones."""

    engine: Engine = field(default_factory=Engine)
    choose: Chooser = backends.choose
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    """The process environment (COMPOSE_FILE, COMPOSEMIRROR_BASE_IMAGE, COMPOSEMIRROR_CLUSTER)."""

    def backend(self, config: Config) -> Backend:
        """The backend `config` names, in this environment."""
        return self.choose(config, self.environ, self.engine)

    def session_backend(self, config: Config, project: str) -> Backend:
        """The backend of `project`'s running session: as `backend`, with the kube config files
        `up` recorded when the environment names none (`backends.session_environ`)."""
        return self.choose(config, backends.session_environ(project, self.environ), self.engine)


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The user's project, as compose's own flags name it."""

    files: tuple[Path, ...] = ()
    project_name: str | None = None
    profiles: tuple[str, ...] = ()
    env_files: tuple[Path, ...] = ()
    project_directory: Path | None = None
    config_file: Path | None = None
    """`--config FILE`; otherwise x-composemirror, then composemirror.yaml beside the files."""
    context: str | None = None
    """`--context`: the kube config context, over the configuration's `kube_context`."""
    namespace: str | None = None
    """`-n`/`--namespace`: the target's namespace, over the configuration's `namespace`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """A rewritten project, ready for compose."""

    name: str
    directory: Path
    """The user's project directory; the rendered files live in its `.composemirror/`."""
    model: dict[str, Any]
    config: Config
    backend: Backend
    session: SessionInfo
    """The session as the backend sees it, its placement set."""
    images: tuple[images.ImageSpec, ...]
    """composemirror's images this project runs: the sidecar's, and the agent's when the agent
    is a service of the project (not for a cluster, whose agent runs a stock image)."""
    base_image: str
    source: Mapping[str, Any] = field(default_factory=dict)
    """The user's compose model the rewrite started from (for `with_env`)."""
    notices: tuple[str, ...] = ()

    @property
    def resolution(self) -> Resolution:
        return self.session.resolution

    @property
    def placement(self) -> Placement:
        assert self.session.placement is not None
        return self.session.placement

    @property
    def path(self) -> Path:
        return self.session.render_dir / "compose.yaml"

    @property
    def key_file(self) -> Path:
        return self.session.key_file

    def compose_project(self) -> ComposeProject:
        """The rendered project as compose addresses it, the tunnel key (once written) in
        compose's environment for the key secret's `environment:` source."""
        key = self.key_file.read_text().strip() if self.key_file.is_file() else None
        return ComposeProject(
            files=(self.path,),
            name=self.name,
            overrides={compose.KEY_ENV: key, compose.KEY_DIGEST_ENV: compose.key_digest(key)}
            if key
            else {},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus:
    """One container of the project."""

    service: str
    container: str
    role: str
    """app, sidecar, agent, or service (one composemirror left alone)."""
    state: str
    health: str | None
    link: Mapping[str, Any] = field(default_factory=dict)
    """For sidecars: what the sidecar reports (agent link state, interception rules, counters;
    see `composemirror.link.STATUS_FILE`)."""
    namespace: Check | None = None
    """For a container that joins a sidecar's network namespace (an app): whether it is in the
    sidecar's current one (`composemirror.namespaces.stale_join`)."""


def base_image(runtime: Runtime) -> str:
    """The base for composemirror's images: $COMPOSEMIRROR_BASE_IMAGE, the local one, or public."""
    chosen = runtime.environ.get(images.BASE_ENV)
    if chosen:
        return chosen
    try:
        if runtime.engine.image_exists(images.LOCAL_BASE):
            return images.LOCAL_BASE
    except EngineError:
        pass
    return images.DEFAULT_BASE


def compose_project(options: Options, base: str, runtime: Runtime) -> ComposeProject:
    """The user's project as compose's own flags address it.

    With no `-f`, no file is passed: compose then loads what it loads on its own (the files of
    `COMPOSE_FILE`, or `compose.yaml` and its `compose.override.yaml` found upwards), and
    `COMPOSE_PROJECT_NAME` and `COMPOSE_PROFILES` apply as they do for `docker compose`. Raises
    `ConfigError` early when compose would find no file, with a hint (see `discover`).
    """
    if not options.files:
        discover(options, runtime.environ)
    return ComposeProject(
        files=options.files,
        name=options.project_name,
        profiles=options.profiles,
        env_files=options.env_files,
        directory=options.project_directory,
        environment={images.BASE_ENV: base},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    """The files compose loads for a project, and its project directory."""

    files: tuple[Path, ...]
    directory: Path
    """`--project-directory`, else the first file's folder (compose's working directory)."""


def discover(options: Options, environ: Mapping[str, str]) -> Discovery:
    """The files `docker compose` loads for these flags, found as compose finds them.

    Follows compose-go's `cli/options.go` (`WithConfigFileEnv`, `WithDefaultConfigPath`,
    `GetWorkingDir`) and the compose docs ("Set or change pre-defined environment variables"):
    `-f` files as given; else `COMPOSE_FILE` from the environment or, below it, from the `.env`
    of the working directory (`--env-file` instead when given; none with
    `COMPOSE_DISABLE_ENV_FILE`), split on `COMPOSE_PATH_SEPARATOR`
    (default `os.pathsep`), relative paths from the current directory; else the first of
    `compose.yaml`, `compose.yml`, `docker-compose.yml`, `docker-compose.yaml` in the working
    directory or the nearest folder above it, plus the first of `compose.override.yml`,
    `compose.override.yaml`, `docker-compose.override.yml`, `docker-compose.override.yaml`
    beside it. Raises `ConfigError` when there is none.
    """
    start = (options.project_directory or Path.cwd()).resolve()
    files = tuple(f.resolve() for f in options.files)
    if not files:
        variables = {**_dotenv(options, start, environ), **environ}
        listed = variables.get("COMPOSE_FILE")
        if listed:
            separator = variables.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
            files = tuple(Path(f).resolve() for f in listed.split(separator) if f)
    if not files:
        files = _discover(start)
    directory = options.project_directory.resolve() if options.project_directory else None
    return Discovery(files=files, directory=directory or files[0].parent)


def _dotenv(options: Options, start: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `--env-file` files, else of `.env` in `start` unless
    `COMPOSE_DISABLE_ENV_FILE` is true (compose-go's `WithEnvFiles`), later files winning."""
    disabled = environ.get("COMPOSE_DISABLE_ENV_FILE", "").lower() in ("1", "t", "true")
    paths = list(options.env_files) or ([] if disabled else [start / ".env"])
    values: dict[str, str] = {}
    for path in paths:
        if path.is_file():
            values.update({k: v for k, v in dotenv.dotenv_values(path).items() if v is not None})
    return values


@dataclass(frozen=True, slots=True, kw_only=True)
class Project:
    """The user's project as loaded, before a backend is involved."""

    name: str
    directory: Path
    model: dict[str, Any]
    """What `docker compose config` printed for it."""
    config: Config
    base_image: str


def load_project(options: Options, *, runtime: Runtime) -> Project:
    """The project's compose model and its composemirror configuration. No engine changes.

    Raises `ConfigError` for a project compose rejects, a missing or invalid configuration, and
    a mirrored service that exists only under a profile that is not active.
    """
    base = base_image(runtime)
    user = compose_project(options, base, runtime)
    model = runtime.engine.compose_model(user)
    # The rewrite walks the model recursively: deeper data is refused here, with its place.
    check_depth(model, source=" ".join(map(str, user.files)) or "the compose model")
    found = discover(options, runtime.environ)
    config = _with_flags(_load_config(options, model, found), options, runtime.environ)
    _check_profiles(config, model, user, runtime)
    return Project(
        name=str(model["name"]),
        directory=found.directory,
        model=model,
        config=config,
        base_image=base,
    )


def _check_profiles(
    config: Config, model: Mapping[str, Any], user: ComposeProject, runtime: Runtime
) -> None:
    """Refuse a mirrored service that only an inactive profile holds, saying how to enable it.

    compose leaves such services out of the model; `--profile "*"` (compose's "all profiles")
    shows them with their `profiles`.
    """
    present = model.get("services") or {}
    missing = [name for name in config.services if name not in present]
    if not missing:
        return
    everything = runtime.engine.compose_model(dataclasses.replace(user, profiles=("*",)))
    for name in missing:
        profiles = (everything.get("services") or {}).get(name, {}).get("profiles") or ()
        if profiles:
            first = profiles[0]
            raise ConfigError(
                f"{config.source}: {BLOCK}.services: {name!r} belongs to profile "
                f"{' or '.join(repr(p) for p in profiles)}, which is not active",
                hint=f"enable it with --profile {first} or COMPOSE_PROFILES={first}",
            )


def render(
    options: Options, *, write: bool, runtime: Runtime, project: Project | None = None
) -> Rendered:
    """Load the project (unless `project` is it, loaded) and its configuration, resolve the
    target, rewrite. No engine changes."""
    project = project or load_project(options, runtime=runtime)
    # A session running in a cluster stays there in a shell without KUBECONFIG, as for `down`.
    backend = runtime.session_backend(project.config, project.name)
    rendered = rewrite(project, backend, backend.resolve(project.config))
    if write:
        _write(rendered)
    return rendered


def _checked(
    options: Options, services: Sequence[str], *, runtime: Runtime, project: Project
) -> Rendered:
    """`render` without writing, SERVICES checked: bad input is refused before anything is
    written or created."""
    rendered = render(options, write=False, runtime=runtime, project=project)
    _check_services(rendered, services)
    return rendered


@contextlib.contextmanager
def _one_at_a_time(project: Project, progress: Progress) -> Iterator[bool]:
    """Hold the project's lock (an exclusive `flock` of `.composemirror/<name>.lock`) while an
    `up` or `run` writes the rendered project and prepares its session; yields whether it had
    to wait for another.

    A concurrent `up` of the same project (a second terminal, a CI retry) waits, then renders
    again with the session the first prepared (its forwarder's port, its agent) and keeps it,
    instead of preparing a second session and rewriting the first's files under it. The lock
    goes with the process however it ends; no child inherits it.
    """
    folder = project.directory / RENDER_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(folder / f"{project.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            progress(f"waiting for another `up` of project {project.name} to prepare its session")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(descriptor)


def rewrite(project: Project, backend: Backend, resolution: Resolution) -> Rendered:
    """Place the agent for a resolved target and rewrite the project around it. Pure but for
    reading `feature.env.env_file` and hashing the images' files."""
    config = project.config
    session = SessionInfo(
        project=project.name,
        directory=project.directory,
        config=config,
        resolution=resolution,
        base_image=project.base_image,
    )
    placement = backend.place(config, resolution, session)
    session = dataclasses.replace(session, placement=placement)
    specs = tuple(images.spec(role, project.base_image) for role in images.ROLES)
    used = tuple(
        s for s in specs if s.role != "agent" or not isinstance(placement, ForwardedPlacement)
    )
    notices = (
        *(f"ignored (no effect at the network level): {key}" for key in config.ignored),
        *compose.notices(project.model, config),
    )
    return Rendered(
        name=project.name,
        directory=project.directory,
        model=_rewrite_model(project.model, config, session, specs, resolution.env),
        config=config,
        backend=backend,
        session=session,
        images=used,
        base_image=project.base_image,
        source=project.model,
        notices=notices,
    )


def with_env(rendered: Rendered, remote_env: Mapping[str, str]) -> Rendered:
    """`rendered` with the target's environment replaced by `remote_env` (what the agent
    reported from the target process), the placement unchanged. Pure like `rewrite`."""
    specs = tuple(images.spec(role, rendered.base_image) for role in images.ROLES)
    model = _rewrite_model(rendered.source, rendered.config, rendered.session, specs, remote_env)
    return dataclasses.replace(rendered, model=model)


def _rewrite_model(
    model: Mapping[str, Any],
    config: Config,
    session: SessionInfo,
    specs: Sequence[images.ImageSpec],
    remote_env: Mapping[str, str],
) -> dict[str, Any]:
    assert session.placement is not None
    plan = compose.Plan(
        version=composemirror.__version__,
        sidecar_image=specs[0].tag,
        agent_image=specs[1].tag,
        placement=session.placement,
        remote_env=remote_env,
        env_file=_read_env_file(config),
        resolver=session.resolution.resolver,
    )
    return compose.rewrite(dict(model), config, plan)


def up(
    options: Options,
    *,
    services: Sequence[str] = (),
    detach: bool = False,
    build: bool = False,
    flags: UpFlags | None = None,
    progress: Progress,
    runtime: Runtime,
) -> int:
    """Render, prepare the backend, build missing images, and start the stack.

    Returns 0, or, as `docker compose up` does: the exit code of `flags.exit_code_from`'s
    container (or, with `abort_on_container_exit`, compose's own code), and 130/143 when the
    attached `up` was stopped by SIGINT/SIGTERM (`Engine.compose_run`). Raises `EngineError`
    for any other failure of compose.

    When the backend reports the target's environment after `prepare` (the agent read the
    target process's), the project is rendered again with it before compose starts it. What
    lives only as long as this command (a forwarder) is released when it ends attached or
    fails; after a successful `up -d` it stays, for `down`. One `up` or `run` of a project
    writes and prepares at a time (`_one_at_a_time`), an `up -d` until compose has started the
    stack (two at once would make compose create its networks twice); bad input is refused
    before that.
    """
    flags = flags or UpFlags()
    runtime.engine.client()
    project = load_project(options, runtime=runtime)
    rendered = _checked(options, services, runtime=runtime, project=project)
    preparing = contextlib.ExitStack()
    try:
        if preparing.enter_context(_one_at_a_time(project, progress)):
            rendered = _checked(options, services, runtime=runtime, project=project)
        _write(rendered)
    except BaseException:
        preparing.close()
        raise
    for notice in rendered.notices:
        progress(notice)
    progress(f"target: {rendered.resolution.description}")
    keep = False
    interrupted = False
    try:
        rendered.backend.prepare(rendered.session, progress)
        reported = rendered.backend.session_env(rendered.name)
        if reported is not None:
            rendered = with_env(rendered, reported)
            _write(rendered)
        if not detach:
            preparing.close()  # compose runs until stopped: another `up` may go on now
        ensure_images(rendered.images, force=build, progress=progress, runtime=runtime)
        _rejoin(rendered, progress=progress, runtime=runtime)
        _relink(rendered, progress=progress, runtime=runtime)
        args = [
            "up",
            *(["--detach"] if detach else []),
            *(["--build"] if build else []),
            *flags.args(_own_services(rendered)),
            *services,
        ]
        code = runtime.engine.compose_run(rendered.compose_project(), args)
        interrupted = code in INTERRUPTED
        keep = detach and code == 0
    except BaseException as e:
        # KeyboardInterrupt or SIGTERM's: not an error of ours, a request to stop.
        interrupted = not isinstance(e, Exception)
        raise
    finally:
        preparing.close()
        if interrupted:
            _stop(rendered, progress=progress, runtime=runtime)
        if not keep:
            rendered.backend.release(rendered.name, rendered.directory)
    if code == 0 or code in INTERRUPTED or flags.passes_exit_code:
        return code
    raise EngineError(
        f"docker compose up failed (exit {code})",
        hint="see compose's output above; `composemirror down` removes what was created",
    )


def _check_services(rendered: Rendered, services: Sequence[str]) -> None:
    """Raise ConfigError (exit 2) for the first of `services` the rendered project does not
    have, with compose's did-you-mean hint."""
    known = rendered.model.get("services") or {}
    own = rendered.source.get("services") or {}  # the user's: what the hint lists
    for service in services:
        if service not in known:
            raise ConfigError(
                f"no service {service!r} in this project",
                hint=compose._suggest(service, own),
            )


def _stop(rendered: Rendered, *, progress: Progress, runtime: Runtime) -> None:
    """Stop the project's containers after `up` was interrupted, wherever the signal landed:
    compose stops what it started when its event loop has begun, but a signal while it
    creates and starts containers (or before compose runs, the agent already started) leaves
    some running. As compose's Ctrl-C, they are stopped, not removed (`down` removes them)."""
    progress("interrupted: stopping what was started")
    runtime.engine.compose_run(rendered.compose_project(), ["stop"])


def _rejoin(rendered: Rendered, *, progress: Progress, runtime: Runtime) -> None:
    """Recreate the project's containers that are not in their sidecar's current network
    namespace (the sidecar restarted, was recreated or stopped since they joined it), so that
    the `up` that follows finds them where they belong; compose itself leaves them running.

    The sidecars they need are started first (`--no-deps`: only them). Raises `EngineError`
    when compose fails.
    """
    project = rendered.compose_project()
    stale = _stale_joins(rendered.name, runtime)
    if not stale:
        return
    for join in stale:
        progress(f"{join.reason}: recreating {join.service}")
    owners = sorted({j.owner for j in stale if j.owner is not None and not j.owner_running})
    steps = [["up", "--detach", "--no-deps", *owners]] if owners else []
    steps.append(["up", "--detach", "--no-deps", "--force-recreate", *(j.service for j in stale)])
    for args in steps:
        code = runtime.engine.compose_run(project, args)
        if code != 0:
            raise EngineError(
                f"recreating {', '.join(j.service for j in stale)} failed (exit {code})",
                hint="see compose's output above; `composemirror down` removes what was created",
            )


SIDECAR_WAIT = 30.0
"""Seconds `up` waits for unhealthy sidecars to link to the agent again before starting."""


def _relink(
    rendered: Rendered,
    *,
    progress: Progress,
    runtime: Runtime,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Let unhealthy sidecars (their link was down) become healthy before compose starts the
    stack: compose refuses to start anything that depends on an unhealthy service, and the app
    depends on its sidecar. The agent is started first when it is a service of the project
    (`prepare` has already restarted what the backend runs). Raises `EngineError` when a
    sidecar is still unhealthy after `SIDECAR_WAIT` seconds.
    """

    kept = _kept_sidecars(rendered)

    def unhealthy() -> list[str]:
        labels = {COMPOSE_PROJECT_LABEL: rendered.name, compose.LABEL_ROLE: "sidecar"}
        found = runtime.engine.containers(labels)
        return sorted(
            c.name for c in found if c.state == "running" and c.health == "unhealthy" and kept(c)
        )

    waiting = unhealthy()
    if not waiting:
        return
    if compose.AGENT_SERVICE in (rendered.model.get("services") or {}):
        runtime.engine.compose_run(
            rendered.compose_project(), ["up", "--detach", "--no-deps", compose.AGENT_SERVICE]
        )
    progress(f"waiting for {', '.join(waiting)} to link to the agent again")
    retrying = Retrying(
        stop=stop_after_delay(SIDECAR_WAIT) | stop_after_attempt(int(SIDECAR_WAIT * 2) + 1),
        wait=wait_fixed(0.5),
        retry=retry_if_result(bool),
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else waiting,
        sleep=sleep,
    )
    left: list[str] = retrying(unhealthy)
    if left:
        raise EngineError(
            f"{', '.join(left)} stayed unhealthy for {SIDECAR_WAIT:.0f} s: "
            "its link to the agent or its interception rules are not working",
            hint="`composemirror status` shows the link and the rules; `composemirror doctor` "
            "says what is wrong",
        )


def _kept_sidecars(rendered: Rendered) -> Callable[[Container], bool]:
    """Whether compose will keep a sidecar container as it is: it has the rendered project's
    link settings and was made with the current tunnel key. One that differs (a new session's
    forwarder port, a new key) is recreated by the `up` that follows; waiting for it to link
    with its old settings would be waiting for nothing."""
    services = rendered.model.get("services") or {}
    key = rendered.key_file.read_text().strip() if rendered.key_file.is_file() else ""
    digest = compose.key_digest(key) if key else ""

    def kept(container: Container) -> bool:
        service = services.get(container.labels.get(COMPOSE_SERVICE_LABEL, "")) or {}
        wanted = (service.get("environment") or {}).get(ENV_VAR)
        return (
            wanted is not None
            and container.env.get(ENV_VAR) == wanted.replace("$$", "$")
            and container.labels.get(compose.LABEL_KEY, "") == digest
        )

    return kept


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleJoin:
    """A container of the project left outside the network namespace it shares."""

    service: str
    """Its compose service."""
    owner: str | None
    """The compose service whose namespace it should share (its sidecar), when known."""
    owner_running: bool
    reason: str
    """`composemirror.namespaces.stale_join`'s words."""


def _stale_joins(project: str, runtime: Runtime) -> list[StaleJoin]:
    """The project's running containers that joined another container's network namespace and
    are no longer in its current one. An app's namespace is its sidecar's (found by label); any
    other container's is the one whose id its network mode names. The agent's is the target's,
    which its backend checks (`Backend.inspect`)."""
    containers = runtime.engine.containers({COMPOSE_PROJECT_LABEL: project})
    return [
        join
        for container in containers
        if (join := _stale_join(container, containers, runtime)) is not None
    ]


def _stale_join(
    container: Container, containers: Sequence[Container], runtime: Runtime
) -> StaleJoin | None:
    joined = namespaces.joined_id(container)
    role = container.labels.get(compose.LABEL_ROLE)
    if joined is None or role == "agent":
        return None
    if role == "app":
        app = container.labels.get(compose.LABEL_SERVICE, "")
        owner_service: str | None = compose.sidecar_name(app)
        owner = next(
            (
                c
                for c in containers
                if c.labels.get(compose.LABEL_ROLE) == "sidecar"
                and c.labels.get(compose.LABEL_SERVICE) == app
            ),
            None,
        )
    else:
        owner = next((c for c in containers if c.id == joined), None)
        owner = owner or runtime.engine.inspect_container(joined)
        owner_service = owner.labels.get(COMPOSE_SERVICE_LABEL) if owner else None
    reason = namespaces.stale_join(container, owner, owner_name=owner_service or joined[:12])
    if reason is None:
        return None
    return StaleJoin(
        service=container.labels.get(COMPOSE_SERVICE_LABEL, container.name),
        owner=owner_service,
        owner_running=owner is not None and owner.state == "running",
        reason=reason,
    )


INTERRUPTED = (130, 143)
"""Exit codes after SIGINT and SIGTERM (128 + the signal), as compose and shells report them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpFlags:
    """compose's own `up` options that composemirror passes through (`docker compose up --help`).

    `abort_on_container_exit` and `exit_code_from` consider only the user's services: compose
    (`pkg/compose/up.go`, `runInteractiveUp`) watches for the first container to exit among the
    services named on the command line, else among those it attaches to, so the sidecars and
    the agent are left out with `--no-attach` (their logs stay in `compose logs`). The code
    returned is then that of the first container to exit (`stopOnFirstExit`), or of
    `exit_code_from`'s (`captureExitCodeFrom`).
    """

    abort_on_container_exit: bool = False
    """Stop every container when one of the user's stops."""
    exit_code_from: str | None = None
    """Return this service's exit code; implies `abort_on_container_exit` (as in compose)."""
    wait: bool = False
    """Return once every service runs, and is healthy where it has a healthcheck (detaches)."""
    wait_timeout: int | None = None
    """Seconds `wait` waits at most."""
    no_build: bool = False
    """Build none of the project's images (composemirror's own, when missing, still are)."""
    quiet_pull: bool = False
    remove_orphans: bool = False

    @property
    def passes_exit_code(self) -> bool:
        return self.abort_on_container_exit or self.exit_code_from is not None

    def args(self, own: Sequence[str]) -> list[str]:
        """compose's flags for these options; `own` are composemirror's services."""
        args = []
        if self.passes_exit_code:
            args += ["--abort-on-container-exit"]
            args += [f"--no-attach={name}" for name in own]
        if self.exit_code_from:
            args += ["--exit-code-from", self.exit_code_from]
        if self.wait:
            args += ["--wait"]
        if self.wait_timeout is not None:
            args += ["--wait-timeout", str(self.wait_timeout)]
        if self.no_build:
            args += ["--no-build"]
        if self.quiet_pull:
            args += ["--quiet-pull"]
        if self.remove_orphans:
            args += ["--remove-orphans"]
        return args


def _own_services(rendered: Rendered) -> list[str]:
    """composemirror's services in the rendered project: the sidecars and the agent, if here."""
    services = rendered.model.get("services") or {}
    own = [compose.sidecar_name(name) for name in rendered.config.services]
    return own + ([compose.AGENT_SERVICE] if compose.AGENT_SERVICE in services else [])


def run(
    options: Options,
    service: str,
    command: Sequence[str] = (),
    *,
    remove: bool = False,
    env: Sequence[str] = (),
    no_deps: bool = False,
    build: bool = False,
    progress: Progress,
    runtime: Runtime,
) -> int:
    """`docker compose run` of one service of the rendered project; return the command's code.

    As compose's `run` (`cmd/compose/run.go`): a one-off container of `service` with `command`
    (else the service's), `env` as `-e K=V`, removed afterwards with `remove`, its dependencies
    started first unless `no_deps`, and its exit code returned. After SIGINT/SIGTERM it returns
    130/143 and the one-off container is removed (its dependencies stay, as with compose, until
    `down`).
    A mirrored service's container joins its sidecar's namespace, so the sidecar (and the agent,
    when it runs on this engine) are started and healthy first even with `no_deps`. No TTY is
    asked for when stdin is not a terminal. Raises `ConfigError` for an unknown service and
    `EngineError` when the sidecar cannot be started.
    """
    runtime.engine.client()
    loaded = load_project(options, runtime=runtime)
    rendered = _checked(options, [service], runtime=runtime, project=loaded)
    with _one_at_a_time(loaded, progress) as waited:
        if waited:
            rendered = _checked(options, [service], runtime=runtime, project=loaded)
        _write(rendered)
        for notice in rendered.notices:
            progress(notice)
        progress(f"target: {rendered.resolution.description}")
        rendered.backend.prepare(rendered.session, progress)
    ensure_images(rendered.images, force=build, progress=progress, runtime=runtime)
    _relink(rendered, progress=progress, runtime=runtime)
    project = rendered.compose_project()
    if no_deps and service in rendered.config.services:
        own = [compose.sidecar_name(service)] + [
            name for name in _own_services(rendered) if name == compose.AGENT_SERVICE
        ]
        code = runtime.engine.compose_run(project, ["up", "--detach", "--wait", "--no-deps", *own])
        if code != 0:
            if code in INTERRUPTED:
                return code
            raise EngineError(
                f"starting {', '.join(own)} failed (exit {code})",
                hint="see compose's output above; `composemirror down` removes what was created",
            )
    # compose leaves a one-off container running when it is stopped by a signal without a TTY;
    # a label of this run's own finds it then.
    token = secrets.token_hex(8)
    args = [
        "run",
        "--label",
        f"{RUN_LABEL}={token}",
        *(["--rm"] if remove else []),
        *(arg for pair in env for arg in ("-e", pair)),
        *(["--no-deps"] if no_deps else []),
        *(["--build"] if build else []),
        *([] if runtime.engine.stdin_is_terminal() else ["--no-TTY"]),
        service,
        *command,
    ]
    code = runtime.engine.compose_run(project, args)
    if code in INTERRUPTED:
        for line in runtime.engine.remove_labelled({RUN_LABEL: token}, volumes=False):
            progress(f"removed {line}")
    return code


RUN_LABEL = "io.composemirror.run"
"""On the one-off container of a `run`: that run's own token."""


@contextlib.contextmanager
def _build_context() -> Iterator[Path]:
    """A new private (0700) directory under the temporary directory for one image's build
    context, removed however the build ends.

    Its removal is in place before it exists: with `tempfile.TemporaryDirectory`, a Ctrl-C
    that lands between creating the directory and recording its name left it behind.
    """
    path = Path(tempfile.gettempdir()) / f"composemirror-build-{secrets.token_hex(8)}"
    try:
        path.mkdir(mode=0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ensure_images(
    specs: Sequence[images.ImageSpec], *, force: bool, progress: Progress, runtime: Runtime
) -> None:
    """Build each image that is missing (or all with `force`), showing the build's steps."""
    for spec in specs:
        if not force and runtime.engine.image_exists(spec.tag):
            continue
        progress(f"building {spec.tag} from {spec.base}")
        with _build_context() as context:
            images.write_context(spec, context)
            runtime.engine.build_image(
                context,
                spec.tag,
                buildargs={"BASE_IMAGE": spec.base},
                labels={compose.LABEL_VERSION: composemirror.__version__},
                progress=lambda line: progress("  " + line),
            )


def down(options: Options, *, volumes: bool, progress: Progress, runtime: Runtime) -> list[str]:
    """Remove everything of the project that composemirror, compose or the backend created.

    Idempotent. Without `-p`, this is the project the files name, as compose's `down` (other
    projects `up` started from the same directory are named, and left); when nothing of that
    one exists, every project `up` started from the same directory (found by compose's
    working-directory label), so a `-p` given only to `up` is no obstacle. The backend is
    the one the project's configuration names; when the project's files are gone (`-p NAME`),
    what is on this engine is removed, and a Kubernetes session recorded on this host for NAME
    (its forwarder, its Secrets and Jobs). `.composemirror/` goes only once nothing started
    from it remains.
    """
    engine = runtime.engine
    engine.client()
    first, directory, config = _identify(options, runtime)
    rendered = directory / RENDER_DIR / "compose.yaml"
    files = (rendered,) if rendered.is_file() else ()
    removed: list[str] = []
    folders = {directory / RENDER_DIR}
    names = _instances(first, directory, options, runtime)
    left: list[str] = []
    if len(names) > 1 and engine.containers({COMPOSE_PROJECT_LABEL: first}):
        names, left = [first], names[1:]  # as compose: the project the files name
    elif len(names) > 1:
        progress(
            f"taking down the projects `up` started from this directory: {', '.join(names[1:])}"
        )
    for name in names:
        # `-p NAME` from elsewhere: the rendered files are where compose ran, by its label.
        folders |= _render_dirs(name, runtime)
        engine.compose_down(ComposeProject(files=files, name=name), volumes=volumes)
        removed += engine.remove_labelled({compose.LABEL_PROJECT: name}, volumes=True)
        # compose down without files cannot know the project's networks; find them by label.
        removed += engine.remove_labelled({COMPOSE_PROJECT_LABEL: name}, volumes=volumes)
        if config is not None:
            removed += runtime.session_backend(config, name).teardown(
                name, directory, progress, config=config, context=options.context
            )
        elif (leftover := backends.recorded(name, runtime.environ, engine)) is not None:
            removed += leftover.teardown(name, directory, progress, context=options.context)
        # a local process: stopped whatever backend the configuration chooses now
        removed += backends.stop_forwarder(name, runtime.environ)
    for folder in sorted(folders):
        if folder.is_dir() and not _started_here(folder.parent, runtime):
            shutil.rmtree(folder, ignore_errors=True)
            progress(f"removed {folder}")
    if left:
        progress(
            f"also started from this directory, left running: {', '.join(left)} "
            "(`composemirror -p NAME down` takes one down)"
        )
    return removed


def _render_dirs(project: str, runtime: Runtime) -> set[Path]:
    """The `.composemirror/` folders compose ran `project` from (its working-directory label)."""
    found = set()
    for container in runtime.engine.containers({COMPOSE_PROJECT_LABEL: project}):
        label = container.labels.get(COMPOSE_WORKDIR_LABEL)
        if label and Path(label).name == RENDER_DIR:
            found.add(Path(label))
    return found


def status(options: Options, *, runtime: Runtime) -> tuple[str, list[ServiceStatus]]:
    """The project's containers, with each sidecar's own report.

    Without `-p`: the project the files name, or, when nothing of it exists, the one `up`
    started from this directory under another name (see `down`).
    """
    engine = runtime.engine
    engine.client()
    name, _ = shown_project(options, runtime=runtime)
    rows = []
    containers = engine.containers({COMPOSE_PROJECT_LABEL: name})
    for container in containers:
        role = container.labels.get(compose.LABEL_ROLE, "service")
        link: dict[str, Any] = {}
        if role == "sidecar" and container.state == "running":
            report = engine.exec_output(container.id, ["cat", STATUS_FILE])
            if report:
                link = json.loads(report)
        rows.append(
            ServiceStatus(
                service=container.labels.get(COMPOSE_SERVICE_LABEL, "?"),
                container=container.name,
                role=role,
                state=container.state,
                health=container.health,
                link=link,
                namespace=_namespace_check(container, containers, runtime),
            )
        )
    rows.sort(key=lambda r: (r.role != "agent", r.service))
    return name, rows


def shown_project(options: Options, *, runtime: Runtime) -> tuple[str, list[str]]:
    """The project `status` and `doctor` report on, and the other projects `up` started from
    the same directory (empty with `-p`).

    Without `-p`: the project the files name when something of it exists, else the first
    (by name) that `up` started from this directory under another `-p`.
    """
    first, directory, _ = _identify(options, runtime)
    instances = _instances(first, directory, options, runtime)
    name = first
    if not runtime.engine.containers({COMPOSE_PROJECT_LABEL: first}):
        name = next(iter(instances[1:]), first)
    return name, [n for n in instances[1:] if n != name]


def _namespace_check(
    container: Container, containers: Sequence[Container], runtime: Runtime
) -> Check | None:
    """For a running container that joins a sidecar's (or another service's) namespace: whether
    it is in that container's current one."""
    joined = namespaces.joined_id(container)
    if joined is None or container.state != "running":
        return None
    if container.labels.get(compose.LABEL_ROLE) == "agent":
        return None
    service = container.labels.get(COMPOSE_SERVICE_LABEL, container.name)
    name = f"network namespace of {service}"
    stale = _stale_join(container, containers, runtime)
    if stale is not None:
        return Check(
            name=name,
            ok=False,
            detail=stale.reason,
            hint=f"`composemirror up -d` recreates {service} in its sidecar's namespace",
        )
    owner = next((c for c in containers if c.id == joined), None)
    owner_service = owner.labels.get(COMPOSE_SERVICE_LABEL, owner.name) if owner else joined[:12]
    return Check(name=name, ok=True, detail=f"shares {owner_service}'s")


def session_state(options: Options, *, runtime: Runtime, project: str | None = None) -> list[Check]:
    """What the backend reports of `project`'s session (a forwarder, agents left behind);
    `project` defaults to the one the files name (pass the one `status` shows, which may have
    been started under another `-p`). Empty when the project's configuration is gone."""
    first, directory, config = _identify(options, runtime)
    if config is None:
        return []
    name = project or first
    checks: list[Check] = []
    sidecars = running_sidecars(name, runtime=runtime)
    _attempt_all(
        checks,
        "session",
        lambda: runtime.session_backend(config, name).inspect(
            config, name, directory, sidecars=sidecars
        ),
    )
    return checks


def running_sidecars(project: str, *, runtime: Runtime) -> list[str]:
    """The services of `project`'s sidecar containers that run on the engine, by name."""
    return sorted(
        c.labels.get(COMPOSE_SERVICE_LABEL, c.name)
        for c in runtime.engine.containers({COMPOSE_PROJECT_LABEL: project})
        if c.labels.get(compose.LABEL_ROLE) == "sidecar" and c.state == "running"
    )


def doctor(options: Options, *, runtime: Runtime) -> list[Check]:
    """Check what `up` needs, each independently, in the order it needs them.

    The backend's own checks run as soon as the configuration names a backend, so they can say
    why a target cannot be found when its cluster is the reason.
    """
    engine = runtime.engine
    checks: list[Check] = []
    _attempt(checks, "docker CLI", engine.docker_binary, str)
    engine_ok = _attempt(checks, "Docker engine", engine.engine_version, "engine {}".format)
    _attempt(checks, "compose plugin", engine.compose_version, "docker compose {}".format)
    project = _attempt(
        checks,
        "configuration",
        lambda: load_project(options, runtime=runtime),
        lambda p: f"{p.config.source}: mirrors {', '.join(p.config.services)}",
    )
    if project is None or engine_ok is None:
        return checks
    config = project.config
    backend = _attempt(checks, "backend", lambda: runtime.backend(config), lambda b: b.name)
    if backend is None:
        return checks
    checks.extend(backend.doctor(config))
    if any(c.name == "target" and not c.ok for c in checks):
        return checks  # the backend said why it cannot find the target
    own = [c for c in checks if c.name == "target"]
    rendered = _attempt(
        checks,
        "target",
        lambda: rewrite(project, backend, backend.resolve(config)),
        lambda r: r.resolution.description,
    )
    if rendered is None:
        return checks
    for line in own:  # one target line: this one, which also names the context
        checks.remove(line)
    shown, others = shown_project(options, runtime=runtime)
    if others:
        checks.append(
            Check(
                name="project",
                ok=True,
                detail=f"{shown}; also started from this directory: {', '.join(others)} "
                "(`-p NAME` checks one of them)",
            )
        )
    sidecars = running_sidecars(shown, runtime=runtime)
    _attempt_all(
        checks,
        "session",
        lambda: runtime.session_backend(config, shown).inspect(
            config, shown, project.directory, sidecars=sidecars
        ),
    )
    for spec in rendered.images:
        present = engine.image_exists(spec.tag)
        checks.append(
            Check(
                name=f"{spec.role} image",
                ok=True,
                detail=spec.tag if present else f"{spec.tag} (built by `up`)",
            )
        )
    _, rows = status(options, runtime=runtime)
    agents = [row for row in rows if row.role == "agent"]
    for row in rows:
        if row.role == "sidecar":
            checks.append(link_check(row, agents))
            checks.append(rules_check(row))
        if row.namespace is not None:
            checks.append(row.namespace)
    return checks


def link_check(row: ServiceStatus, agents: Sequence[ServiceStatus]) -> Check:
    """`doctor`'s check of a sidecar's link to the agent: failed unless it is `connected`;
    `agents` are the project's agent containers (none for a cluster backend)."""
    state = str(row.link.get("agent", "unknown"))
    return Check(
        name=f"agent link of {row.service}",
        ok=state == "connected",
        detail=state,
        hint=None if state == "connected" else _link_hint(row, agents),
    )


def link_failure(row: ServiceStatus, agents: Sequence[ServiceStatus]) -> Check | None:
    """`status`'s line for a sidecar whose link has been down for longer than its grace period
    (`composemirror.sidecar.status.LINK_GRACE`), which its container's health says
    (`unhealthy`: the healthcheck fails once the link is down past the grace); None while the
    link is connected or within its grace (a reconnect is not a failure)."""
    if row.role != "sidecar" or row.state != "running" or row.health != "unhealthy":
        return None
    check = link_check(row, agents)
    if check.ok:
        return None
    said = check.hint or "no error reported"
    return dataclasses.replace(
        check,
        hint=f"{said}; `composemirror doctor` checks each part of the way to the agent "
        "and says which to fix",
    )


def _link_hint(sidecar: ServiceStatus, agents: Sequence[ServiceStatus]) -> str | None:
    """What to do about a sidecar's broken link: when the project's agent container is not
    running, which one and how to start it again, with the sidecar's own error; else that
    error."""
    error = sidecar.link.get("error")
    down = [a for a in agents if a.state != "running"]
    if not down:
        return str(error) if error else None
    agent = down[0]
    said = f" (the sidecar says: {error})" if error else ""
    return (
        f"the agent container {agent.container} is {agent.state}{said}: run "
        f"`composemirror up -d` to start it again; `docker logs {agent.container}` says why "
        "it stopped"
    )


RULES_STALE_AFTER = 15.0
"""Seconds after which a sidecar's last check of its rules means it no longer checks them."""


def rules_check(row: ServiceStatus, *, now: float | None = None) -> Check:
    """Whether a sidecar's interception rules are in place, from its report's `rules` (see
    `composemirror.link.STATUS_FILE`): failed when they are missing, when the sidecar had to
    restore them (something else in the namespace removed them, so traffic went unfiltered
    meanwhile), or when it has not checked them for `RULES_STALE_AFTER` seconds. `now` is
    the Unix time (the sidecar's clock is the host's)."""
    name = f"interception rules of {row.service}"
    rules = row.link.get("rules")
    if row.state != "running" or not isinstance(rules, dict):
        return Check(name=name, ok=False, detail="no report from the sidecar")
    now = time.time() if now is None else now
    checked = float(rules.get("checked") or 0)
    restored = int(rules.get("restored") or 0)
    app = row.service.removesuffix(compose.SIDECAR_SUFFIX)
    if rules.get("state") != "in place":
        return Check(
            name=name,
            ok=False,
            detail=f"{rules.get('state')}: {rules.get('error') or rules.get('drift')}",
            hint=f"see `docker logs` of {row.container}",
        )
    if now - checked > RULES_STALE_AFTER:
        return Check(
            name=name,
            ok=False,
            detail=f"last checked {now - checked:.0f} s ago: the sidecar is not responding",
            hint=f"see `docker logs` of {row.container}",
        )
    if restored:
        when = time.strftime("%H:%M:%S UTC", time.gmtime(float(rules.get("restored_at") or 0)))
        return Check(
            name=name,
            ok=False,
            detail=f"restored {restored} time(s), last at {when}, after something in the "
            f"namespace removed them ({rules.get('drift')}); traffic went unfiltered meanwhile",
            hint=f"a process of {app} with NET_ADMIN changes the namespace's nat or mangle "
            f"table: keep it from flushing them, or drop NET_ADMIN from {app}",
        )
    return Check(name=name, ok=True, detail="in place")


def _attempt(
    checks: list[Check], name: str, probe: Callable[[], _T], describe: Callable[[_T], str]
) -> _T | None:
    """Run one check: its value, or None after recording why it failed."""
    try:
        value = probe()
    except ComposeMirrorError as e:
        checks.append(Check(name=name, ok=False, detail=e.message, hint=e.hint))
        return None
    checks.append(Check(name=name, ok=True, detail=describe(value)))
    return value


def _attempt_all(checks: list[Check], name: str, probe: Callable[[], list[Check]]) -> None:
    """Run a probe that returns checks; on failure, record why as one check."""
    try:
        checks.extend(probe())
    except ComposeMirrorError as e:
        checks.append(Check(name=name, ok=False, detail=e.message, hint=e.hint))


def compose_passthrough(
    options: Options, args: Sequence[str], *, progress: Progress, runtime: Runtime
) -> int:
    """`docker compose ARGS` on the rendered project; return compose's exit code.

    Like `up`, it first builds composemirror's images when they are missing (compose would try
    to pull them) and, for a command that starts containers (`up`, `run`, `create`, `start`,
    `restart`), prepares the backend.
    """
    rendered = render(options, write=True, runtime=runtime)
    command = next((a for a in args if not a.startswith("-")), "")
    if command in STARTING_COMMANDS:
        rendered.backend.prepare(rendered.session, progress)
    ensure_images(rendered.images, force=False, progress=progress, runtime=runtime)
    return runtime.engine.compose_run(rendered.compose_project(), args)


STARTING_COMMANDS = frozenset({"up", "run", "create", "start", "restart"})
"""compose commands that start containers: the backend is prepared before them."""


def sandbox(action: str, *, progress: Progress, runtime: Runtime) -> None:
    """`sandbox up` starts (or updates) the sandbox cluster; `sandbox down` removes it."""
    box = SandboxBackend(runtime.engine)
    if action == "up":
        box.start(base_image(runtime))
    elif action == "down":
        box.remove()
    else:
        raise ConfigError(f"sandbox {action!r}: use `sandbox up` or `sandbox down`")


def _write(rendered: Rendered) -> None:
    """Write the rendered project and, once per session, the tunnel key, into `.composemirror/`.

    The rendered file holds the target's imported environment (passwords, tokens): the folder is
    0700 and every file in it 0600, also when an earlier version left them more open.
    """
    folder = rendered.path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    _write_private(
        folder / ".gitignore", "# written by composemirror; `composemirror down` removes it\n*\n"
    )
    text = yaml.safe_dump(rendered.model, sort_keys=False, default_flow_style=False, width=1000)
    header = (
        "# Rendered by composemirror from the project's compose model; do not edit.\n"
        "# `composemirror config` prints it, `composemirror down` removes it.\n"
    )
    _write_private(rendered.path, header + text)
    if not rendered.key_file.exists():
        # A fresh secret per `up` (down removes it): the tunnel handshake proves both ends know it.
        fd = os.open(rendered.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key:
            key.write(secrets.token_hex(32) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Replace `path` with `text`, readable by its owner only (0600) from the first byte."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:  # mkstemp creates it 0600
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _discover(start: Path) -> tuple[Path, ...]:
    """The default compose file nearest `start`, with its override file if there is one."""
    for folder in (start, *start.parents):
        for name in COMPOSE_FILES:
            if (folder / name).is_file():
                overrides = [folder / o for o in OVERRIDE_FILES if (folder / o).is_file()]
                return (folder / name, *overrides[:1])
    raise ConfigError(
        f"no compose file in {start} or above it",
        hint="run in a directory with compose.yaml, or pass -f FILE (or set COMPOSE_FILE); "
        "`status` and `down` also take -p NAME alone, without files",
    )


def _load_config(options: Options, model: Mapping[str, Any], found: Discovery) -> Config:
    if options.config_file is not None:
        return _load_file(options.config_file)
    beside = found.directory / CONFIG_FILE_NAME
    if BLOCK in model:
        names = ", ".join(f.name for f in found.files) or "the compose file"
        if beside.is_file():
            # As compose warns of two compose files in one folder and uses the first.
            log.warning(
                "both %s and the %s block in %s configure composemirror: using the block, "
                "ignoring %s (remove one of them)",
                beside,
                BLOCK,
                names,
                CONFIG_FILE_NAME,
            )
        block = compose.unescape(model[BLOCK])
        return load(block, source=f"{BLOCK} in {names}", base_dir=found.directory)
    if beside.is_file():
        return _load_file(beside)
    raise ConfigError(
        "no composemirror configuration: the compose model has no x-composemirror block and "
        f"there is no {CONFIG_FILE_NAME} in {found.directory}",
        hint="add e.g. `x-composemirror: {target: deployment/checkout, namespace: shop, "
        "services: [web]}` to the compose file",
    )


def _load_file(path: Path) -> Config:
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(
            f"cannot read {path}: {e.strerror}", hint="check the path given to --config"
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason})",
            hint="give --config (or composemirror.yaml) a YAML file saved as UTF-8",
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except RecursionError:
        raise ConfigError(
            f"{path}: nested more than {MAX_DEPTH} levels deep",
            hint="flatten it: no composemirror key needs that depth",
        ) from None
    if isinstance(document, dict) and set(document) == {BLOCK}:
        document = document[BLOCK]
    return load(document, source=str(path), base_dir=path.resolve().parent)


def _with_flags(config: Config, options: Options, environ: Mapping[str, str]) -> Config:
    """`--context` and `-n` over the configuration's `kube_context` and `namespace`, and
    $COMPOSEMIRROR_AGENT_IMAGE over `agent.image` (a cluster with no registry: CI, air gaps)."""
    changes: dict[str, Any] = {}
    image = environ.get(AGENT_IMAGE_ENV)
    if image:
        changes["agent"] = dataclasses.replace(config.agent, image=image)
    if options.context is not None:
        changes["context"] = options.context
    if options.namespace is not None:
        changes["namespace"] = options.namespace
    return dataclasses.replace(config, **changes) if changes else config


def _read_env_file(config: Config) -> dict[str, str]:
    path = config.env.env_file
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(
            f"{config.source}: {BLOCK}.feature.env.env_file: {path} does not exist",
            hint="fix the path (relative paths start at the project directory)",
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(
            f"{config.source}: {BLOCK}.feature.env.env_file: cannot read {path}: {e.strerror}",
            hint="fix the path or the file's permissions",
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{config.source}: {BLOCK}.feature.env.env_file: {path} is not UTF-8 text "
            f"(byte {e.start}: {e.reason})",
            hint="an env file holds KEY=VALUE lines saved as UTF-8",
        ) from None
    values = dotenv.dotenv_values(stream=io.StringIO(text))
    return {k: v for k, v in values.items() if v is not None}


def _identify(options: Options, runtime: Runtime) -> tuple[str, Path, Config | None]:
    """The project's name, directory and configuration, from its files, or from `-p` alone
    when they are gone (then without a configuration)."""
    try:
        project = compose_project(options, images.DEFAULT_BASE, runtime)
        model = runtime.engine.compose_model(project)
        found = discover(options, runtime.environ)
    except ConfigError:
        if options.project_name is None:
            raise
        return options.project_name, (options.project_directory or Path.cwd()).resolve(), None
    try:
        config: Config | None = _with_flags(
            _load_config(options, model, found), options, runtime.environ
        )
    except ConfigError as e:
        log.debug("no configuration for %s: %s", model["name"], e)
        config = None
    return str(model["name"]), found.directory, config


def _started_here(directory: Path, runtime: Runtime) -> list[str]:
    """The names of the projects `up` started from `directory`, found by compose's own label.

    `up` runs compose on `.composemirror/compose.yaml`, so compose labels every container it
    creates with that folder as `com.docker.compose.project.working_dir`, whatever `-p` named
    the project; nothing else creates containers with that working directory.
    """
    labels = {COMPOSE_WORKDIR_LABEL: str(directory / RENDER_DIR)}
    found = runtime.engine.containers(labels)
    return sorted({c.labels.get(COMPOSE_PROJECT_LABEL, "") for c in found} - {""})


def _instances(name: str, directory: Path, options: Options, runtime: Runtime) -> list[str]:
    """The projects an identification stands for: with `-p`, that one; without it, the one the
    files name and every other project `up` started from the same directory (a `-p` given to
    `up` and not to `down` or `status`)."""
    if options.project_name is not None:
        return [name]
    return [name, *(n for n in _started_here(directory, runtime) if n != name)]
