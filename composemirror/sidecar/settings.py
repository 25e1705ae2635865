"""What a sidecar is told at start: the contract between the compose rewrite and the sidecar.

The CLI renders it as JSON into the sidecar's environment; the sidecar parses it back. Plain data
only; filter entries travel as the user's text and are parsed with `composemirror.filters`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from composemirror.filters import Filter, Mode, parse_filter

ENV_VAR = "COMPOSEMIRROR_SETTINGS"
LINK_DIR = "/run/composemirror"
"""Where the sidecar and the agent share the agent's socket (a volume the app never mounts)."""
AGENT_SOCKET = f"{LINK_DIR}/agent.sock"
KEY_FILE = "/run/secrets/composemirror-key"
READY_FILE = "/run/composemirror-ready"
STATUS_FILE = "/run/composemirror-status.json"
MARK = 0x434D
"""Firewall mark on the sidecar's own sockets, so its own traffic is never redirected."""
DNS_PORT = 53
PROXY_PORT = 15001
UDP_PROXY_PORT = 15002


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterText:
    """A filter as the user wrote it: `mode` and its entries."""

    mode: Mode
    entries: tuple[str, ...]

    def parse(self, *, protocols: bool) -> Filter:
        return parse_filter(self.mode, self.entries, protocols=protocols)

    @classmethod
    def of(cls, parsed: Filter | None) -> FilterText | None:
        if parsed is None:
            return None
        return cls(mode=parsed.mode, entries=tuple(r.text for r in parsed.rules))


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarSettings:
    """Everything a sidecar needs to own one app's DNS and egress."""

    service: str
    """The compose service this sidecar serves (for logs and status)."""
    tunnel: str = f"unix:{AGENT_SOCKET}"
    """Where the agent listens: `unix:PATH` or `tcp:HOST:PORT`."""
    key_file: str = KEY_FILE
    names: tuple[str, ...] = ()
    """The project's own names (services, aliases, containers, extra_hosts, `hosts` keys)."""
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Host name -> compose service whose address answers for it."""
    tcp: bool = True
    udp: bool = True
    outgoing: FilterText | None = None
    dns_enabled: bool = True
    dns: FilterText | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["hosts"] = dict(self.hosts)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SidecarSettings:
        data: dict[str, Any] = json.loads(text)
        for key in ("outgoing", "dns"):
            if data.get(key) is not None:
                data[key] = FilterText(mode=data[key]["mode"], entries=tuple(data[key]["entries"]))
        data["names"] = tuple(data.get("names", ()))
        return cls(**data)
