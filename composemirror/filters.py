"""The traffic filter: mirrord's rule grammar and the local/remote decision.

Pure functions over plain data, shared by the CLI (validation) and the sidecar (decisions). A
rule is parsed once, from the user's text, into a frozen `Rule`; nothing here does I/O.

Grammar (mirrord's, plus `*.suffix` names): `[tcp|udp|any://][host|ip|[ipv6]|cidr][:port]`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "udp"]
Mode = Literal["local", "remote"]

_PROTOCOLS = ("tcp", "udp", "any")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_PLAIN = re.compile(r"(?P<host>[^/:\[\]]*)(?:/(?P<prefix>[^:]*))?(?::(?P<port>.*))?")
_BRACKETED = re.compile(r"\[(?P<host>[^\]]*)\](?:/(?P<prefix>[^:]*))?(?::(?P<port>.*))?")


class FilterSyntaxError(ValueError):
    """A filter entry that does not follow the grammar, or one that can never match; the message
    says what is wrong, `hint` (when there is one) is an entry to write instead."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class Route(enum.StrEnum):
    """Where a connection or a DNS query goes."""

    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One parsed filter entry. Absent parts match anything."""

    text: str
    """The entry as the user wrote it, for messages."""
    protocol: Literal["tcp", "udp", "any"] = "any"
    name: str | None = None
    """A lower-case host name without the trailing dot, or the suffix of a `*.suffix` wildcard."""
    wildcard: bool = False
    """True for `*.suffix`: the rule matches names strictly below `name`."""
    network: IPNetwork | None = None
    """An address (as a /32 or /128) or a CIDR; None for any address, including `0.0.0.0`."""
    port: int = 0
    """0 matches every port."""

    @property
    def qualified(self) -> bool:
        """Whether the rule takes only some of a name's traffic (one protocol or one port)."""
        return self.protocol != "any" or self.port != 0

    def matches_name(self, name: str | None) -> bool:
        """Whether this rule's name part matches a (query) name. Rules without a name never do."""
        if self.name is None or name is None:
            return False
        name = normalise_name(name)
        if self.wildcard:
            return name.endswith("." + self.name)
        return name == self.name

    def matches(
        self, *, name: str | None, address: IPAddress | None, port: int, protocol: Protocol
    ) -> bool:
        """Whether a connection to `name`/`address`:`port` over `protocol` matches this rule."""
        if self.protocol != "any" and self.protocol != protocol:
            return False
        if self.port and self.port != port:
            return False
        if self.name is not None:
            return self.matches_name(name)
        if self.network is not None:
            return address is not None and address in self.network
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    """mirrord's `filter: {local: [...]}` or `{remote: [...]}`: listed traffic goes there."""

    mode: Mode
    rules: tuple[Rule, ...]

    def match(
        self, *, name: str | None, address: IPAddress | None, port: int, protocol: Protocol
    ) -> bool:
        return any(
            r.matches(name=name, address=address, port=port, protocol=protocol) for r in self.rules
        )

    def match_name(self, name: str, *, whole: bool = False) -> bool:
        """Whether a rule names `name`; with `whole`, only a rule that takes all its traffic."""
        return any(r.matches_name(name) and not (whole and r.qualified) for r in self.rules)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """What the local compose project owns: these are local unless a filter says remote."""

    names: frozenset[str] = frozenset()
    """Lower-case service names, aliases, container names and `hosts` names."""
    networks: tuple[IPNetwork, ...] = ()
    """Subnets of the project's networks that the sidecar is attached to."""
    addresses: frozenset[IPAddress] = frozenset()
    """Addresses of the namespace's /etc/hosts (`extra_hosts`, `host-gateway`): an app that
    reads that file connects to them without asking DNS, so they are local by address."""

    def owns_name(self, name: str | None) -> bool:
        return name is not None and normalise_name(name) in self.names

    def owns_address(self, address: IPAddress | None) -> bool:
        if address is None:
            return False
        return (
            address.is_loopback
            or address in self.addresses
            or any(address in net for net in self.networks)
        )


def normalise_name(name: str) -> str:
    """Lower-case a DNS name and drop its trailing dot."""
    return name.rstrip(".").lower()


def parse_rule(text: str, *, protocols: bool = True) -> Rule:
    """Parse one filter entry. `protocols=False` is the DNS filter's grammar: a host name or a
    `*.suffix`, without protocol or port (a query has neither); anything else raises
    `FilterSyntaxError`."""
    rule = _parse_rule(text, protocols=protocols)
    if not protocols:
        _check_names_only(rule)
    return rule


def _parse_rule(text: str, *, protocols: bool) -> Rule:
    if not isinstance(text, str):
        raise FilterSyntaxError(f"expected a string, got {type(text).__name__}")
    protocol: Literal["tcp", "udp", "any"] = "any"
    rest = text.strip()
    if "://" in rest:
        given, rest = rest.split("://", 1)
        if not protocols:
            raise FilterSyntaxError(
                f"{text!r}: a DNS filter entry takes no protocol prefix",
                hint=_dns_hint(rest, text.strip()),
            )
        lowered = given.lower()
        if lowered == "tcp":
            protocol = "tcp"
        elif lowered == "udp":
            protocol = "udp"
        elif lowered != "any":
            raise FilterSyntaxError(
                f"{text!r}: unknown protocol {given!r}; use tcp://, udp:// or any://"
            )
    if not rest and not protocols:
        raise FilterSyntaxError("an empty entry matches nothing; remove it")
    if not rest.startswith("[") and rest.count(":") > 1:
        raise FilterSyntaxError(
            f"{text!r} is an IPv6 entry, which can never match: IPv6 is not intercepted",
            hint="remove the entry (composemirror intercepts IPv4 only)",
        )
    found = (_BRACKETED if rest.startswith("[") else _PLAIN).fullmatch(rest)
    if found is None:
        raise FilterSyntaxError(f"{text!r}: expected [protocol://][host|ip|[ipv6]|cidr][:port]")
    host, prefix, port_text = found["host"], found["prefix"], found["port"]
    port = _parse_port(text, port_text)
    if rest.startswith("["):
        network = _parse_network(text, host, prefix, ipv6=True)
        return Rule(text=text, protocol=protocol, network=network, port=port)
    if not host:
        if prefix is not None:
            raise FilterSyntaxError(f"{text!r}: a subnet needs a base address, e.g. 10.0.0.0/8")
        return Rule(text=text, protocol=protocol, port=port)
    if _looks_like_ip(host):
        network = _parse_network(text, host, prefix, ipv6=False)
        return Rule(text=text, protocol=protocol, network=network, port=port)
    if prefix is not None:
        raise FilterSyntaxError(f"{text!r}: a subnet needs an IP address, not the name {host!r}")
    wildcard = host.startswith("*.")
    name = normalise_name(host[2:] if wildcard else host)
    _check_name(text, name)
    return Rule(text=text, protocol=protocol, name=name, wildcard=wildcard, port=port)


def _check_names_only(rule: Rule) -> None:
    """Refuse a DNS filter entry that can never match: a query has a name, but no address and
    no port. The hint is an entry that does what was likely meant."""
    if rule.name is not None:
        if rule.port:
            written = ("*." if rule.wildcard else "") + rule.name
            raise FilterSyntaxError(
                f"{rule.text!r}: a DNS filter matches names, never ports", hint=f"write `{written}`"
            )
        return
    written = rule.text.strip()
    if rule.network is None and not rule.port:
        raise FilterSyntaxError(f"{rule.text!r}: matches no name; remove it")
    if rule.network is not None:
        raise FilterSyntaxError(
            f"{rule.text!r}: a DNS filter matches names, never addresses",
            hint=f"list `{written}` in feature.network.outgoing.filter instead",
        )
    if rule.port:
        raise FilterSyntaxError(
            f"{rule.text!r}: a DNS filter matches names, never ports",
            hint=f"list `any://:{rule.port}` in feature.network.outgoing.filter instead",
        )


def _dns_hint(rest: str, written: str) -> str:
    """What to write instead of the DNS filter entry `written`, whose protocol prefix is
    followed by `rest`: the name alone, or the whole entry in the outgoing filter."""
    try:
        rule = parse_rule(rest, protocols=False)
    except FilterSyntaxError:
        return f"list `{written}` in feature.network.outgoing.filter instead"
    return f"write `{rule.text.strip()}`"


def parse_filter(mode: Mode, entries: Iterable[str], *, protocols: bool = True) -> Filter:
    """Parse a whole `local` or `remote` list; the first bad entry raises `FilterSyntaxError`."""
    return Filter(mode=mode, rules=tuple(parse_rule(e, protocols=protocols) for e in entries))


def route_connection(
    outgoing: Filter | None,
    *,
    name: str | None,
    address: IPAddress | None,
    port: int,
    protocol: Protocol,
    scope: Scope,
    side: Route | None = None,
) -> Route:
    """Decide where a connection goes.

    `name` is the name the app asked for this connection's address (see `sidecar.dns.Book`),
    when there is one; `side` is where that name was resolved. Names match on the name asked,
    never by comparing addresses; port and protocol come from the connection itself, so a
    qualified rule (`udp://name:9999`) takes only that traffic. The project's own names and
    networks are local unless a `remote` filter lists them, but an address the cluster answered
    for a name is the cluster's even where it falls inside a local subnet (cluster CIDRs
    overlap Docker's pools). Address rules of the filter apply to the cluster's address.
    """
    if outgoing is not None and outgoing.mode == "remote":
        listed = outgoing.match(name=name, address=address, port=port, protocol=protocol)
        return Route.REMOTE if listed else Route.LOCAL
    if scope.owns_name(name):
        return Route.LOCAL
    if (name is None or side != Route.REMOTE) and scope.owns_address(address):
        return Route.LOCAL
    if outgoing is not None and outgoing.match(
        name=name, address=address, port=port, protocol=protocol
    ):
        return Route.LOCAL
    return Route.REMOTE


def route_query(name: str, *, dns: Filter | None, outgoing: Filter | None, scope: Scope) -> Route:
    """Decide where a DNS query for `name` is resolved.

    A name listed in the DNS filter goes where it says. A name the outgoing filter sends to
    one side whole (an entry without protocol or port) is resolved on that side, as mirrord
    does; a name a `remote` list takes only some traffic of is resolved in the cluster too. A
    `local` entry that takes one port or protocol (`udp://name:9999`) leaves the name's answer
    as it would be: the rest of its traffic goes where it went, and the proxy resolves the name
    again on this side for the listed traffic. Otherwise the project's names are local, and
    the rest is remote unless the DNS filter is a `remote` list.
    """
    if dns is not None and dns.match_name(name):
        return Route(dns.mode)
    if outgoing is not None and outgoing.match_name(name, whole=outgoing.mode == "local"):
        return Route(outgoing.mode)
    if scope.owns_name(name):
        return Route.LOCAL
    if dns is not None and dns.mode == "remote":
        return Route.LOCAL
    return Route.REMOTE


def routing_key(outgoing: Filter | None, name: str, side: Route, scope: Scope = Scope()) -> str:
    """Names with one key have every connection decided alike, whatever its port and protocol.

    A name some entry of the outgoing filter names is a key of its own, and so is a project
    name, and, under a `remote` list, every name resolved in the cluster (its unlisted traffic
    goes local, to where the name means locally). Other names are decided by their address
    alone: their key is the side that answered them. The sidecar's DNS gives two names one
    address only when their keys agree (see `sidecar.dns.Book`).
    """
    if scope.owns_name(name) or (
        outgoing is not None
        and (outgoing.match_name(name) or (outgoing.mode == "remote" and side == Route.REMOTE))
    ):
        return f"name:{normalise_name(name)}"
    return f"side:{side}"


def _parse_port(text: str, port_text: str | None) -> int:
    if port_text is None:
        return 0
    if not _is_number(port_text) or int(port_text) > 65535:
        raise FilterSyntaxError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return int(port_text)


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts `²` (which int() rejects) and non-ASCII digits.
    return text.isascii() and text.isdigit()


def _looks_like_ip(host: str) -> bool:
    return all(part.isdigit() for part in host.split(".")) and host.count(".") == 3


def _parse_network(text: str, host: str, prefix: str | None, *, ipv6: bool) -> IPNetwork | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        kind = "IPv6" if ipv6 else "IPv4"
        raise FilterSyntaxError(f"{text!r}: {host!r} is not an {kind} address") from None
    if ipv6 and address.version != 6:
        raise FilterSyntaxError(f"{text!r}: brackets are for IPv6 addresses; write {host} bare")
    if prefix is None:
        if address.is_unspecified:
            return None
        return ipaddress.ip_network(address)
    limit = 32 if address.version == 4 else 128
    if not _is_number(prefix) or int(prefix) > limit:
        raise FilterSyntaxError(f"{text!r}: prefix /{prefix} must be a number from 0 to {limit}")
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def _check_name(text: str, name: str) -> None:
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        hint = " (only a leading `*.` wildcard is allowed)" if "*" in name else ""
        raise FilterSyntaxError(f"{text!r}: {name!r} is not a valid host name{hint}")
