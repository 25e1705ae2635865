"""Each connection is decided by the name the app asked for it (issue 10, faults 3, 5, 6, 8).

The sidecar's DNS, book and proxy decision together, without sockets: Docker's DNS and the
agent are tables. A connection is described as the proxies see it: the address the app
connected to, a port and a protocol.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from composemirror.errors import SidecarError
from composemirror.filters import Filter, Route, Scope, parse_filter
from composemirror.sidecar import dns, firewall
from composemirror.sidecar.__main__ import hosts_addresses, own_addresses, refuse_ipv6
from composemirror.sidecar.proxy import Egress
from composemirror.sidecar.status import Counters
from tests.unit.test_sidecar_dns import FakeClient, FakeTunnel

LOCAL_NET = ipaddress.ip_network("172.30.255.0/24")
SCOPE_NAMES = frozenset({"db", "bystander", "legacy.example"})


class Docker(dns.Resolver):
    """Docker's DNS as a table: the project's containers, and reverse answers for them."""

    local: ClassVar[dict[str, str]] = {
        "db": "172.30.255.5",
        "bystander": "172.30.255.77",
        "shared-cache": "172.30.255.9",  # a container of another project on a shared network
        "db.shop_default": "172.30.255.5",
        "pg.x": "172.30.255.5",
    }
    pointers: ClassVar[dict[str, str]] = {
        "2.255.30.172.in-addr.arpa": "shop-app-mirror-1.shop_default."
    }
    asked_locally: list[str]

    async def ask_local(self, request: DNSRecord, alias_of: str | None = None) -> DNSRecord:
        name = (alias_of or str(request.q.qname)).rstrip(".").lower()
        self.asked_locally.append(name)
        reply = request.reply()
        if request.q.qtype == QTYPE.PTR and name in self.pointers:
            reply.add_answer(*RR.fromZone(f"{name}. 600 IN PTR {self.pointers[name]}"))
        elif request.q.qtype == QTYPE.A and name in self.local:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.local[name]), ttl=600))
        elif name not in self.local and "." in name:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def sidecar(
    cluster: dict[str, str | None],
    outgoing: Filter | None = None,
    hosts_file: str = "",
    tmp: Path | None = None,
) -> tuple[Docker, Egress, FakeTunnel]:
    """A resolver and the proxies' decision over one book, as the sidecar wires them."""
    path = Path("/nonexistent")
    if tmp is not None:
        path = tmp / "hosts"
        path.write_text(hosts_file)
    static = dns.read_hosts_file(path)
    scope = Scope(names=SCOPE_NAMES, networks=(LOCAL_NET,), addresses=hosts_addresses(static))
    book = dns.Book.deciding(outgoing, scope)
    tunnel = FakeTunnel(dict(cluster))
    options: dict[str, Any] = {
        "tunnels": FakeClient(tunnel),
        "book": book,
        "counters": Counters(),
        "scope": scope,
        "hosts": {},
        "dns_filter": None,
        "outgoing": outgoing,
        "remote_enabled": True,
        "mark": 0x434D,
        "hosts_file": path,
    }
    resolver = Docker(**options)
    resolver.asked_locally = []
    egress = Egress(
        tunnels=FakeClient(tunnel),  # type: ignore[arg-type]
        book=book,
        resolver=resolver,
        counters=Counters(),
        scope=scope,
        outgoing=outgoing,
        mark=0x434D,
    )
    return resolver, egress, tunnel


def resolve(r: dns.Resolver, name: str, qtype: str = "A") -> list[str]:
    answer = DNSRecord.parse(asyncio.run(r.answer(DNSRecord.question(name, qtype).pack())))
    return [str(rr.rdata) for rr in answer.rr]


def connect(egress: Egress, address: str, port: int, protocol: str = "tcp") -> tuple[Route, str]:
    """(side, the address connected to there) for a new connection."""
    decision = egress.decide(address, port, protocol)  # type: ignore[arg-type]
    if decision.route == Route.REMOTE:
        return decision.route, decision.destination
    return decision.route, asyncio.run(egress.local_address(decision))


# Fault 3: a cluster address inside a local subnet.


def test_a_cluster_name_whose_address_is_in_a_local_subnet_still_reaches_the_cluster() -> None:
    r, egress, _ = sidecar({"peer.team.svc.cluster.local": "172.30.255.77"})
    [given] = resolve(r, "peer.team.svc.cluster.local")
    assert ipaddress.ip_address(given) in dns.STAND_INS
    assert connect(egress, given, 8080) == (Route.REMOTE, "172.30.255.77")
    # The local container holding that address is still reached by its own name and address.
    assert resolve(r, "bystander") == ["172.30.255.77"]
    assert connect(egress, "172.30.255.77", 8080) == (Route.LOCAL, "172.30.255.77")
    # And the same name keeps its stand-in: an app that cached it still reaches the cluster.
    assert resolve(r, "peer.team.svc.cluster.local") == [given]


def test_the_old_way_decided_by_address_sends_it_local() -> None:
    """What the fix changes: the cluster's own address, connected to directly, is local."""
    _, egress, _ = sidecar({})
    assert connect(egress, "172.30.255.77", 8080) == (Route.LOCAL, "172.30.255.77")


# Fault 5: a port- or protocol-qualified local rule takes only that traffic.


def test_a_udp_port_rule_keeps_the_names_other_traffic_in_the_cluster() -> None:
    outgoing = parse_filter("local", ["udp://orders.x:9999"])
    r, egress, tunnel = sidecar({"orders.x": "10.96.0.21"}, outgoing)
    assert resolve(r, "orders.x") == ["10.96.0.21"]
    assert tunnel.asked == ["orders.x"]
    assert connect(egress, "10.96.0.21", 8080) == (Route.REMOTE, "10.96.0.21")
    assert connect(egress, "10.96.0.21", 9999, "tcp") == (Route.REMOTE, "10.96.0.21")
    # UDP 9999 is local: the name resolved again on this side (not known here: its address).
    assert connect(egress, "10.96.0.21", 9999, "udp") == (Route.LOCAL, "10.96.0.21")


def test_a_qualified_local_rule_reaches_the_local_meaning_of_the_name() -> None:
    outgoing = parse_filter("local", ["tcp://pg.x:5432"])
    r, egress, _ = sidecar({"pg.x": "10.96.0.20"}, outgoing)
    assert resolve(r, "pg.x") == ["10.96.0.20"]
    assert connect(egress, "10.96.0.20", 5432) == (Route.LOCAL, "172.30.255.5")
    assert connect(egress, "10.96.0.20", 80) == (Route.REMOTE, "10.96.0.20")


# Fault 6: routing does not depend on which name resolved last.


def test_an_alias_resolved_later_does_not_change_where_the_first_name_goes() -> None:
    outgoing = parse_filter("remote", ["tcp://postgres.x:5432"])
    r, egress, _ = sidecar({"postgres.x": "10.96.0.20", "shop-db.x": "10.96.0.20"}, outgoing)
    assert resolve(r, "postgres.x") == ["10.96.0.20"]
    [alias] = resolve(r, "shop-db.x")
    assert alias != "10.96.0.20"  # decided differently: an address of its own
    for _ in range(2):  # and a cached answer changes nothing either
        resolve(r, "shop-db.x")
        assert connect(egress, "10.96.0.20", 5432) == (Route.REMOTE, "10.96.0.20")
        assert connect(egress, alias, 5432)[0] == Route.LOCAL


def test_aliases_that_route_alike_share_the_clusters_address() -> None:
    r, egress, _ = sidecar({"orders.x": "10.96.0.21", "orders-alias.x": "10.96.0.21"})
    assert resolve(r, "orders.x") == ["10.96.0.21"]
    assert resolve(r, "orders-alias.x") == ["10.96.0.21"]
    assert connect(egress, "10.96.0.21", 8080) == (Route.REMOTE, "10.96.0.21")


def test_an_extra_hosts_address_shared_with_a_cluster_name_routes_each_its_way(
    tmp_path: Path,
) -> None:
    hosts = "127.0.0.1 localhost\n10.96.0.21 legacy.example\n"
    r, egress, _ = sidecar({"orders.x": "10.96.0.21"}, hosts_file=hosts, tmp=tmp_path)
    assert resolve(r, "legacy.example") == ["10.96.0.21"]
    [given] = resolve(r, "orders.x")
    assert given != "10.96.0.21"
    resolve(r, "legacy.example")
    assert connect(egress, given, 8080) == (Route.REMOTE, "10.96.0.21")
    # Fault 8: an app that read /etc/hosts connects to the address itself: local.
    assert connect(egress, "10.96.0.21", 8080) == (Route.LOCAL, "10.96.0.21")


# Fault 8: the names Docker's DNS answers for the namespace stay local.


def test_a_container_of_a_shared_network_is_asked_of_docker_first() -> None:
    r, _, tunnel = sidecar({})
    assert resolve(r, "shared-cache") == ["172.30.255.9"]
    assert resolve(r, "shared-cache", "AAAA") == []
    assert tunnel.asked == []
    # A single-label name Docker does not know goes to the cluster.
    resolve(r, "nosuchname")
    assert tunnel.asked == ["nosuchname"]


def test_names_on_the_namespaces_networks_and_reverse_lookups_of_its_addresses_are_local() -> None:
    r, _, tunnel = sidecar({})
    asyncio.run(r.learn_domains(["172.30.255.2"]))
    assert r.domains == {"shop_default"}
    assert resolve(r, "db.shop_default") == ["172.30.255.5"]
    assert resolve(r, "5.255.30.172.in-addr.arpa", "PTR") == []  # asked of Docker, not the cluster
    assert tunnel.asked == []
    resolve(r, "21.0.96.10.in-addr.arpa", "PTR")
    assert tunnel.asked == ["21.0.96.10.in-addr.arpa"]


def test_a_reverse_lookup_of_a_stand_in_gives_the_name_it_stands_for() -> None:
    r, _, tunnel = sidecar({"peer.x": "172.30.255.77"})
    [given] = resolve(r, "peer.x")
    assert resolve(r, ipaddress.ip_address(given).reverse_pointer, "PTR") == ["peer.x."]
    assert tunnel.asked == ["peer.x"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("5.255.30.172.in-addr.arpa", "172.30.255.5"),
        ("5.255.30.172.in-addr.arpa.", "172.30.255.5"),
        ("x.in-addr.arpa", None),
        ("example.com", None),
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", "fd00::1"),
    ],
)
def test_reverse_address(name: str, expected: str | None) -> None:
    found = dns.reverse_address(name)
    assert (None if found is None else str(found)) == expected


# The book on its own.


def test_stand_ins_are_reused_oldest_first_once_all_are_taken() -> None:
    book = dns.Book(reserved=lambda address: True, stand_ins=ipaddress.IPv4Network("198.18.0.0/30"))
    first = book.give("a.x", Route.REMOTE, "10.0.0.1")
    second = book.give("b.x", Route.REMOTE, "10.0.0.2")
    assert {first, second} == {"198.18.0.1", "198.18.0.2"}
    assert book.give("a.x", Route.REMOTE, "10.0.0.1") == first
    third = book.give("c.x", Route.REMOTE, "10.0.0.3")
    assert third == second  # b.x was used longest ago
    assert book.lookup(third) == dns.Answered("c.x", Route.REMOTE, "10.0.0.3")
    assert book.lookup(first) == dns.Answered("a.x", Route.REMOTE, "10.0.0.1")


def test_ipv6_answers_are_left_alone() -> None:
    book = dns.Book(reserved=lambda address: True)
    assert book.give("a.x", Route.REMOTE, "fd00::1") == "fd00::1"
    assert book.lookup("fd00::1") is None


# The firewall and the namespace's own addresses.


def test_stand_ins_go_to_the_proxies_before_local_networks_are_skipped() -> None:
    plan = firewall.Plan(
        mark=0x434D,
        dns_port=53,
        proxy_port=15001,
        tcp=True,
        udp=True,
        udp_port=15002,
        direct=[ipaddress.ip_network("198.18.0.0/16")],  # even a local network overlapping them
        stand_ins=dns.STAND_INS,
    )
    rules = firewall.render(plan).splitlines()
    redirect = rules.index("-A COMPOSEMIRROR -d 198.18.0.0/15 -p tcp -j REDIRECT --to-ports 15001")
    skips = [
        i for i, line in enumerate(rules) if line == "-A COMPOSEMIRROR -d 198.18.0.0/16 -j RETURN"
    ]
    assert len(skips) == 2 and redirect < skips[0]
    mark = rules.index("-A COMPOSEMIRROR -d 198.18.0.0/15 -p udp -j MARK --set-mark 0x434e")
    assert skips[0] < mark < skips[1]


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 172.17.0.0/16 2 0 2
        +-- 172.17.0.0/30 2 0 2
           |-- 172.17.0.0
              /16 link UNICAST
           |-- 172.17.0.2
              /32 host LOCAL
        |-- 172.17.255.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 172.17.0.2
              /32 host LOCAL
           |-- 10.9.0.4
              /32 host LOCAL
"""


def test_own_addresses_are_read_from_the_fib_trie() -> None:
    assert own_addresses(FIB_TRIE) == ["172.17.0.2", "10.9.0.4"]


IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
"""


def test_a_namespace_with_only_link_local_ipv6_is_fine() -> None:
    refuse_ipv6(IF_INET6)
    refuse_ipv6("")


def test_a_namespace_with_a_global_ipv6_address_is_refused() -> None:
    """Issue 10 fault 10, for networks the compose model does not describe (external ones)."""
    line = "fd00000000000000000000000000000a 05 40 00 80     eth1\n"
    with pytest.raises(SidecarError, match=r"IPv6 addresses \(fd00::a\)"):
        refuse_ipv6(IF_INET6 + line)


def test_a_docker_dns_that_does_not_answer_a_single_label_name_delays_it_briefly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without an explicit ndots Docker may ask the host's resolvers; a slow one costs at most
    DOCKER_PROBE_TIMEOUT before the cluster answers."""
    monkeypatch.setattr(dns, "DOCKER_PROBE_TIMEOUT", 0.05)

    class SlowDocker(Docker):
        async def ask_local(self, request: DNSRecord, alias_of: str | None = None) -> DNSRecord:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    _, egress, tunnel = sidecar({"printer": "10.96.0.40"})
    slow = SlowDocker(
        tunnels=FakeClient(tunnel),  # type: ignore[arg-type]
        book=egress.book,
        counters=Counters(),
        scope=egress.scope,
        hosts={},
        dns_filter=None,
        outgoing=None,
        remote_enabled=True,
        mark=0x434D,
    )
    assert resolve(slow, "printer") == ["10.96.0.40"]
    assert tunnel.asked == ["printer"]
