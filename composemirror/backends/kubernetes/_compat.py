"""Value types of the backend interface, held here until `composemirror.backends` defines them.

TO BE REPLACED: when the backend interface lands in `composemirror.backends`, import `Resolution`,
`Resolver`, `ForwardedPlacement`, `LinkAddress`, `Check` and `Progress` from there and delete this
module. The shapes here follow that interface field for field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from composemirror.backends import Check, Progress


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolver:
    """How the target resolves names: resolv.conf's `search`, `ndots` and `nameserver`s."""

    search: tuple[str, ...]
    ndots: int
    nameservers: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    """A resolved target: for people, its environment, and its resolver when known up front."""

    description: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    resolver: Resolver | None = None


LinkAddress = str
"""Where a sidecar dials the agent: `tcp:HOST:PORT` or `unix:PATH`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardedPlacement:
    """The agent is reached through a host-side forwarder the sidecars dial."""

    link: LinkAddress
    extra_hosts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One `up`: the project, where its files live, and the tunnel key its sidecars hold."""

    project: str
    directory: Path
    key: bytes


__all__ = [
    "Check",
    "ForwardedPlacement",
    "LinkAddress",
    "Progress",
    "Resolution",
    "Resolver",
    "Session",
]
