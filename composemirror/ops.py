"""The operations behind the CLI: render, up, down, status, doctor, compose passthrough.

Each returns data (or a compose exit code) and prints nothing; progress goes through a callback.
They find what composemirror created by label, so an interrupted `up` leaves nothing that `down`
cannot remove, and no state file is kept.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dotenv
import yaml

import composemirror
from composemirror import compose, engine, images
from composemirror.backends import Attachment, choose, sandbox
from composemirror.backends import docker as docker_backend
from composemirror.config import BLOCK, CONFIG_FILE_NAME, Config, load
from composemirror.errors import ComposeMirrorError, ConfigError, EngineError
from composemirror.sidecar.settings import STATUS_FILE

Progress = Callable[[str], None]
RENDER_DIR = ".composemirror"
COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """A rewritten project, ready for compose."""

    name: str
    directory: Path
    """The user's project directory; the rendered files live in its `.composemirror/`."""
    model: dict[str, Any]
    config: Config
    attachment: Attachment
    images: tuple[images.ImageSpec, ...]
    base_image: str
    notices: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return self.directory / RENDER_DIR / "compose.yaml"

    @property
    def key_file(self) -> Path:
        return self.directory / RENDER_DIR / "tunnel.key"

    def compose_project(self) -> engine.ComposeProject:
        return engine.ComposeProject(files=(self.path,), name=self.name)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One line of `doctor`."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None


def base_image() -> str:
    """The base for composemirror's images: $COMPOSEMIRROR_BASE_IMAGE, the local one, or public."""
    chosen = os.environ.get(images.BASE_ENV)
    if chosen:
        return chosen
    try:
        if engine.image_exists(images.LOCAL_BASE):
            return images.LOCAL_BASE
    except EngineError:
        pass
    return images.DEFAULT_BASE


def compose_project(options: Options, base: str) -> engine.ComposeProject:
    """The user's project; with no `-f`, found as compose finds it (COMPOSE_FILE, then upwards)."""
    files = options.files
    if not files and not os.environ.get("COMPOSE_FILE"):
        files = (_discover(options.project_directory or Path.cwd()),)
    return engine.ComposeProject(
        files=files,
        name=options.project_name,
        profiles=options.profiles,
        env_files=options.env_files,
        directory=options.project_directory,
        environment={images.BASE_ENV: base},
    )


def render(options: Options, *, write: bool) -> Rendered:
    """Load the project and its configuration, resolve the target, rewrite. No engine changes."""
    base = base_image()
    user = compose_project(options, base)
    model = engine.compose_model(user)
    directory = _project_directory(options, user)
    config = _load_config(options, model, user, directory)
    environment = {images.BASE_ENV: base}
    backend = choose(config)
    if backend == "docker":
        attachment = docker_backend.attach(config.target)
    else:
        attachment = sandbox.attach(config.target, config.namespace, environment)
    specs = tuple(images.spec(role, base) for role in images.ROLES)
    plan = compose.Plan(
        version=composemirror.__version__,
        sidecar_image=specs[0].tag,
        agent_image=specs[1].tag,
        agent_network_mode=attachment.network_mode,
        key_file=str(directory / RENDER_DIR / "tunnel.key"),
        remote_env=attachment.env,
        env_file=_read_env_file(config),
    )
    rendered_model = compose.rewrite(model, config, plan)
    notices = tuple(f"ignored (no effect at the network level): {key}" for key in config.ignored)
    rendered = Rendered(
        name=str(model["name"]),
        directory=directory,
        model=rendered_model,
        config=config,
        attachment=attachment,
        images=specs,
        base_image=base,
        notices=notices,
    )
    if write:
        _write(rendered)
    return rendered


def up(
    options: Options,
    *,
    services: Sequence[str] = (),
    detach: bool = False,
    build: bool = False,
    progress: Progress,
) -> int:
    """Render, build missing images, start the sandbox if it is the target, and start the stack."""
    engine.client()
    rendered = render(options, write=True)
    for notice in rendered.notices:
        progress(notice)
    progress(f"target: {rendered.attachment.description}")
    environment = {images.BASE_ENV: rendered.base_image}
    if rendered.attachment.backend == "sandbox" and not sandbox.is_up(environment):
        progress("starting the sandbox cluster")
        sandbox.ensure_up(environment)
    ensure_images(rendered.images, force=build, progress=progress)
    args = ["up", *(["--detach"] if detach else []), *(["--build"] if build else []), *services]
    code = engine.compose_run(rendered.compose_project(), args)
    if code == 0 or (not detach and code == 130):
        return 0
    raise EngineError(f"docker compose up failed (exit {code})",
                      hint="see compose's output above; `composemirror down` removes what "
                           "was created")


def ensure_images(specs: Sequence[images.ImageSpec], *, force: bool, progress: Progress) -> None:
    """Build each image that is missing (or all with `force`), showing the build's steps."""
    for spec in specs:
        if not force and engine.image_exists(spec.tag):
            continue
        progress(f"building {spec.tag} from {spec.base}")
        with tempfile.TemporaryDirectory(prefix="composemirror-build-") as context:
            images.write_context(spec, Path(context))
            engine.build_image(
                Path(context), spec.tag,
                buildargs={"BASE_IMAGE": spec.base},
                labels={compose.LABEL_VERSION: composemirror.__version__},
                progress=lambda line: progress("  " + line),
            )


def down(options: Options, *, volumes: bool) -> list[str]:
    """Remove everything of the project that composemirror or compose created. Idempotent."""
    engine.client()
    name, directory = _identify(options)
    rendered = directory / RENDER_DIR / "compose.yaml"
    files = (rendered,) if rendered.is_file() else ()
    engine.compose_down(engine.ComposeProject(files=files, name=name), volumes=volumes)
    removed = engine.remove_labelled({compose.LABEL_PROJECT: name}, volumes=True)
    # compose down without files cannot know the project's networks; find them by its label.
    removed += engine.remove_labelled({COMPOSE_PROJECT_LABEL: name}, volumes=volumes)
    shutil.rmtree(directory / RENDER_DIR, ignore_errors=True)
    return removed


def status(options: Options) -> tuple[str, list[ServiceStatus]]:
    """The project's containers, with each sidecar's own report."""
    engine.client()
    name, _ = _identify(options)
    rows = []
    for container in engine.containers({COMPOSE_PROJECT_LABEL: name}):
        role = container.labels.get(compose.LABEL_ROLE, "service")
        link: dict[str, Any] = {}
        if role == "sidecar" and container.state == "running":
            report = engine.exec_output(container.id, ["cat", STATUS_FILE])
            if report:
                link = json.loads(report)
        rows.append(ServiceStatus(
            service=container.labels.get(COMPOSE_SERVICE_LABEL, "?"),
            container=container.name,
            role=role,
            state=container.state,
            health=container.health,
            link=link,
        ))
    rows.sort(key=lambda r: (r.role != "agent", r.service))
    return name, rows


def doctor(options: Options) -> list[Check]:
    """Check what `up` needs, each independently, in the order it needs them."""
    checks = []

    def check(name: str, probe: Callable[[], str]) -> bool:
        try:
            checks.append(Check(name=name, ok=True, detail=probe()))
        except ComposeMirrorError as e:
            checks.append(Check(name=name, ok=False, detail=e.message, hint=e.hint))
            return False
        return True

    check("docker CLI", engine.docker_binary)
    engine_ok = check("Docker engine", lambda: f"engine {engine.engine_version()}")
    check("compose plugin", lambda: f"docker compose {engine.compose_version()}")
    rendered: list[Rendered] = []

    def configuration() -> str:
        rendered.append(render(options, write=False))
        mirrored = ", ".join(rendered[0].config.services)
        return f"{rendered[0].config.source}: mirrors {mirrored}"

    if check("configuration", configuration) and engine_ok:
        result = rendered[0]
        check("target", lambda: result.attachment.description)
        for spec in result.images:
            present = engine.image_exists(spec.tag)
            checks.append(Check(name=f"{spec.role} image", ok=True,
                                detail=spec.tag if present else f"{spec.tag} (built by `up`)"))
        _, rows = status(options)
        for row in rows:
            if row.role == "sidecar":
                state = row.link.get("agent", "unknown")
                checks.append(Check(
                    name=f"agent link of {row.service}", ok=state == "connected",
                    detail=state, hint=None if state == "connected" else row.link.get("error"),
                ))
    return checks


def compose_passthrough(options: Options, args: Sequence[str]) -> int:
    """`docker compose ARGS` on the rendered project."""
    rendered = render(options, write=True)
    return engine.compose_run(rendered.compose_project(), args)


def _write(rendered: Rendered) -> None:
    folder = rendered.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("# written by composemirror; `composemirror down` "
                                       "removes it\n*\n")
    text = yaml.safe_dump(rendered.model, sort_keys=False, default_flow_style=False, width=1000)
    header = ("# Rendered by composemirror from the project's compose model; do not edit.\n"
              "# `composemirror config` prints it, `composemirror down` removes it.\n")
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
    raise ConfigError(f"no compose file in {start} or above it",
                      hint="run in a directory with compose.yaml, or pass -f FILE")


def _project_directory(options: Options, project: engine.ComposeProject) -> Path:
    if options.project_directory is not None:
        return options.project_directory.resolve()
    if project.files:
        return project.files[0].resolve().parent
    return Path(os.environ["COMPOSE_FILE"].split(os.pathsep)[0]).resolve().parent


def _load_config(
    options: Options, model: Mapping[str, Any], project: engine.ComposeProject, directory: Path
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
        raise ConfigError(f"cannot read {path}: {e.strerror}",
                          hint="check the path given to --config") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if isinstance(document, dict) and set(document) == {BLOCK}:
        document = document[BLOCK]
    return load(document, source=str(path), base_dir=path.resolve().parent)


def _read_env_file(config: Config) -> dict[str, str]:
    path = config.env.env_file
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"{config.source}: {BLOCK}.feature.env.env_file: {path} does not exist",
                          hint="fix the path (relative paths start at the project directory)")
    return {k: v for k, v in dotenv.dotenv_values(path).items() if v is not None}


def _identify(options: Options) -> tuple[str, Path]:
    """The project's name and directory, from its files, or from `-p` when they are gone."""
    try:
        project = compose_project(options, images.DEFAULT_BASE)
        model = engine.compose_model(project)
        return str(model["name"]), _project_directory(options, project)
    except ConfigError:
        if options.project_name is None:
            raise
        return options.project_name, (options.project_directory or Path.cwd()).resolve()
