"""The command line: parse arguments, call one `ops` function, render its result.

Flags follow docker compose's (`-f` repeatable, `-p`, `--profile`, `--env-file`,
`--project-directory`, `--ansi`, `--progress`). Exit codes: 0 success, 2 bad input, 1 runtime
failure, the job's own code for `run` and `up --exit-code-from`, 130/143 after SIGINT/SIGTERM.
Only `ComposeMirrorError` (and the interruption) is caught; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

import composemirror
from composemirror import ops
from composemirror.engine import ANSI_CHOICES, PROGRESS_CHOICES, Output, strip_escapes
from composemirror.errors import ComposeMirrorError


class Terminated(BaseException):
    """SIGTERM outside compose: unwinds like Ctrl-C's KeyboardInterrupt, so `finally` blocks
    (an image build's temporary context) run; `main` turns it into exit 143."""


def main(argv: Sequence[str] | None = None, *, runtime: ops.Runtime | None = None) -> int:
    """Run one command; return its exit code. `runtime` replaces the engine and backends."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    options = ops.Options(
        files=tuple(args.file),
        project_name=args.project_name,
        profiles=tuple(args.profile),
        env_files=tuple(args.env_file),
        project_directory=args.project_directory,
        config_file=args.config,
        context=args.context,
        namespace=args.namespace,
    )
    runtime = runtime or ops.Runtime()
    global _plain, _progress_mode
    runtime.engine.output = Output.detect(args.ansi, args.progress, terminal=_is_terminal())
    _plain = runtime.engine.output.ansi == "never"
    _progress_mode = runtime.engine.output.progress
    previous = signal.signal(signal.SIGTERM, _terminate)
    # A shell starts a background job (`composemirror up &` in a script) with SIGINT ignored,
    # and Python then leaves it ignored; compose heeds SIGINT all the same (Go's
    # `signal.Notify` undoes the ignore), and so does this command.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = int(args.run(args, options, runtime))
        sys.stdout.flush()  # here, so that a reader gone early is met in this `try`
        return code
    except ComposeMirrorError as e:
        print(f"composemirror: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("composemirror: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print("composemirror: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went (`status | head -1`): as the Python docs' "Note on SIGPIPE" says,
        # point stdout at devnull so that flushing it at exit cannot fail again, and exit 1.
        _silence_stdout()
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _silence_stdout() -> None:
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a non-file (tests) or closed
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


_plain = False
"""No escape codes in what composemirror prints (`--ansi never`, or not on a terminal)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except ValueError:  # closed
        return False


_progress_mode: str | None = None
"""compose's `--progress` as in effect (None: compose's default)."""


def _progress(message: str) -> None:
    """A progress line on stderr, as compose writes its own under `--progress`: none under
    `quiet`, a JSON object per line under `json` (`id` and `text`, as compose's events)."""
    if _progress_mode == "quiet":
        return
    if _plain or _progress_mode == "json":
        message = strip_escapes(message.encode()).decode("utf-8", "replace")
    if _progress_mode == "json":
        message = json.dumps({"id": "composemirror", "text": message})
    print(message, file=sys.stderr, flush=True)


def _up(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    return ops.up(
        options,
        services=args.services,
        detach=args.detach,
        build=args.build,
        flags=ops.UpFlags(
            abort_on_container_exit=args.abort_on_container_exit,
            exit_code_from=args.exit_code_from,
            wait=args.wait,
            wait_timeout=args.wait_timeout,
            no_build=args.no_build,
            quiet_pull=args.quiet_pull,
            remove_orphans=args.remove_orphans,
        ),
        progress=_progress,
        runtime=runtime,
    )


def _run(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    return ops.run(
        options,
        args.service,
        args.command_args,
        remove=args.rm,
        env=args.env,
        no_deps=args.no_deps,
        build=args.build,
        progress=_progress,
        runtime=runtime,
    )


def _down(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    for line in ops.down(options, volumes=args.volumes, progress=_progress, runtime=runtime):
        _progress(f"removed {line}")
    return 0


def _config(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    rendered = ops.render(options, write=False, runtime=runtime)
    for notice in rendered.notices:
        _progress(notice)
    sys.stdout.write(yaml.safe_dump(rendered.model, sort_keys=False, width=1000))
    return 0


def _status(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    name, rows = ops.status(options, runtime=runtime)
    _, others = ops.shown_project(options, runtime=runtime)
    session = ops.session_state(options, runtime=runtime, project=name) if rows else []
    # `status` reports, as `docker compose ps` does (exit 0); `doctor` is the check that fails.
    if args.format == "json":
        print(
            json.dumps(
                {
                    "project": name,
                    "other_projects": others,
                    "services": [
                        {
                            "service": r.service,
                            "container": r.container,
                            "role": r.role,
                            "state": r.state,
                            "health": r.health,
                            "link": dict(r.link),
                            "namespace": _check_json(r.namespace),
                        }
                        for r in rows
                    ],
                    "session": [_check_json(c) for c in session],
                },
                indent=2,
            )
        )
        return 0
    if not rows:
        print(f"project {name}: nothing is running")
        return 0
    if others:
        print(
            f"project {name}; also started from this directory: {', '.join(others)} "
            "(`-p NAME` shows one of them)"
        )
    table = [("SERVICE", "ROLE", "STATE", "DETAIL")]
    problems: list[ops.Check] = []
    for r in rows:
        state = r.state + (f" ({r.health})" if r.health else "")
        table.append((r.service, r.role, state, _describe(r)))
        if r.role == "sidecar" and r.link:
            link = ops.link_failure(r, [a for a in rows if a.role == "agent"])
            problems += [] if link is None else [link]
            rules = ops.rules_check(r)
            problems += [] if rules.ok else [rules]
        if r.namespace is not None and not r.namespace.ok:
            problems.append(r.namespace)
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    for check in session:
        problems += [] if check.ok else [check]
        if check.ok:
            print(f"{check.name}: {check.detail}")
    for check in problems:
        print(f"FAIL {check.name}: {check.detail}")
        if check.hint:
            print(f"  hint: {check.hint}")
    return 0


def _check_json(check: ops.Check | None) -> dict[str, object] | None:
    if check is None:
        return None
    return {"name": check.name, "ok": check.ok, "detail": check.detail, "hint": check.hint}


def _describe(row: ops.ServiceStatus) -> str:
    """The DETAIL column: a sidecar's link, rules and counters; a joined container's namespace."""
    if row.namespace is not None:
        return ("namespace " if row.namespace.ok else "namespace BROKEN: ") + row.namespace.detail
    if row.role != "sidecar":
        return ""
    link = row.link
    if not link:
        return "no report"
    rules = link.get("rules") or {}
    restored = int(rules.get("restored") or 0)
    parts = [
        f"link {link.get('agent', '?')}",
        f"rules {rules.get('state', '?')}" + (f" (restored {restored}x)" if restored else ""),
    ]
    counters = link.get("counters") or {}
    parts += [f"{key} {value}" for key, value in sorted(counters.items())]
    return ", ".join(parts)


def _doctor(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    checks = ops.doctor(options, runtime=runtime)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        if check.hint:
            print(f"      hint: {check.hint}")
    return 0 if all(c.ok for c in checks) else 1


def _compose(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    compose_args = list(args.args)
    if compose_args[:1] == ["--"]:
        compose_args = compose_args[1:]
    if not compose_args:
        raise ComposeMirrorError("give compose a command, e.g. `composemirror compose -- ps`")
    return ops.compose_passthrough(options, compose_args, progress=_progress, runtime=runtime)


def _sandbox(args: argparse.Namespace, options: ops.Options, runtime: ops.Runtime) -> int:
    ops.sandbox(args.action, progress=_progress, runtime=runtime)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composemirror",
        description="Run part of a system in docker compose while the rest stays in a "
        "Kubernetes cluster (or the sandbox cluster).",
    )
    parser.add_argument("--version", action="version", version=composemirror.__version__)
    parser.add_argument(
        "-f",
        "--file",
        action="append",
        default=[],
        type=Path,
        help="compose file (repeatable), as for docker compose",
    )
    parser.add_argument("-p", "--project-name", help="compose project name")
    parser.add_argument("--profile", action="append", default=[], help="compose profile")
    parser.add_argument(
        "--env-file",
        action="append",
        default=[],
        type=Path,
        help="compose env file for interpolation",
    )
    parser.add_argument("--project-directory", type=Path, help="compose project directory")
    parser.add_argument(
        "--config", type=Path, help="composemirror config file (instead of x-composemirror)"
    )
    parser.add_argument(
        "--context", help="kube config context (over the configuration's kube_context)"
    )
    parser.add_argument(
        "-n", "--namespace", help="the target's namespace (over the configuration's namespace)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    parser.add_argument(
        "--ansi",
        choices=ANSI_CHOICES,
        default="auto",
        help="control characters in output, as for docker compose (auto: none unless stdout "
        "is a terminal)",
    )
    parser.add_argument(
        "--progress", choices=PROGRESS_CHOICES, help="compose's progress output type"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="render, build missing images, start the stack")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background")
    up.add_argument("--build", action="store_true", help="build images before starting")
    up.add_argument(
        "--abort-on-container-exit",
        action="store_true",
        help="stop all containers if one of the project's stops (sidecars and agent excepted)",
    )
    up.add_argument(
        "--exit-code-from",
        metavar="SERVICE",
        help="return SERVICE's exit code (implies --abort-on-container-exit)",
    )
    up.add_argument(
        "--wait", action="store_true", help="wait until services are running/healthy (detaches)"
    )
    up.add_argument("--wait-timeout", type=int, metavar="SECONDS", help="how long --wait waits")
    up.add_argument("--no-build", action="store_true", help="do not build the project's images")
    up.add_argument("--quiet-pull", action="store_true", help="pull without progress")
    up.add_argument(
        "--remove-orphans", action="store_true", help="remove containers of removed services"
    )
    up.add_argument("services", nargs="*", metavar="SERVICE")
    up.set_defaults(run=_up)

    run = commands.add_parser(
        "run", help="run a one-off command in a service (its sidecar first); its exit code"
    )
    run.add_argument("--rm", action="store_true", help="remove the container when it exits")
    run.add_argument(
        "-e", "--env", action="append", default=[], metavar="KEY=VAL", help="set a variable"
    )
    run.add_argument(
        "--no-deps", action="store_true", help="start no dependencies (the sidecar still is)"
    )
    run.add_argument("--build", action="store_true", help="build images before starting")
    run.add_argument("service", metavar="SERVICE")
    run.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND")
    run.set_defaults(run=_run)

    down = commands.add_parser("down", help="remove everything up created, the agent included")
    down.add_argument(
        "-v",
        "--volumes",
        action="store_true",
        help="also remove named volumes declared by the project",
    )
    down.set_defaults(run=_down)

    config = commands.add_parser("config", help="print the rewritten compose model")
    config.set_defaults(run=_config)

    for name in ("status", "ps"):
        status = commands.add_parser(name, help="services, sidecars and agent link state")
        status.add_argument("--format", choices=("table", "json"), default="table")
        status.set_defaults(run=_status)

    doctor = commands.add_parser("doctor", help="check engine, compose, images, target, link")
    doctor.set_defaults(run=_doctor)

    passthrough = commands.add_parser("compose", help="docker compose ARGS on the rendered project")
    passthrough.add_argument("args", nargs=argparse.REMAINDER)
    passthrough.set_defaults(run=_compose)

    box = commands.add_parser("sandbox", help="start or remove the sandbox cluster")
    box.add_argument("action", choices=("up", "down"))
    box.set_defaults(run=_sandbox)
    return parser


if __name__ == "__main__":
    sys.exit(main())
