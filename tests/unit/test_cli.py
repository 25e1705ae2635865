"""`cli.main()` in-process on a fake engine and backend: arguments, exit codes, what is printed
where (results on stdout, progress and errors on stderr)."""

from __future__ import annotations

import copy
import json
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import composemirror
from composemirror import cli
from composemirror.backends import Check
from composemirror.errors import ClusterError
from tests.unit.conftest import MODEL, Project


def run(project: Project, *args: str) -> int:
    return cli.main(["-f", str(project.file), *args], runtime=project.runtime)


def test_config_prints_the_rewritten_model(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "config") == 0
    out, err = capsys.readouterr()
    model = yaml.safe_load(out)
    assert "web-mirror" in model["services"]
    assert err == ""
    assert not project.render_dir.exists()


def test_config_and_up_say_which_services_share_the_apps_namespace(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    model = copy.deepcopy(MODEL)
    model["services"]["debug"] = {"image": "busybox", "network_mode": "service:web"}
    project.set_model(model)
    for command in (["config"], ["up", "-d"]):
        assert run(project, *command) == 0
        err = capsys.readouterr().err
        assert "'debug' shares the network namespace of 'web'" in err, command
        assert "its traffic goes through 'web-mirror' too" in err, command


def test_up_detached_then_status_then_down(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "up", "-d") == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "target: fake target" in err
    assert project.engine.commands() == [["up", "--detach"]]

    rules = {"state": "in place", "checked": time.time(), "restored": 0}
    project.engine.outputs["shop-web-mirror-1"] = json.dumps(
        {"agent": "connected", "rules": rules, "counters": {"tcp_remote": 2, "dns_remote": 5}}
    )
    assert run(project, "status") == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["SERVICE", "ROLE", "STATE", "DETAIL"]
    assert lines[1].split()[:3] == ["composemirror-agent", "agent", "running"]
    assert lines[-2].split()[:2] == ["web", "app"]
    assert lines[-2].endswith("namespace shares web-mirror's")
    assert lines[-1].endswith("link connected, rules in place, dns_remote 5, tcp_remote 2")

    assert run(project, "ps", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["project"] == "shop"
    assert {s["role"] for s in data["services"]} == {"agent", "app", "sidecar", "service"}

    assert run(project, "down") == 0
    _, err = capsys.readouterr()
    assert "removed container" not in err  # compose down removed them; nothing was left over
    assert run(project, "status") == 0
    assert capsys.readouterr().out == "project shop: nothing is running\n"


def test_down_says_what_it_removed(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    project.backend.torn_down = ["deployment agent"]
    assert run(project, "down", "-v") == 0
    assert capsys.readouterr().err == "removed deployment agent\n"
    assert project.engine.downs[0][1] is True


def test_up_attached_with_build_and_services(project: Project) -> None:
    assert run(project, "up", "--build", "web") == 0
    assert project.engine.commands() == [["up", "--build", "web"]]


def test_a_status_row_without_a_report(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    run(project, "up", "-d")
    capsys.readouterr()
    run(project, "status")
    sidecar_line = capsys.readouterr().out.splitlines()[-1]
    assert sidecar_line.endswith("no report")


def test_bad_configuration_exits_2_with_the_key_at_fault(
    project: Project, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = tmp_path / "mirror.yaml"
    broken.write_text("target: deployment/checkout\nservices: [web]\nfeature: {netwrok: {}}\n")
    assert run(project, "--config", str(broken), "config") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"composemirror: {broken}: x-composemirror.feature.netwrok: unknown key")
    assert "  hint: did you mean `network`?" in err


def test_a_target_that_is_not_there_exits_1_with_a_hint(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.backend.error = ClusterError(
        "target docker://x: there is no container 'x'", hint="start it"
    )
    assert run(project, "up") == 1
    err = capsys.readouterr().err
    assert err == "composemirror: target docker://x: there is no container 'x'\n  hint: start it\n"
    assert project.engine.runs == []


def test_no_engine_exits_1(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    project.engine.reachable = False
    assert run(project, "down") == 1
    assert "cannot reach the Docker engine" in capsys.readouterr().err


def test_doctor_exit_code_follows_the_checks(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "doctor") == 0
    out = capsys.readouterr().out
    assert "ok    target: fake target" in out
    project.backend.checks = [
        Check(name="fake cluster", ok=False, detail="unreachable", hint="start it")
    ]
    assert run(project, "doctor") == 1
    out = capsys.readouterr().out
    assert "FAIL  fake cluster: unreachable\n      hint: start it" in out


def test_compose_passthrough(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    project.engine.exit_codes["exec"] = 7
    assert run(project, "compose", "--", "exec", "web", "false") == 7
    assert project.engine.commands() == [["exec", "web", "false"]]
    assert run(project, "compose", "ps") == 0
    assert run(project, "compose") == 1
    assert "give compose a command" in capsys.readouterr().err


def test_sandbox_command(project: Project) -> None:
    assert run(project, "sandbox", "up") == 0
    assert run(project, "sandbox", "down") == 0
    assert project.engine.runs[0][0].name == "composemirror-sandbox"
    assert project.engine.downs[0][0].name == "composemirror-sandbox"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--version"], 0),
        (["--help"], 0),
        ([], 2),
        (["bogus"], 2),
        (["sandbox", "restart"], 2),
        (["status", "--format", "xml"], 2),
    ],
)
def test_argument_handling(
    project: Project, capsys: pytest.CaptureFixture[str], args: list[str], code: int
) -> None:
    assert cli.main(args, runtime=project.runtime) == code
    out, err = capsys.readouterr()
    if args == ["--version"]:
        assert out.strip() == composemirror.__version__
    if code == 2:
        assert "usage: composemirror" in err
    assert project.engine.runs == []


def test_flags_reach_compose(project: Project, tmp_path: Path) -> None:
    env_file = tmp_path / "ci.env"
    assert (
        cli.main(
            [
                "-f",
                str(project.file),
                "-p",
                "ci-shop",
                "--profile",
                "debug",
                "--env-file",
                str(env_file),
                "--project-directory",
                str(project.folder),
                "-v",
                "up",
                "-d",
            ],
            runtime=project.runtime,
        )
        == 0
    )
    ((compose_project, _),) = project.engine.runs
    assert compose_project.name == "ci-shop"
    assert (
        next(
            c.labels["io.composemirror.project"]
            for c in project.engine.running
            if "io.composemirror.project" in c.labels
        )
        == "ci-shop"
    )


@pytest.mark.parametrize("code", [0, 7])
def test_run_exits_with_the_jobs_code(project: Project, code: int) -> None:
    project.engine.exit_codes["run"] = code
    assert run(project, "run", "--rm", "-e", "A=1", "web", "pytest", "-x", "--lf") == code
    ((args),) = project.engine.commands()
    assert args[3:] == ["--rm", "-e", "A=1", "--no-TTY", "web", "pytest", "-x", "--lf"]


def test_up_exit_code_from_exits_with_the_jobs_code(project: Project) -> None:
    project.engine.exit_codes["up"] = 4
    assert run(project, "up", "--exit-code-from", "web", "--remove-orphans", "web") == 4
    (args,) = project.engine.commands()
    assert args[-4:] == ["--exit-code-from", "web", "--remove-orphans", "web"]


def test_up_wait(project: Project) -> None:
    assert run(project, "up", "-d", "--wait", "--wait-timeout", "60", "--no-build") == 0
    assert project.engine.commands() == [
        ["up", "--detach", "--wait", "--wait-timeout", "60", "--no-build"]
    ]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "never"),  # captured stdout is no terminal
        (["--ansi", "always"], "always"),
        (["--ansi", "never", "--progress", "quiet"], "never"),
    ],
)
def test_ansi_and_progress_reach_compose(project: Project, flags: list[str], expected: str) -> None:
    assert cli.main([*flags, "-f", str(project.file), "up", "-d"], runtime=project.runtime) == 0
    assert project.engine.output.ansi == expected
    if "--progress" in flags:
        assert project.engine.output.progress == "quiet"


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [(KeyboardInterrupt, 130, "interrupted"), (cli.Terminated, 143, "terminated")],
)
def test_an_interrupted_image_build_exits_without_a_traceback_or_temp_dir(
    project: Project,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    raised: type[BaseException],
    code: int,
    message: str,
) -> None:
    builds = tmp_path / "tmp"
    builds.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(builds))
    contexts: list[Path] = []

    def interrupted(context: Path, *args: object, **kwargs: object) -> None:
        contexts.append(context)
        raise raised

    monkeypatch.setattr(project.engine, "build_image", interrupted)
    assert run(project, "up", "-d") == code
    err = capsys.readouterr().err
    assert err.endswith(
        "from debian:bookworm-slim\ninterrupted: stopping what was started\n"
        f"composemirror: {message}\n"
    )
    assert "Traceback" not in err
    assert project.engine.commands() == [["stop"]]  # the agent may have been started
    assert contexts and contexts[0].parent == builds
    assert list(builds.iterdir()) == []


def test_ctrl_c_is_heeded_though_the_command_started_with_sigint_ignored(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script's `composemirror up &` starts with SIGINT ignored (POSIX shells do that to
    background jobs); compose heeds a Ctrl-C of its group all the same, and so must this."""

    def interrupted(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signal.SIGINT)

    project.engine.build_image = interrupted  # type: ignore[method-assign]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run(project, "up") == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored after main
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.endswith("composemirror: interrupted\n")
    assert project.engine.commands() == [["stop"]]


def test_sigterm_during_a_build_unwinds_to_143(project: Project) -> None:
    def terminated(*args: object, **kwargs: object) -> None:
        signal.raise_signal(signal.SIGTERM)

    project.engine.build_image = terminated  # type: ignore[method-assign]
    assert run(project, "up", "-d") == 143
    assert signal.getsignal(signal.SIGTERM) is not cli._terminate  # restored after main


def test_context_and_namespace_flags_win_over_the_configuration(project: Project) -> None:
    assert run(project, "--context", "staging", "-n", "payments", "up", "-d") == 0
    prepared = next(arg for call, arg in project.backend.calls if call == "prepare")
    assert (prepared.config.context, prepared.config.namespace) == ("staging", "payments")


def test_status_shows_the_backends_session_state(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "up", "-d") == 0
    project.backend.session = [
        Check(name="forwarder", ok=True, detail="forwarding (pid 42, 172.17.0.1:4000 -> pod/x)"),
        Check(name="note", ok=True, detail="each `up` leaves a terminated entry"),
    ]
    capsys.readouterr()
    assert run(project, "status") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "forwarder: forwarding (pid 42, 172.17.0.1:4000 -> pod/x)",
        "note: each `up` leaves a terminated entry",
    ]
    assert run(project, "status", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["session"][0] == {
        "name": "forwarder",
        "ok": True,
        "detail": "forwarding (pid 42, 172.17.0.1:4000 -> pod/x)",
        "hint": None,
    }


def test_an_unreachable_cluster_is_a_status_line_not_a_failure(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "up", "-d") == 0
    project.backend.error = ClusterError("cannot reach the cluster", hint="check the VPN")
    capsys.readouterr()
    assert run(project, "status") == 0
    assert "session: cannot reach the cluster" in capsys.readouterr().out


def test_a_broken_session_is_reported_by_status_and_fails_doctor(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "up", "-d") == 0
    project.backend.session = [
        Check(name="forwarder", ok=True, detail="forwarding (pid 42)"),
        Check(
            name="agent pod",
            ok=False,
            detail="pod checkout-1 in namespace shop, where the agent ran, is gone",
            hint="run `composemirror up` again",
        ),
    ]
    capsys.readouterr()
    assert run(project, "status") == 0  # a report, as `docker compose ps`; doctor fails
    out = capsys.readouterr().out
    assert "FAIL agent pod: pod checkout-1 in namespace shop, where the agent ran, is gone" in out
    assert "hint: run `composemirror up` again" in out
    assert run(project, "status", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["ok"] for c in data["session"]] == [True, False]
    assert run(project, "doctor") == 1


@pytest.mark.parametrize(("health", "fails"), [("unhealthy", True), ("healthy", False)])
def test_status_fails_a_link_down_past_its_grace(
    project: Project, capsys: pytest.CaptureFixture[str], health: str, fails: bool
) -> None:
    """The sidecar `running (unhealthy)` with its link `connecting` (its forwarder gone) is a
    FAIL line with what to do; while still healthy (a reconnect within the grace) it is not."""
    assert run(project, "up", "-d") == 0
    rules = {"state": "in place", "checked": time.time(), "restored": 0}
    project.engine.outputs["shop-web-mirror-1"] = json.dumps(
        {"agent": "connecting", "error": "[Errno 111] Connection refused", "rules": rules}
    )
    project.engine.set_health("shop-web-mirror-1", health)
    capsys.readouterr()
    assert run(project, "status") == 0  # a report; `doctor` is the check that fails
    out = capsys.readouterr().out
    assert ("FAIL agent link of web-mirror: connecting" in out) is fails
    if fails:
        assert (
            "  hint: [Errno 111] Connection refused; `composemirror doctor` checks each part of "
            "the way to the agent and says which to fix"
        ) in out
    assert run(project, "doctor") == 1


def test_status_shows_an_app_out_of_its_sidecars_namespace_and_rules_restored(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(project, "up", "-d") == 0
    project.engine.restart("shop-web-mirror-1")
    rules = {
        "state": "in place",
        "checked": time.time(),
        "restored": 2,
        "restored_at": time.time(),
        "drift": "nat OUTPUT no longer jumps to COMPOSEMIRROR",
    }
    project.engine.outputs["shop-web-mirror-1"] = json.dumps({"agent": "connected", "rules": rules})
    capsys.readouterr()
    assert run(project, "status") == 0
    out = capsys.readouterr().out
    web = next(line for line in out.splitlines() if line.startswith("web "))
    assert "namespace BROKEN: shop-web-mirror-1 restarted at" in web
    assert "link connected, rules in place (restored 2x)" in out
    assert "FAIL interception rules of web-mirror: restored 2 time(s)" in out
    assert "FAIL network namespace of web: " in out
    assert "  hint: `composemirror up -d` recreates web in its sidecar's namespace" in out
    assert run(project, "status", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    app = next(s for s in data["services"] if s["role"] == "app")
    assert app["namespace"]["ok"] is False
    assert run(project, "doctor") == 1


def test_status_and_doctor_without_p_report_one_project_and_name_the_others(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """`up -p feature-x` (and `-p feature-y`) from this directory: `status` and `doctor` with
    no -p show feature-x's containers and feature-x's session facts, and say that feature-y
    exists too."""
    assert run(project, "-p", "feature-x", "up", "-d") == 0
    project.backend.calls.clear()
    assert run(project, "status") == 0
    out = capsys.readouterr().out
    assert ("inspect", "feature-x") in project.backend.calls
    assert ("inspect", "shop") not in project.backend.calls
    assert "also started from this directory" not in out  # one project: nothing to say
    assert run(project, "-p", "feature-y", "up", "-d") == 0
    capsys.readouterr()
    project.backend.calls.clear()
    assert run(project, "status") == 0
    out = capsys.readouterr().out
    assert [c for c in project.backend.calls if c[0] == "inspect"] == [("inspect", "feature-x")]
    assert out.splitlines()[0] == (
        "project feature-x; also started from this directory: feature-y "
        "(`-p NAME` shows one of them)"
    )
    assert run(project, "status", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["project"], data["other_projects"]) == ("feature-x", ["feature-y"])
    project.backend.calls.clear()
    run(project, "doctor")
    out = capsys.readouterr().out
    assert [c for c in project.backend.calls if c[0] == "inspect"] == [("inspect", "feature-x")]
    assert "feature-x; also started from this directory: feature-y" in out


def test_progress_quiet_prints_no_progress_and_json_only_json_lines(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """As compose's own `--progress`: quiet prints no progress, json one object per line."""
    assert run(project, "--progress", "quiet", "up", "-d") == 0
    assert capsys.readouterr().err == ""
    assert run(project, "--progress", "json", "up", "-d") == 0
    lines = capsys.readouterr().err.splitlines()
    events = [json.loads(line) for line in lines]
    assert {"id": "composemirror", "text": "target: fake target"} in events
