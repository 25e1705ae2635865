"""`python -m benchmarks.relay`: the tunnel's per-chunk cost, without containers or an engine.

A relay process holds both ends of one tunnel as the sidecar and the agent do: an app listener
whose connections become streams of a client `Tunnel` (as the sidecar's proxy does), a unix
socket, and the agent's `Tunnel` connecting each stream to a server (as the agent does). The
benchmark's own threads are the app and the server and move bulk bytes through it, one way per
round. It reports throughput and the relay process's CPU time per GiB moved, which stays
meaningful on a busy machine where throughput does not. With `--against REF` a second relay
process runs composemirror as of git commit REF (extracted with `git archive`); rounds alternate
between the two and the ratios are printed, medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 256 * 1024
"""What the app and the server hand to the kernel per call."""
MIB = 1024 * 1024
GIB = 1024 * MIB


# -- the relay process -------------------------------------------------------------------------


async def relay(target: tuple[str, int], ready: Path) -> None:
    """Serve until stdin closes: app connections on loopback relayed to `target` by a tunnel.

    Imports composemirror here, so the relay runs whatever `composemirror` the interpreter
    finds first (this checkout, or the one `--against` put on PYTHONPATH). Works with the
    layout of 77b5d41 (`composemirror.mux`) and with today's (`tunnel` and `bridge`).
    """
    protocol = importlib.import_module("composemirror.protocol")
    try:
        bridge = importlib.import_module("composemirror.bridge")
        tunnel = importlib.import_module("composemirror.tunnel")
    except ImportError:
        bridge = tunnel = importlib.import_module("composemirror.mux")
    Bridge: Any = bridge.Bridge
    Tunnel: Any = tunnel.Tunnel
    Connection, Proto, Role = protocol.Connection, protocol.Proto, protocol.Role
    key = protocol.new_key()

    loop = asyncio.get_running_loop()
    opening: set[asyncio.Task[None]] = set()

    class AgentSide:
        """The agent's part: connect each requested stream to `target`, then accept it."""

        def stream_requested(self, tunnel: Any, event: Any) -> None:
            endpoint = Bridge()
            endpoint.attach(tunnel, event.stream_id)
            tunnel.endpoints[event.stream_id] = endpoint
            task = loop.create_task(self.open(tunnel, event, endpoint))
            opening.add(task)
            task.add_done_callback(opening.discard)

        async def open(self, tunnel: Any, event: Any, endpoint: Any) -> None:
            await loop.create_connection(lambda: endpoint, event.host, event.port)
            tunnel.conn.accept_stream(event.stream_id)
            tunnel.flush()
            endpoint.start()

        def dns_query(self, tunnel: Any, event: Any) -> None:
            raise NotImplementedError

    with tempfile.TemporaryDirectory(prefix="composemirror-relay-") as directory:
        path = str(Path(directory) / "agent.sock")
        agent_server = await loop.create_unix_server(
            lambda: Tunnel(Connection(Role.AGENT, key), AgentSide()), path
        )
        _, client = await loop.create_unix_connection(
            lambda: Tunnel(Connection(Role.CLIENT, key)), path
        )
        await client.authenticated

        class App(Bridge):  # type: ignore[misc]
            """The sidecar's part: each accepted connection becomes a stream, started at once."""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                client.open(Proto.TCP, target[0], target[1], self)
                self.start()

        app_server = await loop.create_server(App, "127.0.0.1", 0)
        port = app_server.sockets[0].getsockname()[1]
        ready.write_text(str(port))
        stdin_closed = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), stdin_closed.set)
        await stdin_closed.wait()
        app_server.close()
        agent_server.close()


# -- the benchmark -----------------------------------------------------------------------------


class Relay:
    """A running relay process and how to read its CPU time."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], port: int) -> None:
        self.name = name
        self.process = process
        self.port = port

    def cpu(self) -> float:
        """User + system CPU seconds of the relay process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def relay_process(
    name: str, pythonpath: Path, target: tuple[str, int], profile: Path | None
) -> Iterator[Relay]:
    """Start a relay that imports composemirror from `pythonpath`; stop it on the way out."""
    with tempfile.TemporaryDirectory(prefix="composemirror-relay-") as directory:
        ready = Path(directory) / "port"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
        argv = [sys.executable]
        if profile is not None:
            argv += ["-m", "cProfile", "-o", str(profile)]
        argv += ["-m", "benchmarks.relay", "--serve", f"{target[0]}:{target[1]}", str(ready)]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env, cwd=directory)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() or not ready.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the {name} relay did not start")
                time.sleep(0.05)
            yield Relay(name, process, int(ready.read_text()))
        finally:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _pump_out(sock: socket.socket, until: float) -> None:
    payload = memoryview(os.urandom(CHUNK))
    with sock:
        while time.monotonic() < until:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass


def _pump_in(sock: socket.socket, counted: list[float]) -> None:
    """Read until EOF; counted = [bytes, first byte's time, last byte's time]."""
    buffer = bytearray(4 * CHUNK)
    total = 0
    first = last = 0.0
    with sock:
        while True:
            n = sock.recv_into(buffer)
            if not n:
                break
            last = time.monotonic()
            if not total:
                first = last
            total += n
    counted[:] = [total, first, last]


def one_round(
    relay: Relay, server: socket.socket, upload: bool, seconds: float
) -> dict[str, float]:
    """Move bulk bytes through the relay for `seconds`, app to server (upload) or back."""
    counted: list[float] = []
    cpu_before = relay.cpu()
    app = socket.create_connection(("127.0.0.1", relay.port))
    far, _ = server.accept()
    until = time.monotonic() + seconds
    sender, receiver = (app, far) if upload else (far, app)
    threads = [
        threading.Thread(target=_pump_out, args=(sender, until)),
        threading.Thread(target=_pump_in, args=(receiver, counted)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total, first, last = counted
    cpu = relay.cpu() - cpu_before
    return {
        "mib_s": total / (last - first) / MIB if last > first else 0.0,
        "cpu_s_per_gib": cpu / (total / GIB) if total else 0.0,
    }


@contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """composemirror's package as of git `ref`, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="composemirror-ref-") as directory:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "composemirror"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise SystemExit(f"--against {ref}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
        yield Path(directory)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve:
        host, _, port = args.serve[0].rpartition(":")
        asyncio.run(relay((host, int(port)), Path(args.serve[1])))
        return 0
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    target = server.getsockname()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with ExitStack() as stack:
        relays = [
            stack.enter_context(
                relay_process("this checkout", ROOT, target, _profile(args.profile, "this"))
            )
        ]
        if args.against:
            path = stack.enter_context(checkout(args.against))
            relays.append(
                stack.enter_context(
                    relay_process(args.against, path, target, _profile(args.profile, "against"))
                )
            )
        for round_ in range(args.rounds):
            order = relays if round_ % 2 == 0 else relays[::-1]
            for mode in ("upload", "download"):
                for relay_ in order:
                    figures = one_round(relay_, server, mode == "upload", args.seconds)
                    row = results.setdefault(relay_.name, {}).setdefault(mode, {})
                    for name, value in figures.items():
                        row.setdefault(name, []).append(value)
                    print(
                        f"round {round_ + 1}/{args.rounds} {mode:8} {relay_.name:14} "
                        f"{figures['mib_s']:7.0f} MiB/s  "
                        f"{figures['cpu_s_per_gib']:.3f} CPU s/GiB",
                        file=sys.stderr,
                    )
    server.close()
    _report(results, [relay_.name for relay_ in relays], args.rounds)
    return 0


def _report(results: dict[str, Any], names: list[str], rounds: int) -> None:
    print(f"median of {rounds} rounds (spread: min-max)")
    for mode in ("upload", "download"):
        for metric, unit in (("mib_s", "MiB/s"), ("cpu_s_per_gib", "CPU s/GiB")):
            cells = []
            for name in names:
                values = results[name][mode][metric]
                cells.append(
                    f"{name}: {statistics.median(values):.3f} {unit} "
                    f"({min(values):.3f}-{max(values):.3f})"
                )
            line = f"{mode:8} {metric:13} " + "  ".join(cells)
            if len(names) == 2:
                ratios = [
                    a / b
                    for a, b in zip(
                        results[names[0]][mode][metric],
                        results[names[1]][mode][metric],
                        strict=True,
                    )
                    if b
                ]
                line += (
                    f"  ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
                )
            print(line)


def _profile(directory: Path | None, name: str) -> Path | None:
    return None if directory is None else directory / f"relay-{name}.prof"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.relay",
        description="Measure the tunnel relay's throughput and CPU per GiB on loopback, "
        "optionally beside another commit's.",
    )
    parser.add_argument("--against", metavar="REF", help="also run composemirror as of git REF")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one transfer")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="write each relay's cProfile stats to DIR"
    )
    parser.add_argument("--serve", nargs=2, metavar=("TARGET", "READY"), help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
