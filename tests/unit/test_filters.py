"""Tests of composemirror.filters: mirrord's filter grammar and the local/remote decisions."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from composemirror.filters import (
    Filter,
    FilterSyntaxError,
    IPAddress,
    Mode,
    Protocol,
    Route,
    Rule,
    Scope,
    parse_filter,
    parse_rule,
    route_connection,
    route_query,
    routing_key,
)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def fields(rule: Rule) -> tuple[str, str | None, bool, str | None, int]:
    """The parsed parts of a rule, in a form a table can spell out."""
    network = None if rule.network is None else str(rule.network)
    return (rule.protocol, rule.name, rule.wildcard, network, rule.port)


# ---------------------------------------------------------------------------------------------
# The grammar: valid entries
# ---------------------------------------------------------------------------------------------

VALID = [
    # mirrord's documented examples
    ("tcp://1.2.3.0/24:7777", ("tcp", None, False, "1.2.3.0/24", 7777)),
    (
        "tcp://[2800:3f0:4001:81e::2004]:7777",
        ("tcp", None, False, "2800:3f0:4001:81e::2004/128", 7777),
    ),
    ("tcp://", ("tcp", None, False, None, 0)),
    ("tcp://google.com:7777", ("tcp", "google.com", False, None, 7777)),
    ("rust-lang.org", ("any", "rust-lang.org", False, None, 0)),
    ("localhost", ("any", "localhost", False, None, 0)),
    ("1.2.3.0/24:7777", ("any", None, False, "1.2.3.0/24", 7777)),
    ("1.2.3.0/24", ("any", None, False, "1.2.3.0/24", 0)),
    ("udp://:7777", ("udp", None, False, None, 7777)),
    (":7777", ("any", None, False, None, 7777)),
    # protocols, case-insensitive
    ("udp://", ("udp", None, False, None, 0)),
    ("any://", ("any", None, False, None, 0)),
    ("TCP://db:5432", ("tcp", "db", False, None, 5432)),
    ("Udp://dns.example:53", ("udp", "dns.example", False, None, 53)),
    ("ANY://cache", ("any", "cache", False, None, 0)),
    # host names: lower-cased, trailing dot dropped, underscores allowed (compose service names)
    (
        "postgres.shop.svc.cluster.local:5432",
        ("any", "postgres.shop.svc.cluster.local", False, None, 5432),
    ),
    (
        "Postgres.Shop.SVC.cluster.local.",
        ("any", "postgres.shop.svc.cluster.local", False, None, 0),
    ),
    ("my_service", ("any", "my_service", False, None, 0)),
    ("xn--bcher-kva.example", ("any", "xn--bcher-kva.example", False, None, 0)),
    ("1.2.3", ("any", "1.2.3", False, None, 0)),  # three numbers are not an IPv4 address
    # wildcards
    ("*.internal", ("any", "internal", True, None, 0)),
    ("*.Shop.svc.cluster.local.", ("any", "shop.svc.cluster.local", True, None, 0)),
    ("tcp://*.internal:443", ("tcp", "internal", True, None, 443)),
    # IPv4 and IPv4 CIDR; host bits of a CIDR are dropped
    ("1.2.3.4", ("any", None, False, "1.2.3.4/32", 0)),
    ("udp://10.96.0.10:53", ("udp", None, False, "10.96.0.10/32", 53)),
    ("10.1.2.3/8", ("any", None, False, "10.0.0.0/8", 0)),
    ("192.168.1.7/32:22", ("any", None, False, "192.168.1.7/32", 22)),
    ("0.0.0.0/0", ("any", None, False, "0.0.0.0/0", 0)),
    # bracketed IPv6, with and without port and prefix
    ("[::1]", ("any", None, False, "::1/128", 0)),
    ("[::1]:8080", ("any", None, False, "::1/128", 8080)),
    ("[fd00:96::21]/64", ("any", None, False, "fd00:96::/64", 0)),
    ("tcp://[fd00:96::21]/64:443", ("tcp", None, False, "fd00:96::/64", 443)),
    ("[::ffff:1.2.3.4]", ("any", None, False, "::ffff:102:304/128", 0)),
    # any-address and any-port
    ("0.0.0.0", ("any", None, False, None, 0)),
    ("0.0.0.0:5432", ("any", None, False, None, 5432)),
    ("tcp://0.0.0.0:0", ("tcp", None, False, None, 0)),
    ("[::]", ("any", None, False, None, 0)),
    ("udp://[::]:53", ("udp", None, False, None, 53)),
    (":0", ("any", None, False, None, 0)),
    ("example.com:0", ("any", "example.com", False, None, 0)),
    # port-only and port bounds
    (":53", ("any", None, False, None, 53)),
    ("udp://:53", ("udp", None, False, None, 53)),
    (":65535", ("any", None, False, None, 65535)),
    # an empty outgoing entry is mirrord's "anything"
    ("", ("any", None, False, None, 0)),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[t or "<empty>" for t, _ in VALID])
def test_parse_rule_valid_entries(
    text: str, expected: tuple[str, str | None, bool, str | None, int]
) -> None:
    rule = parse_rule(text)
    assert fields(rule) == expected
    assert rule.text == text


DNS_VALID = [
    ("*.svc.cluster.local", ("any", "svc.cluster.local", True, None, 0)),
    ("db", ("any", "db", False, None, 0)),
    ("DB.", ("any", "db", False, None, 0)),
]


@pytest.mark.parametrize(("text", "expected"), DNS_VALID, ids=[t for t, _ in DNS_VALID])
def test_parse_rule_dns_grammar_valid_entries(
    text: str, expected: tuple[str, str | None, bool, str | None, int]
) -> None:
    assert fields(parse_rule(text, protocols=False)) == expected


# ---------------------------------------------------------------------------------------------
# The grammar: invalid entries, each with the part of the message that tells the user why
# ---------------------------------------------------------------------------------------------

INVALID = [
    # mirrord's documented invalid examples
    ("tcp://google.com/24:7777", "a subnet needs an IP address"),
    (":7777udp://", "unknown protocol"),
    ("meow://", "unknown protocol 'meow'"),
    # protocols
    ("http://example.com", "use tcp://, udp:// or any://"),
    ("tcp:/example.com", "port"),
    # bare IPv6
    ("2800:3f0::1", "IPv6 is not intercepted"),
    ("tcp://::1", "IPv6 is not intercepted"),
    ("fd00::1:443", "IPv6 is not intercepted"),
    # ports
    (":65536", "is not a number from 0 to 65535"),
    ("1.2.3.4:99999", "is not a number from 0 to 65535"),
    ("db:http", "is not a number from 0 to 65535"),
    ("db:", "is not a number from 0 to 65535"),
    (":-1", "is not a number from 0 to 65535"),
    ("[::1]:70000", "is not a number from 0 to 65535"),
    (":\u00b2", "is not a number from 0 to 65535"),  # superscript two: isdigit(), not a number
    (":\u0663", "is not a number from 0 to 65535"),  # Arabic-Indic three: not an ASCII port
    # prefixes
    ("1.2.3.0/33", "prefix /33 must be a number from 0 to 32"),
    ("[fd00::]/129", "prefix /129 must be a number from 0 to 128"),
    ("10.0.0.0/x", "prefix /x"),
    ("10.0.0.0/", "prefix /"),
    ("10.0.0.0/\u00b2", "prefix"),
    ("/24", "a subnet needs a base address"),
    # names with a subnet
    ("db/16", "a subnet needs an IP address, not the name 'db'"),
    # addresses
    ("256.1.1.1", "is not an IPv4 address"),
    ("01.2.3.4", "is not an IPv4 address"),
    ("[1.2.3.4]", "brackets are for IPv6 addresses"),
    ("[not-an-ip]", "is not an IPv6 address"),
    ("[::1", "expected [protocol://]"),
    ("[::1]x", "expected [protocol://]"),
    # bad names
    ("bad name", "is not a valid host name"),
    ("-leading.example", "is not a valid host name"),
    ("trailing-.example", "is not a valid host name"),
    ("a..b", "is not a valid host name"),
    ("exa$mple.com", "is not a valid host name"),
    ("x" * 64 + ".example", "is not a valid host name"),
    (".".join(["abcdefghi"] * 26), "is not a valid host name"),  # 259 characters
    (".", "is not a valid host name"),
    # `*` anywhere but a leading `*.`
    ("a.*.example", "only a leading `*.` wildcard is allowed"),
    ("*", "only a leading `*.` wildcard is allowed"),
    ("*.*.example", "only a leading `*.` wildcard is allowed"),
    ("api*.example", "only a leading `*.` wildcard is allowed"),
    ("*.", "is not a valid host name"),
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[t[:40] for t, _ in INVALID])
def test_parse_rule_rejects(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_rule(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "an empty entry matches nothing"),
        ("  ", "an empty entry matches nothing"),
        ("tcp://db", "a DNS filter entry takes no protocol prefix"),
        ("any://db", "a DNS filter entry takes no protocol prefix"),
        ("udp://:53", "a DNS filter entry takes no protocol prefix"),
        ("a.*.example", "only a leading `*.` wildcard is allowed"),
    ],
)
def test_parse_rule_dns_grammar_rejects(text: str, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_rule(text, protocols=False)
    assert message in str(caught.value)


NEVER_MATCH = [
    # a query has a name but no port: the name alone
    ("db:5432", "never ports", "db", False),
    ("*.internal:53", "never ports", "*.internal", False),
    ("tcp://db", "no protocol prefix", "db", False),
    # ... nor an address or a port of its own: the same entry in the outgoing filter
    ("10.0.0.0/8", "never addresses", "10.0.0.0/8", True),
    ("10.96.0.10:53", "never addresses", "10.96.0.10:53", True),
    ("[fd00::]/8", "never addresses", "[fd00::]/8", True),
    (":53", "never ports", "any://:53", True),
    ("udp://:53", "no protocol prefix", "udp://:53", True),
    ("tcp://db:5432", "no protocol prefix", "tcp://db:5432", True),
]


@pytest.mark.parametrize(("text", "message", "suggested", "outgoing"), NEVER_MATCH)
def test_a_dns_filter_entry_that_can_never_match_is_refused_with_a_valid_entry_to_write(
    text: str, message: str, suggested: str, outgoing: bool
) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_rule(text, protocols=False)
    assert message in str(caught.value)
    hint = caught.value.hint or ""
    assert f"`{suggested}`" in hint
    # The hint is itself valid where it says to put it.
    if outgoing:
        assert "feature.network.outgoing.filter" in hint
        parse_rule(suggested, protocols=True)
    else:
        assert parse_rule(suggested, protocols=False).name is not None


def test_a_dns_filter_entry_for_any_address_matches_no_name() -> None:
    with pytest.raises(FilterSyntaxError, match="matches no name; remove it"):
        parse_rule("0.0.0.0", protocols=False)


def test_parse_rule_rejects_non_strings() -> None:
    with pytest.raises(FilterSyntaxError, match="expected a string, got int"):
        parse_rule(5432)  # type: ignore[arg-type]


def test_parse_filter_keeps_order_and_stops_at_the_first_bad_entry() -> None:
    parsed = parse_filter("remote", ["b.example", ":53", "a.example"])
    assert parsed.mode == "remote"
    assert [r.text for r in parsed.rules] == ["b.example", ":53", "a.example"]
    with pytest.raises(FilterSyntaxError, match="meow"):
        parse_filter("local", ["db", "meow://x", "also bad"])


# ---------------------------------------------------------------------------------------------
# Rule.matches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conn:
    """A connection as the sidecar sees it: the query name it answered, if any, and the address."""

    name: str | None
    address: str | None
    port: int
    protocol: Protocol = "tcp"

    def kwargs(self) -> dict[str, object]:
        address = None if self.address is None else ip(self.address)
        return {"name": self.name, "address": address, "port": self.port, "protocol": self.protocol}


MATCHES = [
    # names: on the query name, case-insensitive, trailing dot ignored
    ("db", Conn("db", "172.18.0.3", 5432), True),
    ("db", Conn("DB.", "172.18.0.3", 5432), True),
    ("DB.", Conn("db", None, 1), True),
    ("db", Conn("db2", "172.18.0.3", 5432), False),
    ("db", Conn(None, "172.18.0.3", 5432), False),  # a name rule never matches a bare address
    ("db:5432", Conn("db", None, 5432), True),
    ("db:5432", Conn("db", None, 5433), False),
    # wildcards match strictly below the suffix
    ("*.internal", Conn("a.internal", None, 80), True),
    ("*.internal", Conn("a.b.Internal.", None, 80), True),
    ("*.internal", Conn("internal", None, 80), False),
    ("*.internal", Conn("notinternal", None, 80), False),
    ("*.internal", Conn("a.internal.example", None, 80), False),
    # addresses and subnets
    ("10.0.0.0/8", Conn(None, "10.1.2.3", 80), True),
    ("10.0.0.0/8", Conn("anything", "10.1.2.3", 80), True),
    ("10.0.0.0/8", Conn(None, "11.0.0.1", 80), False),
    ("10.0.0.0/8", Conn(None, None, 80), False),
    ("10.96.0.10", Conn(None, "10.96.0.10", 53, "udp"), True),
    ("10.96.0.10", Conn(None, "10.96.0.11", 53, "udp"), False),
    ("[fd00::]/8:443", Conn(None, "fd00::1", 443), True),
    ("[fd00::]/8:443", Conn(None, "fd00::1", 80), False),
    ("[fd00::]/8", Conn(None, "10.0.0.1", 443), False),
    ("[::1]", Conn(None, "::1", 1), True),
    # any-address, any-port
    ("0.0.0.0", Conn(None, "203.0.113.9", 1), True),
    ("0.0.0.0", Conn("x.example", None, 1), True),
    ("[::]:53", Conn(None, "2001:db8::1", 53, "udp"), True),
    ("[::]:53", Conn(None, "2001:db8::1", 54, "udp"), False),
    (":0", Conn(None, "1.1.1.1", 65535), True),
    ("", Conn("x", None, 1), True),
    # protocols
    ("tcp://:53", Conn(None, "1.1.1.1", 53, "tcp"), True),
    ("tcp://:53", Conn(None, "1.1.1.1", 53, "udp"), False),
    ("udp://:53", Conn(None, "1.1.1.1", 53, "udp"), True),
    ("udp://:53", Conn(None, "1.1.1.1", 53, "tcp"), False),
    ("any://:53", Conn(None, "1.1.1.1", 53, "udp"), True),
    ("tcp://", Conn("x", "1.1.1.1", 9, "tcp"), True),
    ("tcp://", Conn("x", "1.1.1.1", 9, "udp"), False),
]


@pytest.mark.parametrize(
    ("entry", "conn", "expected"), MATCHES, ids=[f"{e or '<empty>'}-{c}" for e, c, _ in MATCHES]
)
def test_rule_matches(entry: str, conn: Conn, expected: bool) -> None:
    assert parse_rule(entry).matches(**conn.kwargs()) is expected  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# route_connection
# ---------------------------------------------------------------------------------------------

SCOPE = Scope(
    names=frozenset({"db", "web", "web-mirror", "cache", "postgres.shop.svc.cluster.local"}),
    networks=(net("172.18.0.0/16"), net("fd00:18::/64")),
)
L, R = Route.LOCAL, Route.REMOTE


def filt(mode: Mode, *entries: str) -> Filter:
    return parse_filter(mode, entries)


CONNECTIONS = [
    # no filter: the project's own names, networks and loopback are local; the rest is remote
    (None, Conn("orders.shop.svc.cluster.local", "10.96.0.21", 8080), R),
    (None, Conn(None, "10.96.0.21", 8080), R),
    (None, Conn("db", "172.18.0.3", 5432), L),
    (None, Conn("Cache.", None, 6379), L),
    (None, Conn("postgres.shop.svc.cluster.local", "172.18.0.3", 5432), L),  # a `hosts` name
    (None, Conn(None, "172.18.200.1", 80), L),
    (None, Conn(None, "fd00:18::5", 80), L),
    (None, Conn(None, "127.0.0.1", 8080), L),
    (None, Conn(None, "::1", 8080), L),
    (None, Conn("localhost", "127.0.0.1", 8080), L),
    # a local list: what it names is local, everything else not the project's is remote
    (filt("local", "tcp://pg.example:5432"), Conn("pg.example", "10.0.0.5", 5432), L),
    (filt("local", "tcp://pg.example:5432"), Conn("PG.Example.", "10.0.0.5", 5432), L),
    (filt("local", "tcp://pg.example:5432"), Conn("pg.example", "10.0.0.5", 5433), R),
    (filt("local", "tcp://pg.example:5432"), Conn("pg.example", "10.0.0.5", 5432, "udp"), R),
    (filt("local", "tcp://pg.example:5432"), Conn(None, "10.0.0.5", 5432), R),  # names, not IPs
    (filt("local", "tcp://pg.example:5432"), Conn("db", "172.18.0.3", 5432), L),
    (filt("local", "tcp://pg.example:5432"), Conn(None, "127.0.0.1", 5432), L),
    (filt("local", "*.internal"), Conn("auth.internal", "10.9.9.9", 443), L),
    (filt("local", "*.internal"), Conn("internal", "10.9.9.9", 443), R),
    (filt("local", "10.0.0.0/8"), Conn(None, "10.1.2.3", 80), L),
    (filt("local", "10.0.0.0/8"), Conn(None, "192.0.2.1", 80), R),
    (filt("local", "udp://:53"), Conn(None, "8.8.8.8", 53, "udp"), L),
    (filt("local", "udp://:53"), Conn(None, "8.8.8.8", 53, "tcp"), R),
    (filt("local", "[2001:db8::]/32:443"), Conn(None, "2001:db8::7", 443), L),
    # a remote list: what it names is remote, everything else local
    (
        filt("remote", "orders.shop.svc.cluster.local"),
        Conn("orders.shop.svc.cluster.local", "10.96.0.21", 8080),
        R,
    ),
    (
        filt("remote", "orders.shop.svc.cluster.local"),
        Conn("payments.shop.svc.cluster.local", "10.96.0.30", 8080),
        L,
    ),
    (filt("remote", "orders.shop.svc.cluster.local"), Conn("db", "172.18.0.3", 5432), L),
    (filt("remote", "orders.shop.svc.cluster.local"), Conn(None, "127.0.0.1", 80), L),
    # ... and a remote list that names a project name or subnet sends it remote
    (filt("remote", "db"), Conn("db", "172.18.0.3", 5432), R),
    (filt("remote", "172.18.0.0/16"), Conn(None, "172.18.0.3", 5432), R),
    (filt("remote", "tcp://:8080"), Conn("x.example", "192.0.2.1", 8080, "tcp"), R),
    (filt("remote", "tcp://:8080"), Conn("x.example", "192.0.2.1", 8080, "udp"), L),
    (filt("remote", "tcp://:8080"), Conn("x.example", "192.0.2.1", 8081, "tcp"), L),
]


@pytest.mark.parametrize(("outgoing", "conn", "expected"), CONNECTIONS)
def test_route_connection(outgoing: Filter | None, conn: Conn, expected: Route) -> None:
    route = route_connection(outgoing, scope=SCOPE, **conn.kwargs())  # type: ignore[arg-type]
    assert route is expected


ANSWERED = [
    # issue 10 fault 3: a cluster name's address inside a local subnet is still the cluster's
    (None, Conn("peer.team.svc.cluster.local", "172.18.0.77", 8080), R, R),
    (None, Conn(None, "172.18.0.77", 8080), None, L),  # a bare address: local by its subnet
    (None, Conn("db", "172.18.0.3", 5432), L, L),
    # ... and an explicit address rule still applies to it
    (filt("local", "172.18.0.0/16"), Conn("peer.x", "172.18.0.77", 8080), R, L),
    # issue 10 fault 5: a qualified rule takes only its port and protocol
    (filt("local", "udp://orders.x:9999"), Conn("orders.x", "10.96.0.21", 8080), R, R),
    (filt("local", "udp://orders.x:9999"), Conn("orders.x", "10.96.0.21", 9999, "tcp"), R, R),
    (filt("local", "udp://orders.x:9999"), Conn("orders.x", "10.96.0.21", 9999, "udp"), R, L),
    # an extra_hosts address is local by address (the app reads /etc/hosts, not DNS)
    (None, Conn(None, "172.17.0.1", 8080), None, L),
]


@pytest.mark.parametrize(("outgoing", "conn", "side", "expected"), ANSWERED)
def test_route_connection_by_the_name_asked_and_the_side_that_answered_it(
    outgoing: Filter | None, conn: Conn, side: Route | None, expected: Route
) -> None:
    scope = Scope(
        names=SCOPE.names, networks=SCOPE.networks, addresses=frozenset({ip("172.17.0.1")})
    )
    route = route_connection(outgoing, scope=scope, side=side, **conn.kwargs())  # type: ignore[arg-type]
    assert route is expected


KEYS = [
    # no filter, or names no entry names: decided by the address alone, one key per side
    (None, "orders.x", R, "side:remote"),
    (None, "shop-db.x", R, "side:remote"),
    (None, "legacy.example", L, "side:local"),
    (filt("local", "udp://orders.x:9999"), "payments.x", R, "side:remote"),
    # a name an entry names decides by itself
    (filt("local", "udp://orders.x:9999"), "Orders.X.", R, "name:orders.x"),
    (filt("local", "*.internal"), "a.internal", L, "name:a.internal"),
    # under a remote list every cluster-answered name does (its other traffic is re-resolved)
    (filt("remote", "tcp://postgres.x:5432"), "postgres.x", R, "name:postgres.x"),
    (filt("remote", "tcp://postgres.x:5432"), "shop-db.x", R, "name:shop-db.x"),
    (filt("remote", "tcp://postgres.x:5432"), "db", L, "side:local"),
]


@pytest.mark.parametrize(("outgoing", "name", "side", "key"), KEYS)
def test_routing_key(outgoing: Filter | None, name: str, side: Route, key: str) -> None:
    assert routing_key(outgoing, name, side) == key


def test_route_connection_without_scope_sends_project_names_remote() -> None:
    # The scope is what makes the project's names local; with an empty one they are not.
    conn = Conn("db", "172.18.0.3", 5432)
    assert route_connection(None, scope=Scope(), **conn.kwargs()) is R  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# route_query
# ---------------------------------------------------------------------------------------------


def dns(mode: Mode, *entries: str) -> Filter:
    return parse_filter(mode, entries, protocols=False)


QUERIES = [
    # no filters: project names local, the rest remote
    ("db", None, None, L),
    ("DB.", None, None, L),
    ("postgres.shop.svc.cluster.local", None, None, L),
    ("orders.shop.svc.cluster.local", None, None, R),
    ("example.com", None, None, R),
    # the DNS filter wins, over project names and over the outgoing filter
    ("a.local.test", dns("local", "*.local.test"), None, L),
    ("db", dns("remote", "db"), None, R),
    ("orders.x", dns("local", "orders.x"), filt("remote", "orders.x"), L),
    ("orders.x", dns("remote", "orders.x"), filt("local", "orders.x"), R),
    # names the outgoing filter sends to one side whole are resolved on that side
    ("x.internal", None, filt("local", "*.internal"), L),
    ("pg.example", None, filt("local", "pg.example"), L),
    # issue 10 fault 5: a local entry for one port or protocol leaves the name's answer alone
    ("pg.example", None, filt("local", "tcp://pg.example:5432"), R),
    ("PG.Example.", None, filt("local", "tcp://pg.example:5432"), R),
    ("orders.x", None, filt("local", "udp://orders.x:9999"), R),
    ("db", None, filt("local", "tcp://db:5432"), L),
    # ... and a remote entry for some of a name's traffic resolves it in the cluster
    ("postgres.x", None, filt("remote", "tcp://postgres.x:5432"), R),
    ("db", None, filt("remote", "tcp://db:5432"), R),
    ("orders.shop.svc.cluster.local", None, filt("remote", "orders.shop.svc.cluster.local"), R),
    ("db", None, filt("remote", "db"), R),
    ("db", None, filt("remote", "orders.x"), L),
    ("payments.x", None, filt("remote", "orders.x"), R),
    ("example.com", None, filt("local", "10.0.0.0/8", ":53"), R),  # address rules name nothing
    # a DNS `local` list: unlisted names go on as if there were no DNS filter
    ("orders.x", dns("local", "*.local.test"), None, R),
    ("db", dns("local", "*.local.test"), None, L),
    # a DNS `remote` list makes unlisted names local
    ("orders.shop.svc.cluster.local", dns("remote", "*.svc.cluster.local"), None, R),
    ("example.com", dns("remote", "*.svc.cluster.local"), None, L),
    ("db", dns("remote", "*.svc.cluster.local"), None, L),
    ("x.internal", dns("remote", "*.svc.cluster.local"), filt("remote", "*.internal"), R),
]


@pytest.mark.parametrize(("name", "dns_filter", "outgoing", "expected"), QUERIES)
def test_route_query(
    name: str, dns_filter: Filter | None, outgoing: Filter | None, expected: Route
) -> None:
    assert route_query(name, dns=dns_filter, outgoing=outgoing, scope=SCOPE) is expected


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def parses_or_rejects(text: str, *, protocols: bool) -> None:
    try:
        rule = parse_rule(text, protocols=protocols)
    except FilterSyntaxError:
        return
    assert isinstance(rule, Rule)
    assert rule.text == text
    assert rule.protocol in ("tcp", "udp", "any")
    assert 0 <= rule.port <= 65535


@given(st.text(max_size=80), st.booleans())
def test_parse_rule_on_any_text_returns_a_rule_or_a_syntax_error(
    text: str, protocols: bool
) -> None:
    parses_or_rejects(text, protocols=protocols)


GRAMMAR_ALPHABET = "tcpudany:/[]*.-_0123456789abcdefxyzTCPUDANY %\u00b2\u0663\u212a"


@given(st.text(alphabet=GRAMMAR_ALPHABET, max_size=40), st.booleans())
def test_parse_rule_on_grammar_like_text_returns_a_rule_or_a_syntax_error(
    text: str, protocols: bool
) -> None:
    parses_or_rejects(text, protocols=protocols)


@given(
    st.lists(
        st.sampled_from(
            [
                "tcp://",
                "udp://",
                "any://",
                "[",
                "]",
                ":",
                "/",
                "*.",
                ".",
                "::",
                "0.0.0.0",
                "1.2.3.4",
                "fd00::1",
                "host",
                "24",
                "128",
                "65535",
                "65536",
                "0",
            ]
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_parse_rule_on_grammar_fragments_returns_a_rule_or_a_syntax_error(
    parts: list[str], protocols: bool
) -> None:
    parses_or_rejects("".join(parts), protocols=protocols)


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,12}[a-z0-9])?", fullmatch=True)


@st.composite
def entries(draw: st.DrawFn) -> tuple[str, tuple[str, str | None, bool, str | None, int]]:
    """A valid entry built from the grammar, with the fields its rule must have."""
    protocol = draw(st.sampled_from([None, "tcp", "udp", "any"]))
    prefix_text = ""
    if protocol is not None:
        prefix_text = "".join(c.upper() if draw(st.booleans()) else c for c in protocol) + "://"
    kind = draw(
        st.sampled_from(["none", "name", "wildcard", "ipv4", "ipv4-cidr", "ipv6", "ipv6-cidr"])
    )
    name: str | None = None
    wildcard = False
    network: str | None = None
    if kind in ("name", "wildcard"):
        labels = draw(st.lists(LABEL, min_size=1, max_size=4))
        assume(not (len(labels) == 4 and all(label.isdigit() for label in labels)))
        name = ".".join(labels)
        written = "".join(c.upper() if draw(st.booleans()) else c for c in name)
        if draw(st.booleans()):
            written += "."
        wildcard = kind == "wildcard"
        host = ("*." if wildcard else "") + written
    elif kind in ("ipv4", "ipv4-cidr"):
        address = draw(st.ip_addresses(v=4))
        host = str(address)
        if kind == "ipv4-cidr":
            bits = draw(st.integers(0, 32))
            host += f"/{bits}"
            network = str(net(f"{address}/{bits}"))
        elif not address.is_unspecified:
            network = str(net(str(address)))
    elif kind in ("ipv6", "ipv6-cidr"):
        address = draw(st.ip_addresses(v=6))
        host = f"[{address}]"
        if kind == "ipv6-cidr":
            bits = draw(st.integers(0, 128))
            host += f"/{bits}"
            network = str(net(f"{address}/{bits}"))
        elif not address.is_unspecified:
            network = str(net(str(address)))
    else:
        host = ""
    port = draw(st.none() | st.integers(0, 65535))
    text = prefix_text + host + ("" if port is None else f":{port}")
    return text, (protocol or "any", name, wildcard, network, port or 0)


@given(entries())
def test_parse_rule_round_trip(
    generated: tuple[str, tuple[str, str | None, bool, str | None, int]],
) -> None:
    text, expected = generated
    rule = parse_rule(text)
    assert fields(rule) == expected
    assert rule.text == text


@given(entries())
def test_a_parsed_rule_matches_what_it_was_built_from(
    generated: tuple[str, tuple[str, str | None, bool, str | None, int]],
) -> None:
    text, (protocol, name, wildcard, network, port) = generated
    rule = parse_rule(text)
    query = None if name is None else ("x." + name if wildcard else name)
    address = None if network is None else net(network).network_address
    conn_protocol: Protocol = "udp" if protocol == "udp" else "tcp"
    assert rule.matches(name=query, address=address, port=port or 1, protocol=conn_protocol)
