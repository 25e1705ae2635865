"""The sidecar's firewall: iptables rules rendered as text, applied atomically.

Rules live in one nat chain jumped to first from OUTPUT. They send every DNS query of the shared
network namespace to the sidecar's DNS server, and new outgoing TCP connections that are not the
sidecar's own (marked), not loopback and not to the project's own networks to the transparent
proxy. Docker's own DNS rules are left as they are. Rendering is pure; `apply` runs
iptables-restore on whichever backend (nft or legacy) holds Docker's rules.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from composemirror.filters import IPNetwork

log = logging.getLogger(__name__)

CHAIN = "COMPOSEMIRROR"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the rules must do."""

    mark: int
    """Packets of sockets with this mark are the sidecar's own and pass untouched."""
    dns_port: int
    proxy_port: int
    tcp: bool
    """Redirect outgoing TCP to the proxy (False leaves all TCP local)."""
    direct: Sequence[IPNetwork] = ()
    """Destinations that never need a decision (the project's networks), skipped in-kernel."""


def render(plan: Plan, *, jump: bool) -> str:
    """iptables-restore input for `plan`; `jump` adds the OUTPUT rule (absent on a first run)."""
    rules = [
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -m mark --mark {plan.mark:#x} -j RETURN",
        f"-A {CHAIN} -p udp --dport 53 -j REDIRECT --to-ports {plan.dns_port}",
        f"-A {CHAIN} -p tcp --dport 53 -j REDIRECT --to-ports {plan.dns_port}",
        f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
        *(f"-A {CHAIN} -d {network} -j RETURN" for network in plan.direct if network.version == 4),
    ]
    if plan.tcp:
        rules.append(f"-A {CHAIN} -p tcp -j REDIRECT --to-ports {plan.proxy_port}")
    if jump:
        rules.append(f"-I OUTPUT 1 -j {CHAIN}")
    rules.append("COMMIT")
    return "\n".join(rules) + "\n"


def apply(plan: Plan) -> str:
    """Install the rules; returns the iptables backend used. Raises RuntimeError on failure."""
    backend = _backend()
    saved = _run([f"{backend}-save", "-t", "nat"]).stdout
    jump = f"-A OUTPUT -j {CHAIN}" not in saved
    result = _run([f"{backend}-restore", "--noflush"], stdin=render(plan, jump=jump))
    if result.returncode != 0:
        raise RuntimeError(f"{backend}-restore failed: {result.stderr.strip()} "
                           "(the sidecar needs the NET_ADMIN capability)")
    return backend


def _backend() -> str:
    """`iptables-nft` or `iptables-legacy`: the one whose nat table holds Docker's DNS rules."""
    for backend in ("iptables-nft", "iptables-legacy"):
        try:
            if "DOCKER_OUTPUT" in _run([f"{backend}-save", "-t", "nat"]).stdout:
                return backend
        except FileNotFoundError:
            continue
    return "iptables"


def _run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)
