"""The agent's entry point inside a Kubernetes pod (an ephemeral container or a Job).

Started by the bootstrap the Kubernetes backend puts in the container spec. Settings come from
the environment: the tunnel key from a Secret reference, the port, the idle time. It listens on
127.0.0.1 only (reached through the API server's port-forward), prints one ready line with its
version and the sealed environment report, and exits when no tunnel has been connected for the
idle time. Stdlib plus the agent's own modules; no Kubernetes client.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import composemirror
from composemirror import tasks
from composemirror.agent.resolver import Resolver, parse_resolv_conf
from composemirror.agent.server import Agent
from composemirror.link import HANDSHAKE_TIMEOUT, TcpAddress
from composemirror.podagent import (
    ENV_FIRST_LINK_TIMEOUT,
    ENV_HANDSHAKE_TIMEOUT,
    ENV_KEY,
    ENV_PORT,
    ENV_TARGETED,
    ENV_TTL,
    FIRST_LINK_TIMEOUT,
    SPEC_ENV_PREFIX,
    EnvReport,
    ready_line,
    seal,
)
from composemirror.protocol import key_from_text
from composemirror.tunnel import Tunnel

log = logging.getLogger(__name__)


class IdleAgent(Agent):
    """An `Agent` that knows when a tunnel was last connected."""

    def __init__(
        self,
        key: bytes,
        resolver: Resolver,
        spawner: tasks.Tasks,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(key, resolver, spawner, handshake_timeout=handshake_timeout)
        self.open: list[Tunnel] = []
        self.last_connected = time.monotonic()
        self.linked = False
        """Whether a tunnel was ever connected."""

    def new_tunnel(self) -> Tunnel:
        tunnel = super().new_tunnel()
        self.open.append(tunnel)
        return tunnel

    async def until_idle(
        self, ttl: float, *, first: float = FIRST_LINK_TIMEOUT, tick: float = 1.0
    ) -> None:
        """Return once no tunnel has been alive for `ttl` seconds since the last one closed, or,
        when none ever connected, for `max(first, ttl)` seconds since the agent started."""
        while True:
            self.open = [t for t in self.open if t.alive]
            now = time.monotonic()
            if self.open:
                self.last_connected = now
                self.linked = True
            elif now - self.last_connected >= (ttl if self.linked else max(first, ttl)):
                return
            await asyncio.sleep(tick)


def target_environment(
    environ: Mapping[str, str],
    *,
    targeted: bool,
    proc: Path = Path("/proc"),
    own_pid: int | None = None,
) -> EnvReport:
    """The target process's environment where readable, else the spec copy (`CMENV_` names).

    In an ephemeral container with `targetContainerName`, the target's process namespace is
    shared, so its entrypoint is PID 1 (or, in a pod sharing one namespace, the first process
    that is not the pause container). /proc/PID/environ is readable when the agent runs with the
    target's uid and gid (ptrace read access).
    """
    own = os.getpid() if own_pid is None else own_pid
    if targeted:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
        for pid in pids:
            if pid == own:
                continue
            try:
                command = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
                if command.endswith(b"/pause"):
                    continue
                raw = (proc / str(pid) / "environ").read_bytes()
            except OSError:
                break  # the first candidate decides: an unreadable target is not guessed at
            env = dict(
                item.partition("=")[::2]
                for item in raw.decode(errors="replace").split("\0")
                if "=" in item
            )
            return EnvReport(source="process", env=env)
    spec = {
        name[len(SPEC_ENV_PREFIX) :]: value
        for name, value in environ.items()
        if name.startswith(SPEC_ENV_PREFIX)
    }
    return EnvReport(source="spec" if spec or targeted else "none", env=spec)


async def run(environ: MutableMapping[str, str]) -> None:
    """Serve until idle or stopped. Consumes the key from `environ`."""
    key = key_from_text(environ.pop(ENV_KEY))
    port = int(environ.get(ENV_PORT, "47017"))
    ttl = float(environ.get(ENV_TTL, "30"))
    first = float(environ.get(ENV_FIRST_LINK_TIMEOUT, FIRST_LINK_TIMEOUT))
    handshake_timeout = float(environ.get(ENV_HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT))
    targeted = environ.get(ENV_TARGETED) == "1"
    resolv = Path("/etc/resolv.conf")
    conf = parse_resolv_conf(resolv.read_text() if resolv.exists() else "")
    async with tasks.scope() as spawner:
        # The app has the pod's search list and ndots: each name asked is resolved as it is.
        agent = IdleAgent(key, Resolver(conf), spawner, handshake_timeout=handshake_timeout)
        try:
            server = await agent.serve(TcpAddress("127.0.0.1", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            # An earlier session's agent in the same pod still holds it (it leaves after its
            # ttl): any free port does, since the ready line says which one.
            log.info("port %d is taken (%s): listening on a free one", port, e.strerror)
            server = await agent.serve(TcpAddress("127.0.0.1", 0))
        port = int(server.sockets[0].getsockname()[1])
        report = target_environment(environ, targeted=targeted)
        log.info("environment from %s (%d variables)", report.source, len(report.env))
        print(
            ready_line(version=composemirror.__version__, port=port, sealed=seal(key, report)),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        idle = asyncio.Event()

        async def watch() -> None:
            await agent.until_idle(ttl, first=first)
            idle.set()
            stop.set()

        spawner.service(watch(), name="idle watch")
        async with server:
            await stop.wait()  # then the scope cancels the watch and what the agent still runs
    if idle.is_set():
        log.info("no link for %.0f s: exiting", ttl if agent.linked else max(first, ttl))


def main() -> None:
    """Entry point of the bootstrap: log to stderr, serve, exit 0 when idle."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="agent %(levelname)s %(message)s"
    )
    asyncio.run(run(os.environ))
