"""The carried agent code: it runs from a bare python3 with nothing installed, and reports."""

from __future__ import annotations

import asyncio
import base64
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composemirror.agent.pod import target_environment
from composemirror.backends.kubernetes.carry import (
    BOOTSTRAP,
    _imports,
    agent_modules,
    bundle,
    strip,
)
from composemirror.podagent import SPEC_ENV_PREFIX, parse_ready, unseal
from composemirror.protocol import key_to_text, new_key


def run_agent(cwd: Path, key: bytes, port: int) -> subprocess.CompletedProcess[str]:
    """The bootstrap in a python3 in isolated mode, in `cwd`, with only the environment
    variables the container spec sets, exiting 1 s after it is ready (no link)."""
    python = shutil.which("python3") or sys.executable
    code = bundle()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "COMPOSEMIRROR_AGENT_KEY": key_to_text(key),
        "COMPOSEMIRROR_AGENT_PORT": str(port),
        "COMPOSEMIRROR_AGENT_TTL": "1",
        "COMPOSEMIRROR_AGENT_FIRST_LINK_TIMEOUT": "1",
        "COMPOSEMIRROR_AGENT_TARGETED": "0",
        "COMPOSEMIRROR_CODE_PARTS": str(len(code.parts)),
        f"{SPEC_ENV_PREFIX}DATABASE_URL": "postgres://db/shop",
    }
    env.update({f"COMPOSEMIRROR_CODE_{i}": part for i, part in enumerate(code.parts)})
    return subprocess.run(
        [python, "-I", "-c", BOOTSTRAP],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bootstrap_runs_the_agent_from_memory(tmp_path: Path) -> None:
    """The agent starts from the carried code alone, reports, and exits when idle."""
    key = new_key()
    done = run_agent(tmp_path, key, 0)
    assert done.returncode == 0, done.stderr
    ready = parse_ready(done.stdout.strip())
    assert ready is not None and ready.version == "0.1.0"
    report = unseal(key, ready.env)
    assert (report.source, dict(report.env)) == ("spec", {"DATABASE_URL": "postgres://db/shop"})
    assert "no link for 1 s: exiting" in done.stderr
    assert key_to_text(key) not in done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_taken_port_gives_a_free_one_named_in_the_ready_line(tmp_path: Path) -> None:
    """An earlier session's agent in the same pod may still hold the port for its ttl."""
    with socket.socket() as earlier:
        earlier.bind(("127.0.0.1", 0))
        earlier.listen()
        taken = earlier.getsockname()[1]
        done = run_agent(tmp_path, new_key(), taken)
    assert done.returncode == 0, done.stderr
    ready = parse_ready(done.stdout.strip())
    assert ready is not None and ready.port not in (0, taken)


def test_the_carried_modules_are_what_the_pod_agent_imports() -> None:
    """Computed from the sources: a module split or added is carried with no list to edit."""
    carried = agent_modules()
    assert carried[0] == "composemirror" and "composemirror.agent.pod" in carried
    for needed in ("composemirror.podagent", "composemirror.protocol", "dnslib.dns"):
        assert needed in carried
    # never the host side: no sidecar, backend, engine, CLI (no docker, no kubernetes)
    assert not [m for m in carried if m.split(".")[1:2] in (["sidecar"], ["backends"])]
    assert not {"composemirror.engine", "composemirror.cli", "composemirror.ops"} & set(carried)
    assert set(bundle_names()) == set(carried)


def bundle_names() -> list[str]:
    packed = "".join(bundle().parts)
    return list(json.loads(lzma.decompress(base64.b64decode(packed))))


def test_imports_follow_relative_and_submodule_imports_but_not_type_checking() -> None:
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from ..link import LinkAddress\n"
        "from .. import protocol\n"
        "from . import resolver\n"
        "import dnslib.dns\n"
        "if TYPE_CHECKING:\n"
        "    from composemirror.engine import Engine\n"
        "def later():\n"
        "    from composemirror import filters\n"
    )
    assert sorted(_imports(source, "composemirror.agent.server", False)) == [
        "composemirror",
        "composemirror",
        "composemirror.agent",
        "composemirror.agent.resolver",
        "composemirror.filters",
        "composemirror.link",
        "composemirror.protocol",
        "dnslib.dns",
    ]


def test_bundle_is_small_and_whole() -> None:
    code = bundle()
    assert code.size < 64 * 1024 < code.source_bytes
    assert len(code.parts) == 1


@pytest.mark.parametrize(
    "source",
    [
        '"""Doc."""\nx = 1\n',
        'class A:\n    """Doc."""\n',
        'def f():\n    """Doc."""\n    # comment\n    return f"{1!r:>3}"\n',
    ],
)
def test_strip_keeps_behaviour(source: str) -> None:
    stripped = strip(source)
    assert "Doc." not in stripped and "comment" not in stripped
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    exec(compile(source, "s", "exec"), before)
    exec(compile(stripped, "s", "exec"), after)
    if "f" in before:
        assert before["f"]() == after["f"]()  # type: ignore[operator]


def fake_proc(root: Path, processes: dict[int, tuple[bytes, bytes | None]]) -> Path:
    for pid, (cmdline, environ) in processes.items():
        folder = root / str(pid)
        folder.mkdir(parents=True)
        (folder / "cmdline").write_bytes(cmdline)
        if environ is not None:
            (folder / "environ").write_bytes(environ)
    (root / "self").mkdir()
    return root


@pytest.mark.parametrize(
    ("processes", "source", "env"),
    [
        # the target's entrypoint is PID 1 of the shared process namespace
        (
            {1: (b"/app/server\0", b"A=1\0B=x=y\0"), 40: (b"python3\0", b"")},
            "process",
            {"A": "1", "B": "x=y"},
        ),
        # a pod sharing one namespace: the pause container is PID 1, the app the next
        ({1: (b"/pause\0", b""), 7: (b"/app/server\0", b"A=2\0")}, "process", {"A": "2"}),
        # not readable (another uid): the spec copy
        ({1: (b"/app/server\0", None)}, "spec", {"DATABASE_URL": "x"}),
    ],
)
def test_target_environment(
    tmp_path: Path,
    processes: dict[int, tuple[bytes, bytes | None]],
    source: str,
    env: dict[str, str],
) -> None:
    proc = fake_proc(tmp_path, processes)
    report = target_environment(
        {"CMENV_DATABASE_URL": "x", "PATH": "/bin"}, targeted=True, proc=proc, own_pid=40
    )
    assert (report.source, dict(report.env)) == (source, env)


def test_job_agent_reads_no_process(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {1: (b"python3\0", b"SECRET=1\0")})
    report = target_environment({"PATH": "/bin"}, targeted=False, proc=proc, own_pid=1)
    assert (report.source, dict(report.env)) == ("none", {})


def test_the_agent_waits_longer_for_its_first_link_than_after_its_last() -> None:
    """Before any sidecar has dialled it, `up` may still be building or pulling images: the
    agent waits `first` for that; once a link has come and gone, `ttl`."""
    from types import SimpleNamespace

    from composemirror.agent.pod import IdleAgent

    def idle(agent: SimpleNamespace, ttl: float, first: float) -> float:
        started = time.monotonic()
        asyncio.run(IdleAgent.until_idle(agent, ttl, first=first, tick=0.01))  # type: ignore[arg-type]
        return time.monotonic() - started

    never = SimpleNamespace(open=[], last_connected=time.monotonic(), linked=False)
    assert idle(never, 0.05, 0.5) >= 0.5
    tunnel = SimpleNamespace(alive=True)
    once = SimpleNamespace(open=[tunnel], last_connected=time.monotonic(), linked=False)

    async def close_soon() -> None:
        await asyncio.sleep(0.1)
        tunnel.alive = False

    async def both() -> float:
        started = time.monotonic()
        closing = asyncio.create_task(close_soon())  # noqa: TID251 - a test's own helper
        await IdleAgent.until_idle(once, 0.05, first=5.0, tick=0.01)  # type: ignore[arg-type]
        await closing
        return time.monotonic() - started

    assert asyncio.run(both()) < 1.0
    assert once.linked
