"""The operations behind the CLI: render, up, down, status, doctor, compose passthrough, sandbox.

Each returns data (or a compose exit code) and prints nothing; progress goes through a callback.
They act through a `Runtime` (the engine, how a backend is chosen, the environment), which tests
replace with fakes, and know backends only by the `Backend` protocol. They find what composemirror
created by label, so an interrupted `up` leaves nothing that `down` cannot remove, and no state
file is kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dotenv
import yaml

import composemirror
from composemirror import backends, compose, images
from composemirror.backends import (
    RENDER_DIR,
    Backend,
    Check,
    Placement,
    Progress,
    Resolution,
    SessionInfo,
)
from composemirror.backends.sandbox import SandboxBackend
from composemirror.config import BLOCK, CONFIG_FILE_NAME, Config, load
from composemirror.engine import ComposeProject, Engine
from composemirror.errors import ComposeMirrorError, ConfigError, EngineError
from composemirror.link import STATUS_FILE

__all__ = ["Check", "Options", "Progress", "Project", "Rendered", "Runtime", "ServiceStatus"]

log = logging.getLogger(__name__)

COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
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
        return self.choose(config, self.environ, self.engine)


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
        return ComposeProject(files=(self.path,), name=self.name)


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
    """For sidecars: what the sidecar reports (agent link state, counters)."""


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
    """The user's project; with no `-f`, found as compose finds it (COMPOSE_FILE, then upwards)."""
    files = options.files
    if not files and not runtime.environ.get("COMPOSE_FILE"):
        files = (_discover(options.project_directory or Path.cwd()),)
    return ComposeProject(
        files=files,
        name=options.project_name,
        profiles=options.profiles,
        env_files=options.env_files,
        directory=options.project_directory,
        environment={images.BASE_ENV: base},
    )


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
    """The project's compose model and its composemirror configuration. No engine changes."""
    base = base_image(runtime)
    user = compose_project(options, base, runtime)
    model = runtime.engine.compose_model(user)
    directory = _project_directory(options, user, runtime)
    config = _with_flags(_load_config(options, model, user, directory), options, runtime.environ)
    return Project(
        name=str(model["name"]), directory=directory, model=model, config=config, base_image=base
    )


def render(options: Options, *, write: bool, runtime: Runtime) -> Rendered:
    """Load the project and its configuration, resolve the target, rewrite. No engine changes."""
    project = load_project(options, runtime=runtime)
    backend = runtime.backend(project.config)
    rendered = rewrite(project, backend, backend.resolve(project.config))
    if write:
        _write(rendered)
    return rendered


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
    notices = tuple(f"ignored (no effect at the network level): {key}" for key in config.ignored)
    return Rendered(
        name=project.name,
        directory=project.directory,
        model=_rewrite_model(project.model, config, session, specs, resolution.env),
        config=config,
        backend=backend,
        session=session,
        images=specs,
        base_image=project.base_image,
        source=project.model,
        notices=notices,
    )


def with_env(rendered: Rendered, remote_env: Mapping[str, str]) -> Rendered:
    """`rendered` with the target's environment replaced by `remote_env` (what the agent
    reported from the target process), the placement unchanged. Pure like `rewrite`."""
    model = _rewrite_model(
        rendered.source, rendered.config, rendered.session, rendered.images, remote_env
    )
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
        key_file=str(session.key_file),
        remote_env=remote_env,
        env_file=_read_env_file(config),
    )
    return compose.rewrite(dict(model), config, plan)


def up(
    options: Options,
    *,
    services: Sequence[str] = (),
    detach: bool = False,
    build: bool = False,
    progress: Progress,
    runtime: Runtime,
) -> int:
    """Render, prepare the backend, build missing images, and start the stack.

    When the backend reports the target's environment after `prepare` (the agent read the
    target process's), the project is rendered again with it before compose starts it. What
    lives only as long as this command (a forwarder) is released when it ends attached or
    fails; after a successful `up -d` it stays, for `down`.
    """
    runtime.engine.client()
    rendered = render(options, write=True, runtime=runtime)
    for notice in rendered.notices:
        progress(notice)
    progress(f"target: {rendered.resolution.description}")
    keep = False
    try:
        rendered.backend.prepare(rendered.session, progress)
        reported = rendered.backend.session_env(rendered.name)
        if reported is not None:
            rendered = with_env(rendered, reported)
            _write(rendered)
        ensure_images(rendered.images, force=build, progress=progress, runtime=runtime)
        args = ["up", *(["--detach"] if detach else []), *(["--build"] if build else [])]
        code = runtime.engine.compose_run(rendered.compose_project(), [*args, *services])
        keep = detach and code == 0
    finally:
        if not keep:
            rendered.backend.release(rendered.name, rendered.directory)
    if code == 0 or (not detach and code == 130):
        return 0
    raise EngineError(
        f"docker compose up failed (exit {code})",
        hint="see compose's output above; `composemirror down` removes what was created",
    )


def ensure_images(
    specs: Sequence[images.ImageSpec], *, force: bool, progress: Progress, runtime: Runtime
) -> None:
    """Build each image that is missing (or all with `force`), showing the build's steps."""
    for spec in specs:
        if not force and runtime.engine.image_exists(spec.tag):
            continue
        progress(f"building {spec.tag} from {spec.base}")
        with tempfile.TemporaryDirectory(prefix="composemirror-build-") as context:
            images.write_context(spec, Path(context))
            runtime.engine.build_image(
                Path(context),
                spec.tag,
                buildargs={"BASE_IMAGE": spec.base},
                labels={compose.LABEL_VERSION: composemirror.__version__},
                progress=lambda line: progress("  " + line),
            )


def down(options: Options, *, volumes: bool, progress: Progress, runtime: Runtime) -> list[str]:
    """Remove everything of the project that composemirror, compose or the backend created.

    Idempotent. The backend is the one the project's configuration names; when the project's
    files are gone (`-p NAME`), only what is on this engine is removed.
    """
    engine = runtime.engine
    engine.client()
    name, directory, config = _identify(options, runtime)
    rendered = directory / RENDER_DIR / "compose.yaml"
    files = (rendered,) if rendered.is_file() else ()
    engine.compose_down(ComposeProject(files=files, name=name), volumes=volumes)
    removed = engine.remove_labelled({compose.LABEL_PROJECT: name}, volumes=True)
    # compose down without files cannot know the project's networks; find them by its label.
    removed += engine.remove_labelled({COMPOSE_PROJECT_LABEL: name}, volumes=volumes)
    if config is not None:
        removed += runtime.backend(config).teardown(name, directory, progress)
    shutil.rmtree(directory / RENDER_DIR, ignore_errors=True)
    return removed


def status(options: Options, *, runtime: Runtime) -> tuple[str, list[ServiceStatus]]:
    """The project's containers, with each sidecar's own report."""
    engine = runtime.engine
    engine.client()
    name, _, _ = _identify(options, runtime)
    rows = []
    for container in engine.containers({COMPOSE_PROJECT_LABEL: name}):
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
            )
        )
    rows.sort(key=lambda r: (r.role != "agent", r.service))
    return name, rows


def session_state(options: Options, *, runtime: Runtime) -> list[Check]:
    """What the backend reports of the project's session (a forwarder, agents left behind);
    empty when the project's configuration is gone."""
    name, directory, config = _identify(options, runtime)
    if config is None:
        return []
    checks: list[Check] = []
    _attempt_all(
        checks, "session", lambda: runtime.backend(config).inspect(config, name, directory)
    )
    return checks


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
    rendered = _attempt(
        checks,
        "target",
        lambda: rewrite(project, backend, backend.resolve(config)),
        lambda r: r.resolution.description,
    )
    if rendered is None:
        return checks
    _attempt_all(
        checks, "session", lambda: backend.inspect(config, project.name, project.directory)
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
    for row in rows:
        if row.role == "sidecar":
            state = row.link.get("agent", "unknown")
            checks.append(
                Check(
                    name=f"agent link of {row.service}",
                    ok=state == "connected",
                    detail=state,
                    hint=None if state == "connected" else row.link.get("error"),
                )
            )
    return checks


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


def compose_passthrough(options: Options, args: Sequence[str], *, runtime: Runtime) -> int:
    """`docker compose ARGS` on the rendered project."""
    rendered = render(options, write=True, runtime=runtime)
    return runtime.engine.compose_run(rendered.compose_project(), args)


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
    folder = rendered.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text(
        "# written by composemirror; `composemirror down` removes it\n*\n"
    )
    text = yaml.safe_dump(rendered.model, sort_keys=False, default_flow_style=False, width=1000)
    header = (
        "# Rendered by composemirror from the project's compose model; do not edit.\n"
        "# `composemirror config` prints it, `composemirror down` removes it.\n"
    )
    rendered.path.write_text(header + text)
    if not rendered.key_file.exists():
        # A fresh secret per `up` (down removes it): the tunnel handshake proves both ends know it.
        fd = os.open(rendered.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key:
            key.write(secrets.token_hex(32) + "\n")


def _discover(start: Path) -> Path:
    for folder in (start.resolve(), *start.resolve().parents):
        for name in COMPOSE_FILES:
            if (folder / name).is_file():
                return folder / name
    raise ConfigError(
        f"no compose file in {start} or above it",
        hint="run in a directory with compose.yaml, or pass -f FILE",
    )


def _project_directory(options: Options, project: ComposeProject, runtime: Runtime) -> Path:
    if options.project_directory is not None:
        return options.project_directory.resolve()
    if project.files:
        return project.files[0].resolve().parent
    return Path(runtime.environ["COMPOSE_FILE"].split(os.pathsep)[0]).resolve().parent


def _load_config(
    options: Options, model: Mapping[str, Any], project: ComposeProject, directory: Path
) -> Config:
    if options.config_file is not None:
        return _load_file(options.config_file)
    if BLOCK in model:
        names = ", ".join(f.name for f in project.files) or "the compose file"
        block = compose.unescape(model[BLOCK])
        return load(block, source=f"{BLOCK} in {names}", base_dir=directory)
    beside = directory / CONFIG_FILE_NAME
    if beside.is_file():
        return _load_file(beside)
    raise ConfigError(
        "no composemirror configuration: the compose model has no x-composemirror block and "
        f"there is no {CONFIG_FILE_NAME} in {directory}",
        hint="add e.g. `x-composemirror: {target: deployment/checkout, namespace: shop, "
        "services: [web]}` to the compose file",
    )


def _load_file(path: Path) -> Config:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(
            f"cannot read {path}: {e.strerror}", hint="check the path given to --config"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
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
    return {k: v for k, v in dotenv.dotenv_values(path).items() if v is not None}


def _identify(options: Options, runtime: Runtime) -> tuple[str, Path, Config | None]:
    """The project's name, directory and configuration, from its files, or from `-p` alone
    when they are gone (then without a configuration)."""
    try:
        project = compose_project(options, images.DEFAULT_BASE, runtime)
        model = runtime.engine.compose_model(project)
    except ConfigError:
        if options.project_name is None:
            raise
        return options.project_name, (options.project_directory or Path.cwd()).resolve(), None
    directory = _project_directory(options, project, runtime)
    try:
        config: Config | None = _with_flags(
            _load_config(options, model, project, directory), options, runtime.environ
        )
    except ConfigError as e:
        log.debug("no configuration for %s: %s", model["name"], e)
        config = None
    return str(model["name"]), directory, config
