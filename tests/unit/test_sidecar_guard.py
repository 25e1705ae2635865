"""The sidecar keeps itself alive: the proxy proxies only what the firewall redirected, and the
status writer outlives its failures."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from composemirror.sidecar.proxy import redirected
from composemirror.sidecar.status import publish

PROXY = ("127.0.0.1", 15001)


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        (("10.96.0.21", 8080), True),  # redirected: the app dialled a cluster address
        (("172.18.0.5", 15001), True),  # another host's port 15001, redirected
        (("127.0.0.1", 15001), False),  # the proxy itself, dialled directly
        (("127.0.0.1", 8080), False),  # loopback is never redirected
        (("127.1.2.3", 15001), False),
    ],
)
def test_only_redirected_connections_are_proxied(original: tuple[str, int], expected: bool) -> None:
    assert redirected(original, PROXY) is expected


def test_the_status_file_outlives_failed_writes(tmp_path: Path) -> None:
    """EMFILE (here: a report that fails twice) is logged and retried, never raised."""
    path = tmp_path / "status.json"
    calls = 0

    def report() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OSError(24, "Too many open files")
        return {"agent": "connected", "calls": calls}

    async def run() -> None:
        writer = asyncio.ensure_future(publish(path, report, interval=0.01))
        try:
            for _ in range(200):
                await asyncio.sleep(0.01)
                if path.exists():
                    break
            assert not writer.done()
        finally:
            writer.cancel()

    asyncio.run(run())
    assert json.loads(path.read_text())["agent"] == "connected"
