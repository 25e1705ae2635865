"""What a sidecar reports: counters and the agent link state, written to a file for `status`.

The CLI reads the file with `docker exec`; the file is replaced atomically, at most once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


def report(counters: Counters, link: dict[str, Any]) -> dict[str, Any]:
    return {**link, "counters": asdict(counters)}
