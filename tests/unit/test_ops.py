"""The operations in-process, on a fake engine and a fake backend: what is rendered, in which order
things are prepared, built and started, what `down` removes, and what `status` and `doctor` say."""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemirror import compose, images, ops
from composemirror.backends import Check, ForwardedPlacement, SessionInfo
from composemirror.backends.kubernetes import forwarder, state
from composemirror.engine import ComposeProject
from composemirror.errors import ClusterError, ConfigError, EngineError
from composemirror.fakes import FakeBackend, FakeEngine
from composemirror.link import ENV_VAR, LinkAddress, SidecarSettings
from tests.unit.conftest import MODEL, Project


def up(project: Project, **kwargs: Any) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = ops.up(project.options, progress=lines.append, runtime=project.runtime, **kwargs)
    return code, lines


# -- render --------------------------------------------------------------------------------------


def test_render_writes_the_rewritten_project_and_a_private_key(project: Project) -> None:
    rendered = ops.render(project.options, write=True, runtime=project.runtime)
    assert rendered.name == "shop"
    assert rendered.path == project.render_dir / "compose.yaml"
    written = yaml.safe_load(rendered.path.read_text())
    assert written == rendered.model
    assert set(written["services"]) == {"web", "web-mirror", "db", compose.AGENT_SERVICE}
    assert written["services"][compose.AGENT_SERVICE]["network_mode"] == "container:fake-target"
    assert written["services"]["web"]["environment"] == {"FROM_TARGET": "yes", "APP_MODE": "local"}
    # The key reaches compose as a variable (copied into the containers, never bind-mounted)
    assert written["secrets"][compose.KEY_SECRET] == {"environment": compose.KEY_ENV}
    key = project.render_dir / "tunnel-shop.key"
    assert len(key.read_text().strip()) == 64
    assert rendered.compose_project().process_env()[compose.KEY_ENV] == key.read_text().strip()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (project.render_dir / ".gitignore").read_text().endswith("*\n")
    assert rendered.path.read_text().startswith("# Rendered by composemirror")


def test_render_keeps_the_key_of_the_running_session(project: Project) -> None:
    ops.render(project.options, write=True, runtime=project.runtime)
    key = (project.render_dir / "tunnel-shop.key").read_text()
    ops.render(project.options, write=True, runtime=project.runtime)
    assert (project.render_dir / "tunnel-shop.key").read_text() == key


def test_render_without_write_touches_nothing(project: Project) -> None:
    rendered = ops.render(project.options, write=False, runtime=project.runtime)
    assert "web-mirror" in rendered.model["services"]
    assert not project.render_dir.exists()
    assert project.engine.runs == [] and project.engine.builds == []


def test_render_asks_the_backend_to_resolve_then_place(project: Project) -> None:
    rendered = ops.render(project.options, write=False, runtime=project.runtime)
    assert [name for name, _ in project.backend.calls] == ["resolve", "place"]
    assert rendered.session.project == "shop"
    assert rendered.session.directory == project.folder
    assert rendered.session.key_file == project.render_dir / "tunnel-shop.key"
    assert rendered.placement == project.backend.placement
    assert rendered.resolution == project.backend.resolution


def test_a_forwarded_agent_is_no_service_of_the_project(project: Project) -> None:
    project.backend.placement = ForwardedPlacement(
        link=LinkAddress.parse("tcp:host.docker.internal:41000"),
        extra_hosts={"host.docker.internal": "host-gateway"},
    )
    model = ops.render(project.options, write=False, runtime=project.runtime).model
    assert compose.AGENT_SERVICE not in model["services"]
    sidecar = model["services"]["web-mirror"]
    settings = SidecarSettings.from_json(sidecar["environment"][ENV_VAR])
    assert str(settings.link) == "tcp:host.docker.internal:41000"
    assert sidecar["extra_hosts"] == ["host.docker.internal=host-gateway"]


def test_ignored_mirrord_keys_are_noticed(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    model["x-composemirror"]["feature"] = {"fs": "read"}
    project.set_model(model)
    rendered = ops.render(project.options, write=False, runtime=project.runtime)
    assert rendered.notices == (
        "ignored (no effect at the network level): x-composemirror.feature.fs",
    )


def test_a_target_that_cannot_be_found_is_the_backends_error(project: Project) -> None:
    project.backend.error = ClusterError("no such deployment", hint="check the name")
    with pytest.raises(ClusterError, match="no such deployment"):
        ops.render(project.options, write=True, runtime=project.runtime)
    assert not project.render_dir.exists()


# -- where the configuration comes from --------------------------------------------------------


def without_block(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    del model["x-composemirror"]
    project.set_model(model)


def test_configuration_beside_the_compose_file(project: Project) -> None:
    without_block(project)
    (project.folder / "composemirror.yaml").write_text(
        "target: deployment/checkout\nnamespace: shop\nservices: [web]\n"
    )
    rendered = ops.render(project.options, write=False, runtime=project.runtime)
    assert rendered.config.source == str(project.folder / "composemirror.yaml")


def test_configuration_beside_a_compose_file_with_a_block_is_named_in_a_warning(
    project: Project, caplog: pytest.LogCaptureFixture
) -> None:
    """Both configure composemirror: the block is used and the ignored file named, as compose
    warns of two compose files in one folder and says which one it uses."""
    (project.folder / "composemirror.yaml").write_text(
        "target: deployment/other\nnamespace: shop\nservices: [web]\n"
    )
    rendered = ops.render(project.options, write=False, runtime=project.runtime)
    assert rendered.config.target.name == "checkout"
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert str(project.folder / "composemirror.yaml") in warning
    assert "using the block, ignoring composemirror.yaml" in warning


def test_configuration_from_a_mirrord_file(project: Project, tmp_path: Path) -> None:
    without_block(project)
    config_file = tmp_path / "mirrord.yaml"
    config_file.write_text("x-composemirror:\n  target: deployment/checkout\n  services: [web]\n")
    options = ops.Options(files=(project.file,), config_file=config_file)
    rendered = ops.render(options, write=False, runtime=project.runtime)
    assert rendered.config.services == ("web",)


def test_no_configuration_at_all(project: Project) -> None:
    without_block(project)
    with pytest.raises(ConfigError) as caught:
        ops.render(project.options, write=False, runtime=project.runtime)
    assert "no composemirror configuration" in caught.value.message
    assert caught.value.hint is not None and "x-composemirror" in caught.value.hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read"),
        ("target: [\n", "not valid YAML"),
    ],
)
def test_a_config_file_that_cannot_be_read(
    project: Project, tmp_path: Path, text: str | None, message: str
) -> None:
    config_file = tmp_path / "broken.yaml"
    if text is not None:
        config_file.write_text(text)
    options = ops.Options(files=(project.file,), config_file=config_file)
    with pytest.raises(ConfigError, match=message):
        ops.render(options, write=False, runtime=project.runtime)


def test_env_file_values_reach_the_app(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    model["x-composemirror"]["feature"] = {"env": {"env_file": "app.env"}}
    project.set_model(model)
    (project.folder / "app.env").write_text("QUEUE=jobs\n")
    env = ops.render(project.options, write=False, runtime=project.runtime).model["services"][
        "web"
    ]["environment"]
    assert env["QUEUE"] == "jobs"
    (project.folder / "app.env").unlink()
    with pytest.raises(ConfigError, match=r"app\.env does not exist"):
        ops.render(project.options, write=False, runtime=project.runtime)


def test_without_f_no_file_is_passed_so_compose_loads_its_own(project: Project) -> None:
    nested = project.folder / "src" / "deep"
    nested.mkdir(parents=True)
    found = ops.compose_project(ops.Options(project_directory=nested), "base", project.runtime)
    # one -f would turn off compose's own loading of compose.override.yaml
    assert found.files == ()
    assert found.environment == {images.BASE_ENV: "base"}
    loaded = ops.load_project(
        ops.Options(project_directory=project.folder), runtime=project.runtime
    )
    assert (loaded.name, loaded.directory) == ("shop", project.folder)


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


DISCOVERY = {
    # case: (files in the folder, environment, the files compose loads, project directory)
    "default file": ({"compose.yaml": ""}, {}, ["compose.yaml"], "."),
    "override file beside it": (
        {"compose.yaml": "", "compose.override.yaml": "", "sub/x": ""},
        {},
        ["compose.yaml", "compose.override.yaml"],
        ".",
    ),
    "compose's order of names": (
        {"docker-compose.yaml": "", "docker-compose.yml": "", "docker-compose.override.yml": ""},
        {},
        ["docker-compose.yml", "docker-compose.override.yml"],
        ".",
    ),
    "COMPOSE_FILE in the environment": (
        {"compose.yaml": "", "ci/a.yaml": "", "ci/b.yaml": ""},
        {"COMPOSE_FILE": "ci/a.yaml:ci/b.yaml"},
        ["ci/a.yaml", "ci/b.yaml"],
        "ci",
    ),
    "COMPOSE_FILE in .env": (
        {".env": "COMPOSE_FILE=ci/a.yaml:compose.yaml\n", "compose.yaml": "", "ci/a.yaml": ""},
        {},
        ["ci/a.yaml", "compose.yaml"],
        "ci",
    ),
    "COMPOSE_DISABLE_ENV_FILE": (
        {".env": "COMPOSE_FILE=a.yaml\n", "a.yaml": "", "compose.yaml": ""},
        {"COMPOSE_DISABLE_ENV_FILE": "true"},
        ["compose.yaml"],
        ".",
    ),
    "the environment wins over .env": (
        {".env": "COMPOSE_FILE=a.yaml\n", "a.yaml": "", "b.yaml": ""},
        {"COMPOSE_FILE": "b.yaml"},
        ["b.yaml"],
        ".",
    ),
    "COMPOSE_PATH_SEPARATOR": (
        {
            ".env": "COMPOSE_PATH_SEPARATOR=;\nCOMPOSE_FILE=a.yaml;b.yaml\n",
            "a.yaml": "",
            "b.yaml": "",
        },
        {},
        ["a.yaml", "b.yaml"],
        ".",
    ),
}


@pytest.mark.parametrize("case", DISCOVERY, ids=list(DISCOVERY))
def test_discovery_finds_what_compose_loads(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, environ, expected, directory = DISCOVERY[case]
    write(tmp_path, files)
    monkeypatch.chdir(tmp_path)  # COMPOSE_FILE's relative paths start here, as in compose
    found = ops.discover(ops.Options(), environ)
    assert found.files == tuple(tmp_path / f for f in expected)
    assert found.directory == (tmp_path / directory).resolve()


def test_discovery_searches_upwards_and_flags_win(tmp_path: Path) -> None:
    write(tmp_path, {"compose.yml": "", "compose.override.yml": "", "other.yaml": ""})
    (tmp_path / "a" / "b").mkdir(parents=True)
    found = ops.discover(ops.Options(project_directory=tmp_path / "a" / "b"), {})
    assert found.files == (tmp_path / "compose.yml", tmp_path / "compose.override.yml")
    assert found.directory == tmp_path / "a" / "b"
    given = ops.Options(files=(tmp_path / "other.yaml",))
    assert ops.discover(given, {"COMPOSE_FILE": "x.yaml"}).files == (tmp_path / "other.yaml",)
    env_file = tmp_path / "ci.env"
    env_file.write_text("COMPOSE_FILE=other.yaml\n")
    with_env_file = ops.Options(project_directory=tmp_path, env_files=(env_file,))
    assert ops.discover(with_env_file, {}).files == (Path("other.yaml").resolve(),)


def test_the_configuration_may_live_in_the_override_file(project: Project) -> None:
    override = project.folder / "compose.override.yaml"
    override.write_text("# x-composemirror lives here; compose merges it into the model\n")
    rendered = ops.render(
        ops.Options(project_directory=project.folder), write=False, runtime=project.runtime
    )
    assert rendered.config.source == "x-composemirror in compose.yaml, compose.override.yaml"


def test_no_compose_file_anywhere(tmp_path: Path, project: Project) -> None:
    with pytest.raises(ConfigError) as caught:
        ops.compose_project(ops.Options(project_directory=tmp_path), "base", project.runtime)
    assert caught.value.hint == (
        "run in a directory with compose.yaml, or pass -f FILE (or set COMPOSE_FILE); "
        "`status` and `down` also take -p NAME alone, without files"
    )


def test_a_mirrored_service_under_an_inactive_profile(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    model["services"]["web"]["profiles"] = ["dev", "debug"]
    project.set_model(model)
    with pytest.raises(ConfigError) as caught:
        ops.render(project.options, write=False, runtime=project.runtime)
    assert "'web' belongs to profile 'dev' or 'debug', which is not active" in caught.value.message
    assert caught.value.hint == "enable it with --profile dev or COMPOSE_PROFILES=dev"
    active = ops.Options(files=(project.file,), profiles=("debug",))
    assert (
        "web-mirror" in ops.render(active, write=False, runtime=project.runtime).model["services"]
    )


def test_a_service_missing_from_every_profile_is_the_rewrites_error(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    model["x-composemirror"]["services"] = ["wbe"]
    project.set_model(model)
    with pytest.raises(ConfigError, match="'wbe' is not a service of this project"):
        ops.render(project.options, write=False, runtime=project.runtime)


@pytest.mark.parametrize(
    ("environ", "local", "expected"),
    [
        ({images.BASE_ENV: "my/base:1"}, True, "my/base:1"),
        ({}, True, images.LOCAL_BASE),
        ({}, False, images.DEFAULT_BASE),
    ],
)
def test_base_image(environ: dict[str, str], local: bool, expected: str) -> None:
    engine = FakeEngine(images=[images.LOCAL_BASE] if local else [])
    assert ops.base_image(ops.Runtime(engine=engine, environ=environ)) == expected


def test_base_image_without_an_engine_is_the_public_one() -> None:
    runtime = ops.Runtime(engine=FakeEngine(reachable=False), environ={})
    assert ops.base_image(runtime) == images.DEFAULT_BASE


# -- up ------------------------------------------------------------------------------------------


def test_up_prepares_builds_and_starts_in_that_order(project: Project) -> None:
    code, lines = up(project, detach=True)
    assert code == 0
    assert lines[0] == "target: fake target"
    assert lines[1] == "prepared fake-target"
    assert [line for line in lines if line.startswith("building")] == [
        f"building {spec.tag} from {spec.base}"
        for spec in (images.spec(role, images.DEFAULT_BASE) for role in images.ROLES)
    ]
    assert "  Successfully tagged " + images.spec("agent", images.DEFAULT_BASE).tag in lines
    assert project.engine.commands() == [["up", "--detach"]]
    ((compose_project, _),) = project.engine.runs
    assert compose_project.files == (project.render_dir / "compose.yaml",)
    assert compose_project.name == "shop"
    [prepared] = [arg for call, arg in project.backend.calls if call == "prepare"]
    assert isinstance(prepared, SessionInfo)
    assert prepared.placement == project.backend.placement
    assert prepared.key_file.is_file()  # written before the backend prepares
    assert ("release", "shop") not in project.backend.calls  # up -d: the session stays


def test_up_renders_again_with_the_env_the_agent_reported(project: Project) -> None:
    project.backend.reported_env = {"FROM_TARGET": "from-the-process", "ONLY_IN_PROCESS": "1"}
    code, _ = up(project, detach=True)
    assert code == 0
    rendered = yaml.safe_load((project.render_dir / "compose.yaml").read_text())
    env = rendered["services"]["web"]["environment"]
    assert env["FROM_TARGET"] == "from-the-process" and env["ONLY_IN_PROCESS"] == "1"


def test_an_attached_up_releases_the_session_when_it_ends(project: Project) -> None:
    code, _ = up(project, detach=False)
    assert code == 0
    assert project.backend.calls[-1] == ("release", "shop")


def test_a_failed_up_releases_the_session(project: Project) -> None:
    project.engine.exit_codes["up"] = 1
    with pytest.raises(EngineError):
        up(project, detach=True)
    assert project.backend.calls[-1] == ("release", "shop")


def test_up_builds_only_missing_images(project: Project) -> None:
    up(project, detach=True)
    builds = len(project.engine.builds)
    assert builds == 2
    build = project.engine.builds[0]
    assert build.buildargs == {"BASE_IMAGE": images.DEFAULT_BASE}
    assert "Dockerfile" in build.files and "site/composemirror/link.py" in build.files
    up(project, detach=True)
    assert len(project.engine.builds) == builds
    up(project, detach=True, build=True)
    assert len(project.engine.builds) == 2 * builds
    assert project.engine.commands()[-1] == ["up", "--detach", "--build"]


def test_up_starts_the_named_services(project: Project) -> None:
    up(project, services=["web"])
    assert project.engine.commands() == [["up", "web"]]


def test_up_creates_the_rewritten_services(project: Project) -> None:
    up(project, detach=True)
    roles = {c.name: c.labels.get(compose.LABEL_ROLE) for c in project.engine.running}
    assert roles == {
        "shop-web-1": "app",
        "shop-web-mirror-1": "sidecar",
        "shop-db-1": None,
        "shop-composemirror-agent-1": "agent",
    }


def test_up_failing_in_compose(project: Project) -> None:
    project.engine.exit_codes["up"] = 1
    with pytest.raises(EngineError) as caught:
        up(project, detach=True)
    assert caught.value.message == "docker compose up failed (exit 1)"
    assert caught.value.hint is not None and "composemirror down" in caught.value.hint


@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_up_exits_as_compose_does(project: Project, code: int) -> None:
    project.engine.exit_codes["up"] = code
    assert up(project)[0] == code
    assert up(project, detach=True)[0] == code
    # A signal while compose creates and starts containers leaves some running: stopped.
    assert project.engine.commands() == [["up"], ["stop"], ["up", "--detach"], ["stop"]]


def test_a_concurrent_up_of_the_project_waits_until_the_first_has_prepared(
    project: Project,
) -> None:
    """Another `up` holds the project's lock: this one says so, renders nothing meanwhile,
    and goes on when the lock is free."""
    project.render_dir.mkdir(mode=0o700)
    held = os.open(project.render_dir / "shop.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    lines: list[str] = []
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            ops.up(project.options, progress=lines.append, runtime=project.runtime, detach=True)
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert lines == ["waiting for another `up` of project shop to prepare its session"]
        assert not (project.render_dir / "compose.yaml").exists()
    finally:
        os.close(held)
    thread.join(timeout=10)
    assert result == [0]
    assert (project.render_dir / "compose.yaml").exists()


@pytest.mark.parametrize("code", [0, 7])
def test_up_exit_code_from_returns_the_jobs_code_and_ignores_composemirrors_own(
    project: Project, code: int
) -> None:
    project.engine.exit_codes["up"] = code
    flags = ops.UpFlags(exit_code_from="web")
    assert up(project, services=["web"], flags=flags)[0] == code
    (args,) = project.engine.commands()
    assert args[args.index("--exit-code-from") + 1] == "web"
    assert "--abort-on-container-exit" in args
    ignored = {a.removeprefix("--no-attach=") for a in args if a.startswith("--no-attach=")}
    assert ignored == {"web-mirror", compose.AGENT_SERVICE}
    assert args[-1] == "web"


def test_up_passes_composes_own_options_through(project: Project) -> None:
    flags = ops.UpFlags(
        wait=True, wait_timeout=30, no_build=True, quiet_pull=True, remove_orphans=True
    )
    assert up(project, detach=True, flags=flags)[0] == 0
    (args,) = project.engine.commands()
    assert args == [
        "up",
        "--detach",
        "--wait",
        "--wait-timeout",
        "30",
        "--no-build",
        "--quiet-pull",
        "--remove-orphans",
    ]
    assert not any(a.startswith("--no-attach") for a in args)


def test_abort_on_container_exit_passes_composes_code(project: Project) -> None:
    project.engine.exit_codes["up"] = 5
    assert up(project, flags=ops.UpFlags(abort_on_container_exit=True))[0] == 5


# -- run -----------------------------------------------------------------------------------------


def run(project: Project, *args: Any, **kwargs: Any) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = ops.run(project.options, *args, progress=lines.append, runtime=project.runtime, **kwargs)
    return code, lines


@pytest.mark.parametrize("code", [0, 3])
def test_run_returns_the_commands_exit_code_without_a_tty(project: Project, code: int) -> None:
    project.engine.exit_codes["run"] = code
    result, lines = run(project, "web", ["pytest", "-x"], remove=True, env=["A=1", "B=2"])
    assert result == code
    assert "target: fake target" in lines
    assert [c for c, _ in project.backend.calls].count("prepare") == 1
    assert {b.tag for b in project.engine.builds}  # composemirror's images were built first
    ((compose_project, args),) = project.engine.runs
    assert args[:2] == ["run", "--label"] and args[2].startswith(ops.RUN_LABEL + "=")
    assert args[3:] == ["--rm", "-e", "A=1", "-e", "B=2", "--no-TTY", "web", "pytest", "-x"]
    assert compose.KEY_ENV in compose_project.overrides


@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_run_removes_its_one_off_container(
    project: Project, code: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.engine.exit_codes["run"] = code
    other = project.engine.add_container("shop-web-run-1", labels={ops.RUN_LABEL: "other"})
    original = project.engine.compose_run

    def run_starting_a_container(compose_project: ComposeProject, args: Sequence[str]) -> int:
        label = args[args.index("--label") + 1]
        key, _, value = label.partition("=")
        project.engine.add_container("shop-web-run-2", labels={key: value})
        return original(compose_project, args)

    monkeypatch.setattr(project.engine, "compose_run", run_starting_a_container)
    result, lines = run(project, "web", remove=True)
    assert result == code
    assert "removed container shop-web-run-2" in lines
    assert project.engine.inspect_container("shop-web-run-2") is None
    assert project.engine.inspect_container(other.name) is not None


def test_run_on_a_terminal_leaves_the_tty_to_compose(project: Project) -> None:
    project.engine.terminal = True
    run(project, "db")
    ((args),) = project.engine.commands()
    assert args[3:] == ["db"]


def test_run_no_deps_of_a_mirrored_service_starts_its_sidecar_and_agent_first(
    project: Project,
) -> None:
    assert run(project, "web", no_deps=True, build=True)[0] == 0
    first, second = project.engine.commands()
    assert first == ["up", "--detach", "--wait", "--no-deps", "web-mirror", compose.AGENT_SERVICE]
    assert second[3:6] == ["--no-deps", "--build", "--no-TTY"]


def test_run_no_deps_of_another_service_starts_nothing_else(project: Project) -> None:
    run(project, "db", no_deps=True)
    ((args),) = project.engine.commands()
    assert args[3:] == ["--no-deps", "--no-TTY", "db"]


@pytest.mark.parametrize(("code", "raised"), [(1, True), (143, False)])
def test_run_when_the_sidecar_does_not_start(project: Project, code: int, raised: bool) -> None:
    project.engine.exit_codes["up"] = code
    if raised:
        with pytest.raises(EngineError, match="starting web-mirror"):
            run(project, "web", no_deps=True)
    else:
        assert run(project, "web", no_deps=True)[0] == code
    assert len(project.engine.runs) == 1


def test_run_of_an_unknown_service_is_bad_input(project: Project) -> None:
    with pytest.raises(ConfigError, match="no service 'wbe'") as caught:
        run(project, "wbe")
    assert caught.value.hint == "did you mean 'web'?"
    assert project.engine.runs == []
    with pytest.raises(ConfigError) as far:
        run(project, "nothing-like-it")
    assert far.value.hint == "services of this project: db, web"  # not web-mirror, the agent


def test_up_of_an_unknown_service_is_bad_input_before_the_backend_acts(project: Project) -> None:
    """`up -d wbe`: refused before the backend prepares anything (a cluster's Secret, agent and
    forwarder) and before compose runs."""
    with pytest.raises(ConfigError, match="no service 'wbe' in this project") as caught:
        up(project, services=["web", "wbe"], detach=True)
    assert caught.value.hint == "did you mean 'web'?"
    assert [c for c, _ in project.backend.calls if c in ("prepare", "release")] == []
    assert project.engine.runs == [] and project.engine.builds == []


def test_up_without_an_engine_renders_nothing(project: Project) -> None:
    project.engine.reachable = False
    with pytest.raises(EngineError, match="cannot reach the Docker engine"):
        up(project)
    assert not project.render_dir.exists()
    assert project.backend.calls == []


def test_rendered_files_are_private_also_when_left_open_before(project: Project) -> None:
    project.render_dir.mkdir(mode=0o755)
    (project.render_dir / "compose.yaml").write_text("old")
    (project.render_dir / "compose.yaml").chmod(0o644)
    rendered = ops.render(project.options, write=True, runtime=project.runtime)
    assert "FROM_TARGET" in rendered.path.read_text()  # the target's values are in it
    assert stat.S_IMODE(project.render_dir.stat().st_mode) == 0o700
    for path in project.render_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in project.render_dir.iterdir()) == [
        ".gitignore",
        "compose.yaml",
        "tunnel-shop.key",
    ]


# -- a container outside its sidecar's namespace --------------------------------------------------


def test_an_app_whose_sidecar_restarted_is_reported(project: Project) -> None:
    up(project, detach=True)
    _, rows = ops.status(project.options, runtime=project.runtime)
    app = next(r for r in rows if r.role == "app")
    assert app.namespace == Check(
        name="network namespace of web", ok=True, detail="shares web-mirror's"
    )
    project.engine.restart("shop-web-mirror-1")
    _, rows = ops.status(project.options, runtime=project.runtime)
    app = next(r for r in rows if r.role == "app")
    assert app.namespace is not None and not app.namespace.ok
    assert app.namespace.detail.startswith("shop-web-mirror-1 restarted at ")
    assert "shop-web-1 is left in shop-web-mirror-1's old network namespace" in app.namespace.detail
    assert app.namespace.hint == "`composemirror up -d` recreates web in its sidecar's namespace"
    found = checks_by_name(ops.doctor(project.options, runtime=project.runtime))
    assert not found["network namespace of web"].ok


def test_up_recreates_an_app_whose_sidecar_restarted(project: Project) -> None:
    up(project, detach=True)
    project.engine.restart("shop-web-mirror-1")
    code, lines = up(project, detach=True)
    assert code == 0
    assert project.engine.commands()[-2:] == [
        ["up", "--detach", "--no-deps", "--force-recreate", "web"],
        ["up", "--detach"],
    ]
    assert any(line.endswith(": recreating web") for line in lines)
    _, rows = ops.status(project.options, runtime=project.runtime)
    assert all(r.namespace is None or r.namespace.ok for r in rows)


def test_up_starts_a_stopped_sidecar_before_recreating_its_app(project: Project) -> None:
    up(project, detach=True)
    project.engine.set_state("shop-web-mirror-1", "exited")
    code, lines = up(project, detach=True)
    assert code == 0
    assert project.engine.commands()[-3:] == [
        ["up", "--detach", "--no-deps", "web-mirror"],
        ["up", "--detach", "--no-deps", "--force-recreate", "web"],
        ["up", "--detach"],
    ]
    assert "shop-web-mirror-1 is exited: shop-web-1 has no network: recreating web" in lines


def test_up_leaves_apps_in_their_sidecars_namespace_alone(project: Project) -> None:
    up(project, detach=True)
    up(project, detach=True)
    assert project.engine.commands() == [["up", "--detach"], ["up", "--detach"]]


def test_a_failed_recreation_is_an_engine_error(project: Project) -> None:
    up(project, detach=True)
    project.engine.restart("shop-web-mirror-1")
    project.engine.exit_codes["up"] = 1
    with pytest.raises(EngineError, match="recreating web failed"):
        up(project, detach=True)


def test_doctor_reports_each_sidecars_rules(project: Project) -> None:
    up(project, detach=True)
    rules = {"state": "in place", "checked": time.time(), "restored": 1, "restored_at": 0}
    project.engine.outputs["shop-web-mirror-1"] = json.dumps({**REPORT, "rules": rules})
    found = checks_by_name(ops.doctor(project.options, runtime=project.runtime))
    assert not found["interception rules of web-mirror"].ok
    assert found["agent link of web-mirror"].ok


def unhealthy_sidecar(project: Project) -> None:
    up(project, detach=True)
    project.engine.running = [
        dataclasses.replace(c, health="unhealthy") if c.name == "shop-web-mirror-1" else c
        for c in project.engine.running
    ]


def test_up_starts_the_agent_and_waits_for_an_unhealthy_sidecar_first(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    unhealthy_sidecar(project)
    engine = project.engine
    real = engine.compose_run

    def compose_run(compose_project: ComposeProject, args: Sequence[str]) -> int:
        if list(args) == ["up", "--detach", "--no-deps", compose.AGENT_SERVICE]:
            # the sidecar links to the started agent and its next healthcheck passes
            engine.running = [dataclasses.replace(c, health="healthy") for c in engine.running]
        return real(compose_project, args)

    monkeypatch.setattr(engine, "compose_run", compose_run)
    code, lines = up(project, detach=True)
    assert code == 0
    assert engine.commands()[-2:] == [
        ["up", "--detach", "--no-deps", compose.AGENT_SERVICE],
        ["up", "--detach"],
    ]
    assert "waiting for shop-web-mirror-1 to link to the agent again" in lines


@pytest.mark.parametrize("change", ["link", "key"])
def test_an_unhealthy_sidecar_that_compose_will_recreate_is_not_waited_for(
    project: Project, change: str
) -> None:
    """Its link settings (a new session's forwarder port) or its tunnel key (`.composemirror/`
    deleted) are no longer the rendered project's: the `up` that follows recreates it, so
    waiting for it to link with its old ones would only time out."""
    unhealthy_sidecar(project)
    sidecar = next(c for c in project.engine.running if c.name == "shop-web-mirror-1")
    key = project.render_dir / "tunnel-shop.key"
    assert sidecar.labels[compose.LABEL_KEY] == compose.key_digest(key.read_text().strip())
    if change == "link":
        old = dict(sidecar.env)
        old[ENV_VAR] = old[ENV_VAR].replace('"link":', '"link_was":')
        stale = dataclasses.replace(sidecar, env=old)
    else:
        stale = dataclasses.replace(
            sidecar, labels={**sidecar.labels, compose.LABEL_KEY: "0123456789abcdef"}
        )
    project.engine.running = [stale if c is sidecar else c for c in project.engine.running]
    code, lines = up(project, detach=True)
    assert code == 0
    assert not any(line.startswith("waiting for") for line in lines)
    assert project.engine.commands()[-1] == ["up", "--detach"]


def test_a_sidecar_that_stays_unhealthy_stops_up_with_a_hint(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    unhealthy_sidecar(project)
    monkeypatch.setattr(ops, "SIDECAR_WAIT", 0.0)
    with pytest.raises(EngineError) as caught:
        up(project, detach=True)
    assert caught.value.message.startswith("shop-web-mirror-1 stayed unhealthy for 0 s")
    assert caught.value.hint is not None and "composemirror doctor" in caught.value.hint
    assert project.engine.commands()[-1] == ["up", "--detach", "--no-deps", compose.AGENT_SERVICE]


def test_run_behind_a_sidecar_that_stays_unhealthy_stops_with_a_hint(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    unhealthy_sidecar(project)
    monkeypatch.setattr(ops, "SIDECAR_WAIT", 0.0)
    with pytest.raises(EngineError, match="shop-web-mirror-1 stayed unhealthy"):
        ops.run(project.options, "web", progress=print, runtime=project.runtime)
    assert not any(args[0] == "run" for args in project.engine.commands())


# -- down ----------------------------------------------------------------------------------------


def test_down_removes_what_up_created_and_the_rendered_files(project: Project) -> None:
    project.engine.add_container("unrelated", labels={"com.docker.compose.project": "other"})
    up(project, detach=True)
    project.backend.torn_down = ["agent in the cluster"]
    lines: list[str] = []
    removed = ops.down(
        project.options, volumes=False, progress=lines.append, runtime=project.runtime
    )
    assert [c.name for c in project.engine.running] == ["unrelated"]
    assert removed[-1] == "agent in the cluster"
    assert ("teardown", "shop") in project.backend.calls
    ((down_project, volumes),) = project.engine.downs
    assert down_project.files == (project.render_dir / "compose.yaml",)
    assert down_project.name == "shop" and not volumes
    assert not project.render_dir.exists()


def test_down_and_status_without_the_p_given_to_up(project: Project) -> None:
    named = ops.Options(files=(project.file,), project_name="feature-x")
    ops.up(named, detach=True, progress=print, runtime=project.runtime)
    assert {c.labels["com.docker.compose.project"] for c in project.engine.running} == {"feature-x"}
    name, rows = ops.status(project.options, runtime=project.runtime)
    assert name == "feature-x" and {r.service for r in rows} >= {"web", "web-mirror", "db"}
    ops.down(project.options, volumes=False, progress=print, runtime=project.runtime)
    assert project.engine.running == []
    assert ("teardown", "feature-x") in project.backend.calls
    assert not project.render_dir.exists()


def test_down_of_one_project_keeps_the_files_another_still_uses(project: Project) -> None:
    for name in ("one", "two"):
        options = ops.Options(files=(project.file,), project_name=name)
        ops.up(options, detach=True, progress=print, runtime=project.runtime)
    one = ops.Options(files=(project.file,), project_name="one")
    ops.down(one, volumes=False, progress=print, runtime=project.runtime)
    assert {c.labels["com.docker.compose.project"] for c in project.engine.running} == {"two"}
    assert (project.render_dir / "compose.yaml").is_file()
    ops.down(project.options, volumes=False, progress=print, runtime=project.runtime)
    assert project.engine.running == [] and not project.render_dir.exists()


def test_down_without_p_takes_down_the_project_the_files_name_and_names_the_others(
    project: Project,
) -> None:
    """As compose: plain `down` is the files' project; another `-p` from here stays (said), and
    is taken down by a plain `down` once the files' project is gone."""
    up(project, detach=True)
    other = ops.Options(files=(project.file,), project_name="feature-y")
    ops.up(other, detach=True, progress=print, runtime=project.runtime)
    lines: list[str] = []
    ops.down(project.options, volumes=False, progress=lines.append, runtime=project.runtime)
    running = {c.labels["com.docker.compose.project"] for c in project.engine.running}
    assert running == {"feature-y"}
    assert lines[-1] == (
        "also started from this directory, left running: feature-y "
        "(`composemirror -p NAME down` takes one down)"
    )
    assert project.render_dir.is_dir()
    lines.clear()
    ops.down(project.options, volumes=False, progress=lines.append, runtime=project.runtime)
    assert project.engine.running == [] and not project.render_dir.exists()
    assert "taking down the projects `up` started from this directory: feature-y" in lines


def test_down_twice_is_fine(project: Project) -> None:
    up(project, detach=True)
    ops.down(project.options, volumes=True, progress=print, runtime=project.runtime)
    again = ops.down(project.options, volumes=True, progress=print, runtime=project.runtime)
    assert again == []
    assert project.engine.downs[-1][0].files == ()


def test_down_by_name_from_elsewhere_removes_the_rendered_files(
    project: Project, tmp_path: Path
) -> None:
    up(project, detach=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lines: list[str] = []
    options = ops.Options(project_name="shop", project_directory=elsewhere)
    ops.down(options, volumes=False, progress=lines.append, runtime=project.runtime)
    assert project.engine.running == []
    assert not project.render_dir.exists()
    assert f"removed {project.render_dir}" in lines


def test_down_by_project_name_when_the_files_are_gone(project: Project, tmp_path: Path) -> None:
    up(project, detach=True)
    project.engine.models.clear()
    options = ops.Options(files=(project.file,), project_name="shop", project_directory=tmp_path)
    ops.down(options, volumes=False, progress=print, runtime=project.runtime)
    assert project.engine.running == []
    ((down_project, _),) = project.engine.downs
    assert (down_project.name, down_project.files) == ("shop", ())
    assert not any(name == "teardown" for name, _ in project.backend.calls)


def test_down_without_files_or_name_is_bad_input(project: Project) -> None:
    project.engine.models.clear()
    with pytest.raises(ConfigError, match="docker compose rejected the project"):
        ops.down(project.options, volumes=False, progress=print, runtime=project.runtime)


def test_down_of_a_project_without_configuration_removes_what_is_there(project: Project) -> None:
    without_block(project)
    project.engine.add_container("shop-db-1", labels={"com.docker.compose.project": "shop"})
    ops.down(project.options, volumes=False, progress=print, runtime=project.runtime)
    assert project.engine.running == []
    assert project.backend.calls == []


# -- status and doctor ---------------------------------------------------------------------------

REPORT = {
    "agent": "connected",
    "error": None,
    "connects": 1,
    "streams": 0,
    "counters": {"dns_remote": 3},
}


def test_status_lists_the_agent_first_and_each_sidecars_report(project: Project) -> None:
    up(project, detach=True)
    project.engine.outputs["shop-web-mirror-1"] = json.dumps(REPORT)
    name, rows = ops.status(project.options, runtime=project.runtime)
    assert name == "shop"
    assert [(r.service, r.role) for r in rows] == [
        ("composemirror-agent", "agent"),
        ("db", "service"),
        ("web", "app"),
        ("web-mirror", "sidecar"),
    ]
    sidecar = rows[-1]
    assert sidecar.link == REPORT
    assert [command for _, command in project.engine.execs] == [
        ["cat", "/run/composemirror-status.json"]
    ]


def test_status_of_a_stopped_sidecar_has_no_report(project: Project) -> None:
    up(project, detach=True)
    project.engine.set_state("shop-web-mirror-1", "exited")
    _, rows = ops.status(project.options, runtime=project.runtime)
    assert rows[-1].state == "exited" and rows[-1].link == {}
    assert project.engine.execs == []


def checks_by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_doctor_before_up(project: Project) -> None:
    project.backend.checks = [Check(name="fake cluster", ok=True, detail="reachable")]
    checks = ops.doctor(project.options, runtime=project.runtime)
    assert [c.name for c in checks] == [
        "docker CLI",
        "Docker engine",
        "compose plugin",
        "configuration",
        "backend",
        "fake cluster",
        "target",
        "sidecar image",
        "agent image",
    ]
    assert all(c.ok for c in checks)
    found = checks_by_name(checks)
    assert found["configuration"].detail == "x-composemirror in compose.yaml: mirrors web"
    assert found["target"].detail == "fake target"
    assert found["agent image"].detail.endswith("(built by `up`)")


def test_doctor_reports_a_broken_link(project: Project) -> None:
    up(project, detach=True)
    project.engine.outputs["shop-web-mirror-1"] = json.dumps(
        {**REPORT, "agent": "connecting", "error": "connection refused"}
    )
    link = checks_by_name(ops.doctor(project.options, runtime=project.runtime))[
        "agent link of web-mirror"
    ]
    assert (link.ok, link.detail, link.hint) == (False, "connecting", "connection refused")


def test_the_backend_is_told_which_sidecars_run(project: Project) -> None:
    """So a cluster backend can fail a missing forwarder that they dial."""
    up(project, detach=True)
    ops.session_state(project.options, runtime=project.runtime)
    assert project.backend.sidecars_seen == ["web-mirror"]
    project.backend.sidecars_seen = []
    ops.doctor(project.options, runtime=project.runtime)
    assert project.backend.sidecars_seen == ["web-mirror"]
    project.engine.set_state("shop-web-mirror-1", "exited")
    ops.session_state(project.options, runtime=project.runtime)
    assert project.backend.sidecars_seen == []


def test_doctor_names_the_agent_container_that_is_down_and_what_to_run(project: Project) -> None:
    """`docker kill` of the agent: the sidecar only knows its connection is refused."""
    up(project, detach=True)
    project.engine.set_state("shop-composemirror-agent-1", "exited")
    project.engine.outputs["shop-web-mirror-1"] = json.dumps(
        {**REPORT, "agent": "connecting", "error": "[Errno 111] Connection refused"}
    )
    link = checks_by_name(ops.doctor(project.options, runtime=project.runtime))[
        "agent link of web-mirror"
    ]
    assert not link.ok
    assert link.hint == (
        "the agent container shop-composemirror-agent-1 is exited (the sidecar says: "
        "[Errno 111] Connection refused): run `composemirror up -d` to start it again; "
        "`docker logs shop-composemirror-agent-1` says why it stopped"
    )


def test_doctor_without_an_engine_still_checks_the_rest(project: Project) -> None:
    project.engine.reachable = False
    found = checks_by_name(ops.doctor(project.options, runtime=project.runtime))
    assert not found["Docker engine"].ok
    assert found["Docker engine"].hint == "start the Docker engine"
    assert found["configuration"].ok
    assert "target" not in found


def test_doctor_with_a_missing_target_still_runs_the_backends_checks(project: Project) -> None:
    project.backend.error = ClusterError("no deployment/checkout", hint="check the name")
    project.backend.checks = [Check(name="fake cluster", ok=False, detail="unreachable")]
    checks = ops.doctor(project.options, runtime=project.runtime)
    assert [c.name for c in checks][-3:] == ["backend", "fake cluster", "target"]
    found = checks_by_name(checks)
    assert found["configuration"].ok and found["backend"].detail == "fake"
    assert (found["target"].ok, found["target"].detail, found["target"].hint) == (
        False,
        "no deployment/checkout",
        "check the name",
    )


def test_doctor_when_no_backend_reaches_the_target(project: Project) -> None:
    def refuse(*args: object) -> FakeBackend:
        raise ClusterError("target deployment/checkout needs a Kubernetes cluster")

    runtime = ops.Runtime(engine=project.engine, choose=refuse, environ={})
    checks = ops.doctor(project.options, runtime=runtime)
    assert (checks[-1].name, checks[-1].ok) == ("backend", False)
    assert "needs a Kubernetes cluster" in checks[-1].detail


def test_doctor_with_a_configuration_error(project: Project) -> None:
    without_block(project)
    checks = ops.doctor(project.options, runtime=project.runtime)
    assert (checks[-1].name, checks[-1].ok) == ("configuration", False)
    assert project.backend.calls == []


# -- compose passthrough and the sandbox ---------------------------------------------------------


def test_compose_passthrough_runs_on_the_rendered_project(project: Project) -> None:
    project.engine.exit_codes["logs"] = 4
    code = ops.compose_passthrough(
        project.options, ["logs", "web"], progress=print, runtime=project.runtime
    )
    assert code == 4
    ((compose_project, args),) = project.engine.runs
    assert args == ["logs", "web"]
    assert compose_project.files == (project.render_dir / "compose.yaml",)
    assert project.backend.calls[-1][0] == "place"  # nothing started: no prepare


def test_compose_passthrough_builds_and_prepares_like_up(project: Project) -> None:
    args = ["up", "--exit-code-from", "web"]
    assert (
        ops.compose_passthrough(project.options, args, progress=print, runtime=project.runtime) == 0
    )
    assert len(project.engine.builds) == 2
    assert "prepare" in [c for c, _ in project.backend.calls]
    assert project.engine.commands() == [args]


def test_sandbox_up_and_down_go_to_the_sandbox(project: Project) -> None:
    lines: list[str] = []
    ops.sandbox("up", progress=lines.append, runtime=project.runtime)
    ops.sandbox("down", progress=lines.append, runtime=project.runtime)
    ((started, args),) = project.engine.runs
    assert started.name == "composemirror-sandbox"
    assert args == ["up", "--detach", "--wait", "--build"]
    assert project.engine.downs[0][0].name == "composemirror-sandbox"
    with pytest.raises(ConfigError):
        ops.sandbox("restart", progress=lines.append, runtime=project.runtime)


def test_the_agent_image_can_come_from_the_environment(project: Project) -> None:
    runtime = dataclasses.replace(
        project.runtime, environ={ops.AGENT_IMAGE_ENV: "registry.local/python:3.12"}
    )
    ops.up(project.options, detach=True, progress=lambda _: None, runtime=runtime)
    prepared = next(arg for call, arg in project.backend.calls if call == "prepare")
    assert prepared.config.agent.image == "registry.local/python:3.12"


@pytest.mark.parametrize("ok", [True, False])
def test_doctor_says_the_target_once(project: Project, ok: bool) -> None:
    """A backend that checks the target itself (Kubernetes) and ops both look it up."""
    project.backend.checks = [Check(name="target", ok=ok, detail="deployment/checkout (pod x)")]
    if not ok:
        project.backend.error = ClusterError("no deployment/checkout")
    checks = ops.doctor(project.options, runtime=project.runtime)
    [target] = [c for c in checks if c.name == "target"]
    assert target.ok is ok
    assert target.detail == ("fake target" if ok else "deployment/checkout (pod x)")


def test_a_cluster_agent_needs_no_local_agent_image(project: Project) -> None:
    project.backend.placement = ForwardedPlacement(
        link=LinkAddress.parse("tcp:host.docker.internal:41000"),
        extra_hosts={"host.docker.internal": "host-gateway"},
    )
    up(project, detach=True)
    assert [b.tag.split(":")[0] for b in project.engine.builds] == ["composemirror/sidecar"]
    names = [c.name for c in ops.doctor(project.options, runtime=project.runtime)]
    assert "sidecar image" in names and "agent image" not in names


def test_down_of_a_deleted_project_stops_its_recorded_forwarder(
    project: Project, tmp_path: Path
) -> None:
    """`down -p NAME` after the project's files were deleted: its Kubernetes forwarder (a real
    process here, with a stand-in kubectl) is found on this host and stopped."""
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        '#!/bin/sh\necho "Forwarding from 172.17.0.1:41234 -> 47017"\nexec sleep 60\n'
    )
    kubectl.chmod(0o755)
    root = tmp_path / "state"
    spec = forwarder.Spec(
        kubectl=str(kubectl),
        context="dev",
        namespace="shop",
        pod="checkout-1",
        remote_port=47017,
        address="127.0.0.1",
        local_port=41234,
    )
    started = forwarder.start(spec, root / "gone", project="gone")
    runtime = dataclasses.replace(project.runtime, environ={"COMPOSEMIRROR_STATE_DIR": str(root)})
    options = ops.Options(files=(tmp_path / "deleted" / "compose.yaml",), project_name="gone")
    try:
        removed = ops.down(options, volumes=False, progress=lambda _: None, runtime=runtime)
    finally:
        forwarder.stop(root / "gone", project="gone")
    assert removed == [f"forwarder (pid {started['pid']})"]
    assert forwarder.find("gone") == []
    assert not (root / "gone").exists()


def test_down_status_and_up_in_a_new_terminal_use_the_kube_config_up_recorded(
    project: Project, tmp_path: Path
) -> None:
    """No KUBECONFIG in `down`'s environment: the backend is chosen with the kube config files
    `up` recorded (not the sandbox for want of one), and the forwarder, a process of this
    host, is stopped even by a backend that knows nothing of it."""
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        '#!/bin/sh\necho "Forwarding from 127.0.0.1:41235 -> 47017"\nexec sleep 60\n'
    )
    kubectl.chmod(0o755)
    kubeconfig = tmp_path / "cluster.kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    root = tmp_path / "state"
    state.write_record(state.session_dir("shop", root), state.Record(kubeconfig=[str(kubeconfig)]))
    spec = forwarder.Spec(
        kubectl=str(kubectl),
        context="dev",
        namespace="shop",
        pod="checkout-1",
        remote_port=47017,
        address="127.0.0.1",
        local_port=41235,
    )
    started = forwarder.start(spec, state.session_dir("shop", root), project="shop")
    seen: list[Mapping[str, str]] = []

    def choose(config: Any, environ: Mapping[str, str], engine: Any) -> FakeBackend:
        seen.append(environ)
        return project.backend

    runtime = dataclasses.replace(
        project.runtime, choose=choose, environ={"COMPOSEMIRROR_STATE_DIR": str(root)}
    )
    try:
        ops.session_state(project.options, runtime=runtime, project="shop")
        assert [e.get("KUBECONFIG") for e in seen] == [str(kubeconfig)]
        # A repeated `up` there too: not the sandbox for want of a KUBECONFIG.
        ops.render(project.options, write=False, runtime=runtime)
        assert [e.get("KUBECONFIG") for e in seen] == [str(kubeconfig)] * 2
        removed = ops.down(project.options, volumes=False, progress=lambda _: None, runtime=runtime)
    finally:
        forwarder.stop(state.session_dir("shop", root), project="shop")
    assert [e.get("KUBECONFIG") for e in seen] == [str(kubeconfig)] * 3
    assert f"forwarder (pid {started['pid']})" in removed
    assert forwarder.find("shop") == []
