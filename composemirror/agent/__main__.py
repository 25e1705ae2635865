"""`python -m composemirror.agent`: run the agent until it is stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from composemirror.agent.resolver import Resolver, parse_resolv_conf
from composemirror.agent.server import Agent
from composemirror.link import AgentSettings, LinkAddress
from composemirror.protocol import key_from_text


async def run(listen: LinkAddress, key_file: Path, resolv_conf: Path) -> None:
    conf = parse_resolv_conf(resolv_conf.read_text() if resolv_conf.exists() else "")
    logging.getLogger(__name__).info(
        "resolving with nameservers %s, search %s, ndots %d",
        ",".join(conf.nameservers), " ".join(conf.search) or "-", conf.ndots,
    )
    agent = Agent(key_from_text(key_file.read_text()), Resolver(conf))
    server = await agent.serve(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    settings = AgentSettings.from_args()
    logging.basicConfig(level=logging.INFO, format="agent %(levelname)s %(message)s")
    asyncio.run(run(settings.listen, Path(settings.key_file), Path(settings.resolv_conf)))


if __name__ == "__main__":
    main()
