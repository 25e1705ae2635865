"""The agent notices when its target's network leaves its namespace (the target restarted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from composemirror.agent import namespace
from composemirror.errors import AgentError

HEADER = (
    "Inter-|   Receive                            |  Transmit\n"
    " face |bytes    packets errs drop fifo frame |bytes    packets errs drop fifo colls\n"
)
LOOPBACK = "    lo:       0       0    0    0    0     0 |       0       0    0    0    0     0\n"
ETH0 = "  eth0:    9622      71    0    0    0     0 |     962      13    0    0    0     0\n"


def test_interfaces_of_proc_net_dev() -> None:
    assert namespace.interfaces(HEADER + LOOPBACK + ETH0) == ["lo", "eth0"]
    assert namespace.has_network(HEADER + LOOPBACK + ETH0)
    assert not namespace.has_network(HEADER + LOOPBACK)


def test_the_watch_ends_the_agent_when_the_network_goes(tmp_path: Path) -> None:
    net_dev = tmp_path / "dev"
    net_dev.write_text(HEADER + LOOPBACK + ETH0)

    async def scenario() -> None:
        watching = asyncio.ensure_future(namespace.watch(net_dev, interval=0.01))
        await asyncio.sleep(0.05)
        assert not watching.done()
        net_dev.write_text(HEADER + LOOPBACK)
        with pytest.raises(AgentError, match="the target's network is gone"):
            await asyncio.wait_for(watching, 1)

    asyncio.run(scenario())


def test_a_namespace_without_a_network_is_not_watched(tmp_path: Path) -> None:
    net_dev = tmp_path / "dev"
    net_dev.write_text(HEADER + LOOPBACK)
    asyncio.run(asyncio.wait_for(namespace.watch(net_dev, interval=0.01), 1))
