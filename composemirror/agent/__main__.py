"""`python -m composemirror.agent`: run the agent until it is stopped, or until the target's
network leaves its namespace (`composemirror.agent.namespace`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from composemirror import tasks
from composemirror.agent import namespace
from composemirror.agent.resolver import Resolver, parse_resolv_conf
from composemirror.agent.server import Agent
from composemirror.errors import AgentError, ComposeMirrorError
from composemirror.link import AgentSettings
from composemirror.protocol import key_from_text


async def run(settings: AgentSettings) -> None:
    listen, key_file = settings.listen, Path(settings.key_file)
    resolv_conf = Path(settings.resolv_conf)
    conf = parse_resolv_conf(resolv_conf.read_text() if resolv_conf.exists() else "")
    logging.getLogger(__name__).info(
        "resolving names as asked with nameservers %s (the app applies search %s, ndots %d)",
        ",".join(conf.nameservers),
        " ".join(conf.search) or "-",
        conf.ndots,
    )
    try:
        key = key_from_text(key_file.read_text())
    except (OSError, ValueError) as e:
        raise AgentError(f"cannot read the tunnel key {key_file}: {e}") from e
    async with tasks.scope() as spawner:
        resolver = Resolver(conf, max_lookups=settings.max_lookups)
        agent = Agent(key, resolver, spawner, handshake_timeout=settings.handshake_timeout)
        server = await agent.serve(listen)
        spawner.service(namespace.watch(), name="namespace watch")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with server:
            await stop.wait()  # then the scope cancels what the agent still runs


def main() -> None:
    settings = AgentSettings.from_args()
    logging.basicConfig(level=logging.INFO, format="agent %(levelname)s %(message)s")
    try:
        asyncio.run(run(settings))
    except* ComposeMirrorError as group:
        for error in group.exceptions:
            logging.getLogger(__name__).error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
