"""Whether the agent's network namespace still holds its target's network.

On this engine the agent joins the target container's namespace (`network_mode: container:`)
and keeps it: when the target stops, the engine removes its interfaces and the agent is left in
a namespace with loopback only, where every lookup and connection fails. `watch` notices, and
the agent exits so that the engine's restart policy starts it in the target's new namespace
(after `docker restart`); when the target is not back by then, the agent stays exited, its link
is down, and `status`/`doctor` say so. Reads /proc/net/dev only: no Docker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from composemirror.errors import AgentError

NET_DEV = Path("/proc/net/dev")
INTERVAL = 1.0
"""Seconds between two looks at the namespace's interfaces."""


def interfaces(net_dev: str) -> list[str]:
    """The interface names of a /proc/net/dev text (two header lines, then `NAME: counters`)."""
    return [line.split(":", 1)[0].strip() for line in net_dev.splitlines()[2:] if ":" in line]


def has_network(net_dev: str) -> bool:
    """Whether the namespace has an interface besides loopback."""
    return any(name != "lo" for name in interfaces(net_dev))


async def watch(path: Path = NET_DEV, interval: float = INTERVAL) -> None:
    """Return never while the namespace keeps a network; raise `AgentError` once it had one and
    has none left. A namespace that never had one (a target with `network_mode: none`) is not
    watched."""
    if not has_network(path.read_text()):
        return
    while True:
        await asyncio.sleep(interval)
        if not has_network(path.read_text()):
            raise AgentError(
                "the target's network is gone from this namespace (the target stopped or "
                "restarted): exiting, so that the engine starts the agent in the target's new one"
            )
