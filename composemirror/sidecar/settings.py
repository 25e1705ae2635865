"""The sidecar's own constants: its firewall mark and the ports it listens on inside the namespace.

What the CLI hands a sidecar (its settings, the paths shared with the agent) is the link contract
in `composemirror.link`; nothing outside the sidecar needs these.
"""

from __future__ import annotations

MARK = 0x434D
"""Firewall mark on the sidecar's own sockets, so its own traffic is never redirected."""
DNS_PORT = 53
PROXY_PORT = 15001
UDP_PROXY_PORT = 15002
