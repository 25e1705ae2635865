"""What a sidecar reports, and whether it is healthy: written to files for `status` and Docker.

The report (the agent link, the interception rules, counters) is a JSON file the CLI reads with
`docker exec`, replaced atomically at most once a second. The ready file is the healthcheck's:
present while the sidecar's rules are in place and its link to the agent is up (or down for less
than `LINK_GRACE`, so a reconnect does not flap the container's health).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LINK_GRACE = 10.0
"""Seconds the link may be down before the sidecar stops reporting itself healthy."""


@dataclass(slots=True)
class Counters:
    """Monotonic counters of what the sidecar did."""

    dns_local: int = 0
    dns_remote: int = 0
    dns_cached: int = 0
    dns_failed: int = 0
    tcp_remote: int = 0
    tcp_local: int = 0
    tcp_failed: int = 0
    tcp_refused: int = 0
    """Connections to the proxy's port that the firewall did not redirect (dialled directly)."""
    udp_remote: int = 0
    """UDP flows tunnelled to the agent."""
    udp_local: int = 0
    """UDP flows sent directly from the sidecar."""
    udp_failed: int = 0
    """UDP flows that could not be opened (the agent failed to, no route, no reply socket)."""
    udp_dropped: int = 0
    """Datagrams that went nowhere: agent not connected, flow failed, too many while opening."""


async def publish(path: Path, report: Any, interval: float = 1.0) -> None:
    """Write `report()` (a JSON-able dict) to `path` whenever it changes, every `interval`
    seconds. Never raises: the file is a convenience, the sidecar must not die with it, so a
    failed write (EMFILE, a full disk) is logged once and tried again at the next interval."""
    last = ""
    failing: str | None = None
    while True:
        try:
            text = json.dumps(report(), sort_keys=True)
            if text != last:
                temporary = path.with_suffix(".tmp")
                temporary.write_text(text)
                os.replace(temporary, path)
                last = text
            if failing is not None:
                log.info("status file %s written again", path)
                failing = None
        except Exception as e:  # whatever it is, the next interval tries again
            if failing != str(e):
                log.warning("cannot write the status file %s: %s (retrying)", path, e)
                failing = str(e)
        await asyncio.sleep(interval)


def report(counters: Counters, link: dict[str, Any], rules: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's report: the link's facts at the top level (`agent`, `error`, ...), the
    guard's as `rules`, the counters as `counters`."""
    return {**link, "rules": rules, "counters": asdict(counters)}


class Health:
    """Whether the sidecar does its job: its rules are in place and its link is up, or went down
    less than `grace` seconds ago. `clock` gives monotonic seconds."""

    def __init__(
        self,
        *,
        link_state: Callable[[], str],
        rules_state: Callable[[], str],
        grace: float = LINK_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link_state = link_state
        self.rules_state = rules_state
        self.grace = grace
        self.clock = clock
        self.connected_at: float | None = None
        """When the link was last seen up (None: never yet)."""

    def healthy(self) -> bool:
        now = self.clock()
        if self.link_state() == "connected":
            self.connected_at = now
        link_up = self.connected_at is not None and now - self.connected_at <= self.grace
        return link_up and self.rules_state() == "in place"


async def keep_ready(path: Path, healthy: Callable[[], bool], interval: float = 0.5) -> None:
    """Keep the ready file present exactly while `healthy()`; checked every `interval` s."""
    while True:
        if healthy():
            path.touch()
        else:
            path.unlink(missing_ok=True)
        await asyncio.sleep(interval)
