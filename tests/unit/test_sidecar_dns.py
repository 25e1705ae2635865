"""The sidecar's DNS decisions without sockets: routing, cache, SERVFAIL on timeouts, the book."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord

from composemirror import tasks
from composemirror.errors import TunnelClosed
from composemirror.filters import Route, Scope, parse_filter
from composemirror.sidecar import dns
from composemirror.sidecar.__main__ import local_networks
from composemirror.sidecar.status import Counters


class FakeTunnel:
    """Answers remote queries from a table; None means the agent never answers."""

    def __init__(self, table: dict[str, str | None]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def query(self, payload: bytes) -> bytes:
        request = DNSRecord.parse(payload)
        name = str(request.q.qname).rstrip(".")
        self.asked.append(name)
        address = self.table.get(name, "nx")
        if address is None:
            await asyncio.sleep(3600)
        reply = request.reply()
        if address == "nx":
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=30))
        return bytes(reply.pack())


class FakeClient:
    def __init__(self, tunnel: FakeTunnel | None) -> None:
        self.tunnel = tunnel

    def current(self) -> FakeTunnel:
        if self.tunnel is None:
            raise TunnelClosed("agent not connected")
        return self.tunnel


class LocalTable(dns.Resolver):
    """Docker's DNS replaced by a table of compose names."""

    local: ClassVar[dict[str, str]] = {"db": "172.20.0.5", "web": "172.20.0.6"}
    asked_locally: list[str]

    async def ask_local(self, request: DNSRecord, alias_of: str | None = None) -> DNSRecord:
        name = alias_of or str(request.q.qname).rstrip(".")
        self.asked_locally.append(name)
        reply = request.reply()
        if name in self.local:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.local[name]), ttl=600))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def resolver(tunnel: FakeTunnel | None, **overrides: Any) -> LocalTable:
    options: dict[str, Any] = {
        "tunnels": FakeClient(tunnel),
        "book": dns.Book(),
        "counters": Counters(),
        "scope": Scope(names=frozenset({"db", "web", "postgres.shop.svc.cluster.local"})),
        "hosts": {"postgres.shop.svc.cluster.local": "db"},
        "dns_filter": None,
        "outgoing": None,
        "remote_enabled": True,
        "mark": 0x434D,
    } | overrides
    made = LocalTable(**options)
    made.asked_locally = []
    return made


def ask(r: dns.Resolver, name: str, qtype: str = "A") -> DNSRecord:
    return DNSRecord.parse(asyncio.run(r.answer(DNSRecord.question(name, qtype).pack())))


def addresses(record: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in record.rr]


def test_hosts_names_answer_with_the_local_service_and_never_go_remote() -> None:
    tunnel = FakeTunnel({"postgres.shop.svc.cluster.local": "10.96.0.20"})
    r = resolver(tunnel)
    answer = ask(r, "postgres.shop.svc.cluster.local")
    assert addresses(answer) == ["172.20.0.5"]
    assert str(answer.rr[0].rname) == "postgres.shop.svc.cluster.local."
    assert tunnel.asked == []
    assert r.book.lookup("172.20.0.5") == dns.Answered(
        "postgres.shop.svc.cluster.local", Route.LOCAL, "172.20.0.5"
    )


def test_remote_names_go_to_the_agent_and_are_remembered() -> None:
    tunnel = FakeTunnel({"orders.x": "10.96.0.21"})
    r = resolver(tunnel)
    assert addresses(ask(r, "orders.x")) == ["10.96.0.21"]
    assert r.asked_locally == []
    assert r.book.lookup("10.96.0.21") == dns.Answered("orders.x", Route.REMOTE, "10.96.0.21")


def test_project_names_are_answered_locally() -> None:
    tunnel = FakeTunnel({})
    r = resolver(tunnel)
    assert addresses(ask(r, "web")) == ["172.20.0.6"]
    assert tunnel.asked == []


def test_the_dns_filter_keeps_listed_names_local() -> None:
    tunnel = FakeTunnel({})
    r = resolver(tunnel, dns_filter=parse_filter("local", ["*.internal"], protocols=False))
    assert ask(r, "vault.internal").header.rcode == RCODE.NXDOMAIN  # asked locally
    assert r.asked_locally == ["vault.internal"] and tunnel.asked == []


def test_remote_dns_disabled_resolves_everything_locally() -> None:
    tunnel = FakeTunnel({"orders": "10.96.0.21"})
    r = resolver(tunnel, remote_enabled=False)
    ask(r, "orders")
    assert tunnel.asked == [] and r.asked_locally == ["orders"]


def test_answers_are_cached_for_their_ttl() -> None:
    tunnel = FakeTunnel({"orders": "10.96.0.21"})
    r = resolver(tunnel)
    ask(r, "orders")
    assert addresses(ask(r, "orders")) == ["10.96.0.21"]
    assert tunnel.asked == ["orders"]
    assert r.counters.dns_cached == 1


def test_an_agent_that_does_not_answer_gives_servfail_which_is_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dns, "UPSTREAM_TIMEOUT", 0.05)
    tunnel = FakeTunnel({"slow": None})
    r = resolver(tunnel)
    assert ask(r, "slow").header.rcode == RCODE.SERVFAIL
    assert ask(r, "slow").header.rcode == RCODE.SERVFAIL
    assert tunnel.asked == ["slow", "slow"]
    assert r.counters.dns_failed == 2


def test_no_tunnel_gives_servfail_at_once() -> None:
    r = resolver(None)
    assert ask(r, "orders").header.rcode == RCODE.SERVFAIL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_ages_ttls_and_expires() -> None:
    clock = Clock()
    cache = dns.Cache(clock=clock)
    reply = DNSRecord.question("orders").reply()
    reply.add_answer(RR("orders", QTYPE.A, rdata=A("10.96.0.21"), ttl=30))
    cache.put(("orders", 1, 1), reply)
    clock.now += 10
    cached = cache.get(("orders", 1, 1))
    assert cached is not None and cached.rr[0].ttl == 20
    clock.now += 21
    assert cache.get(("orders", 1, 1)) is None


def test_negative_answers_are_cached_by_the_soa_minimum_and_failures_never() -> None:
    nx = DNSRecord.question("x").reply()
    nx.header.rcode = RCODE.NXDOMAIN
    assert dns.cache_ttl(nx) == dns.NEGATIVE_TTL
    nx.add_auth(
        RR("cluster.local", QTYPE.SOA, ttl=60, rdata=SOA("ns", "hostmaster", (1, 2, 3, 4, 7)))
    )
    assert dns.cache_ttl(nx) == 7
    servfail = DNSRecord.question("x").reply()
    servfail.header.rcode = RCODE.SERVFAIL
    assert dns.cache_ttl(servfail) == 0


def test_the_book_forgets_the_oldest_beyond_its_size() -> None:
    book = dns.Book(size=2)
    book.remember("10.0.0.1", "a", Route.REMOTE)
    book.remember("10.0.0.2", "b", Route.REMOTE)
    book.remember("10.0.0.3", "c", Route.LOCAL)
    assert book.lookup("10.0.0.1") is None
    assert book.lookup("10.0.0.3") == dns.Answered("c", Route.LOCAL, "10.0.0.3")


def test_local_networks_are_the_directly_connected_routes() -> None:
    table = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010014AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000014AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    assert [str(n) for n in local_networks(table)] == ["172.20.0.0/16", "192.168.0.0/24"]


def test_original_destinations_are_read_from_the_kernel_formats() -> None:
    import socket
    import struct

    from composemirror.sidecar import proxy, udp

    sockaddr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9999)
    sockaddr += socket.inet_aton("10.96.0.21") + b"\0" * 8
    ancillary = [(socket.SOL_IP, 7, b"ignored"), (socket.SOL_IP, udp.IP_ORIGDSTADDR, sockaddr)]
    assert udp.original_destination(ancillary) == ("10.96.0.21", 9999)
    assert udp.original_destination([]) is None

    class Sock:
        def getsockopt(self, level: int, option: int, size: int) -> bytes:
            assert (level, option, size) == (socket.SOL_IP, proxy.SO_ORIGINAL_DST, 16)
            return sockaddr

    assert proxy.original_destination(Sock()) == ("10.96.0.21", 9999)  # type: ignore[arg-type]


def test_cache_hits_echo_the_querys_id_rd_bit_and_letter_case() -> None:
    tunnel = FakeTunnel({"orders.shop.svc.cluster.local": "10.96.0.21"})
    r = resolver(tunnel)
    ask(r, "orders.shop.svc.cluster.local")
    query = DNSRecord.question("OrDeRs.Shop.svc.cluster.local")
    query.header.id = 4242
    query.header.rd = 0
    reply = DNSRecord.parse(asyncio.run(r.answer(query.pack())))
    assert reply.header.id == 4242 and reply.header.rd == 0 and reply.header.qr == 1
    assert str(reply.q.qname) == "OrDeRs.Shop.svc.cluster.local."
    assert addresses(reply) == ["10.96.0.21"]
    assert tunnel.asked == ["orders.shop.svc.cluster.local"]
    assert r.counters.dns_cached == 1


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 11, b"\x12\x34\x81\x00" + b"\x00" * 13, DNSRecord.question("a").pack()[:-3]],
)
def test_garbage_never_reaches_the_cache_path(garbage: bytes) -> None:
    assert dns.question_of(garbage) is None
    reply = asyncio.run(resolver(FakeTunnel({})).answer(garbage))
    assert len(reply) >= 2


def big_answer(count: int = 100) -> bytes:
    """An answer with `count` A records, far over 512 bytes, as the cluster DNS gives it."""
    reply = DNSRecord.question("big.example.test").reply(aa=0)
    for i in range(count):
        reply.add_answer(RR("big.example.test", QTYPE.A, rdata=A(f"10.124.1.{i}"), ttl=60))
    return bytes(reply.pack())


def test_an_answer_over_512_bytes_is_truncated_with_its_question_kept() -> None:
    """glibc retries a TC answer over TCP only when its question matches the query's."""
    full = big_answer()
    short = DNSRecord.parse(dns.truncate(full, 512))
    assert len(dns.truncate(full, 512)) <= 512
    assert short.header.tc == 1
    assert [str(q.qname) for q in short.questions] == ["big.example.test."]
    assert short.header.id == DNSRecord.parse(full).header.id
    # Whole records only, each one of the full answer's.
    assert 0 < len(short.rr) < 100
    assert {str(rr.rdata) for rr in short.rr} <= {f"10.124.1.{i}" for i in range(100)}


def test_a_client_without_edns_gets_a_truncated_udp_answer_and_tcp_the_whole() -> None:
    class Transport:
        sent: ClassVar[list[bytes]] = []

        def sendto(self, data: bytes, addr: object) -> None:
            self.sent.append(data)

    server = dns.UdpServer(resolver(FakeTunnel({})), tasks=None)  # type: ignore[arg-type]
    server.transport = Transport()
    query = DNSRecord.question("big.example.test").pack()
    server._send(big_answer(), query, ("127.0.0.1", 5353))
    udp = DNSRecord.parse(Transport.sent[-1])
    assert udp.header.tc == 1 and len(Transport.sent[-1]) <= 512
    assert str(udp.q.qname) == "big.example.test."
    # With EDNS and a 4096-byte buffer the whole answer fits.
    edns = DNSRecord.question("big.example.test")
    edns.add_ar(EDNS0(udp_len=4096))
    server._send(big_answer(), edns.pack(), ("127.0.0.1", 5353))
    assert len(DNSRecord.parse(Transport.sent[-1]).rr) == 100

    async def over_tcp() -> bytes:
        r = resolver(FakeTunnel({}))
        r.cache.put(("big.example.test", QTYPE.A, 1), DNSRecord.parse(big_answer()))
        reader = asyncio.StreamReader()
        reader.feed_data(len(query).to_bytes(2, "big") + query)
        reader.feed_eof()
        written = bytearray()

        class Writer:
            def write(self, data: bytes) -> None:
                written.extend(data)

            async def drain(self) -> None:
                pass

            def close(self) -> None:
                pass

        await dns.serve_tcp(r, reader, Writer())  # type: ignore[arg-type]
        return bytes(written[2:])

    tcp = DNSRecord.parse(asyncio.run(over_tcp()))
    assert tcp.header.tc == 0 and len(tcp.rr) == 100


def test_cached_answers_claim_ad_only_to_clients_that_ask_for_it() -> None:
    """RFC 6840 5.8: AD goes to a client that set AD or DO, never to one that did not."""
    validated = DNSRecord.question("signed.example.test").reply(aa=0)
    validated.header.ad = 1
    validated.add_answer(RR("signed.example.test", QTYPE.A, rdata=A("10.124.0.9"), ttl=60))
    r = resolver(FakeTunnel({}))
    r.cache.put(("signed.example.test", QTYPE.A, 1), validated)

    def cached(query: DNSRecord) -> DNSRecord:
        reply = r.cached(query.pack())
        assert reply is not None
        return DNSRecord.parse(reply)

    plain = DNSRecord.question("signed.example.test")
    assert cached(plain).header.ad == 0
    asking = DNSRecord.question("signed.example.test")
    asking.header.ad = 1
    assert cached(asking).header.ad == 1
    dnssec = DNSRecord.question("signed.example.test")
    dnssec.add_ar(EDNS0(flags="do", udp_len=1232))
    assert cached(dnssec).header.ad == 1
    checking = DNSRecord.question("signed.example.test")
    checking.header.cd = 1
    assert cached(checking).header.cd == 1 and cached(plain).header.cd == 0


def test_answers_made_here_are_not_authoritative_nor_authenticated() -> None:
    query = DNSRecord.question("nowhere.example.test")
    query.header.ad = 1
    reply = DNSRecord.parse(asyncio.run(resolver(None).answer(query.pack())))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert reply.header.aa == 0 and reply.header.ad == 0


def test_an_edns_query_gets_an_opt_record_and_a_plain_one_none() -> None:
    """RFC 6891 7: EDNS answered with EDNS, fresh or cached; never OPT to a plain query."""
    r = resolver(FakeTunnel({"orders.shop.svc.cluster.local": "10.96.0.21"}))
    edns = DNSRecord.question("orders.shop.svc.cluster.local")
    edns.add_ar(EDNS0(udp_len=4096))
    plain = DNSRecord.question("orders.shop.svc.cluster.local")
    for query in (edns, plain, edns, plain):  # the first fresh, the rest from the cache
        reply = DNSRecord.parse(asyncio.run(r.answer(query.pack())))
        opts = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
        assert len(opts) == (1 if query is edns else 0)
        assert [str(rr.rdata) for rr in reply.rr] == ["10.96.0.21"]


def test_a_project_name_expanded_with_a_search_domain_stays_local(tmp_path: Path) -> None:
    """With the target's `ndots:5` the app tries `db.team.svc.cluster.local` before `db`: a
    cluster service of that name must not shadow the project's own `db`."""
    cluster = {
        "db.team.svc.cluster.local": "10.96.0.40",
        "orders.team.svc.cluster.local": "10.96.0.21",
    }
    tunnel = FakeTunnel(dict(cluster))
    r = resolver(tunnel, search=("team.svc.cluster.local",))
    assert ask(r, "db.team.svc.cluster.local").header.rcode == RCODE.NXDOMAIN
    assert addresses(ask(r, "db")) == ["172.20.0.5"]
    assert addresses(ask(r, "orders.team.svc.cluster.local")) == ["10.96.0.21"]
    assert tunnel.asked == ["orders.team.svc.cluster.local"]
    # A filter that sends the project name remote sends its expansions there too.
    remote = resolver(
        FakeTunnel(dict(cluster)),
        search=("team.svc.cluster.local",),
        dns_filter=parse_filter("remote", ["db", "db.team.svc.cluster.local"], protocols=False),
    )
    assert addresses(ask(remote, "db.team.svc.cluster.local")) == ["10.96.0.40"]
    # Listing only the cluster's full name in a `remote` filter (the outgoing one, for all
    # its traffic or one port, or the DNS one) is enough: that name is the cluster's.
    for listed in (
        {"outgoing": parse_filter("remote", ["db.team.svc.cluster.local"])},
        {"outgoing": parse_filter("remote", ["tcp://db.team.svc.cluster.local:5432"])},
        {"dns_filter": parse_filter("remote", ["db.team.svc.cluster.local"], protocols=False)},
    ):
        only_full = resolver(
            FakeTunnel(dict(cluster)), search=("team.svc.cluster.local",), **listed
        )
        assert addresses(ask(only_full, "db.team.svc.cluster.local")) == ["10.96.0.40"]
        assert addresses(ask(only_full, "db.team.svc.cluster.local.")) == ["10.96.0.40"]
    # A `local` filter's entry for the name leaves it shadowed by the project's `db`.
    kept = resolver(
        FakeTunnel(dict(cluster)),
        search=("team.svc.cluster.local",),
        outgoing=parse_filter("local", ["tcp://db.team.svc.cluster.local:5432"]),
    )
    assert ask(kept, "db.team.svc.cluster.local").header.rcode == RCODE.NXDOMAIN
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.11\nsearch team.svc.cluster.local. svc.cluster.local\n")
    assert dns.read_search(resolv) == ("team.svc.cluster.local", "svc.cluster.local")
    assert dns.read_search(tmp_path / "missing") == ()


CONNTRACK = (
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.1.0.2 dst=10.9.9.9 sport=40000 dport=53 "
    "src=127.0.0.1 dst=10.1.0.2 sport=53 dport=40000 [ASSURED] mark=0 zone=0 use=2\n"
    "ipv4     2 udp      17 29 src=10.1.0.2 dst=10.255.255.53 sport=40000 dport=53 [UNREPLIED] "
    "src=127.0.0.1 dst=10.1.0.2 sport=53 dport=40000 mark=0 zone=0 use=2\n"
    "ipv4     2 udp      17 29 src=127.0.0.1 dst=127.0.0.11 sport=41000 dport=53 "
    "src=127.0.0.11 dst=127.0.0.1 sport=33333 dport=41000 mark=0 zone=0 use=2\n"
)
"""/proc/net/nf_conntrack: a TCP query, Docker's forwarded UDP one, the app's to Docker's DNS."""


def test_the_original_destination_of_a_redirected_query_is_read_from_conntrack() -> None:
    assert dns.original_destination(CONNTRACK, ("10.1.0.2", 40000)) == ("10.255.255.53", 53)
    assert dns.original_destination(CONNTRACK, ("127.0.0.1", 41000)) == ("127.0.0.11", 53)
    assert dns.original_destination(CONNTRACK, ("10.1.0.2", 40001)) is None


def test_dockers_forwarding_of_a_question_being_asked_goes_where_docker_sent_it(
    tmp_path: Path,
) -> None:
    """Docker's DNS forwards a name it does not own from inside the namespace: the same
    question arriving while it is asked of Docker goes to the nameserver, never back to Docker;
    an app's query to Docker's address, or a question not being asked, is answered as usual."""
    r = resolver(FakeTunnel({}))
    r.conntrack = tmp_path / "nf_conntrack"
    r.conntrack.write_text(CONNTRACK)
    query = bytes(DNSRecord.question("zz1.nonexist.example.com", "A").pack())
    assert r.forwarded_by_docker(query, ("10.1.0.2", 40000)) is None
    r.asking[("zz1.nonexist.example.com", QTYPE.A)] += 1
    assert r.forwarded_by_docker(query, ("10.1.0.2", 40000)) == ("10.255.255.53", 53)
    assert r.forwarded_by_docker(query, ("127.0.0.1", 41000)) is None
    r.conntrack = tmp_path / "absent"
    assert r.forwarded_by_docker(query, ("10.1.0.2", 40000)) is None


class Sent:
    """A datagram transport that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[DNSRecord] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(DNSRecord.parse(data))


def test_lookups_beyond_the_cap_are_servfail_at_once_and_cached_names_still_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood of names the agent is slow to answer: two are looked up, the rest are SERVFAIL
    at once (with their id and question), a cached name is answered at once all the while, and
    the slots come back when the lookups end."""
    monkeypatch.setattr(dns, "UPSTREAM_TIMEOUT", 0.2)

    async def scenario() -> None:
        tunnel = FakeTunnel({"orders.x": "10.96.0.21"} | {f"n{i}.never.x": None for i in range(5)})
        r = resolver(tunnel, max_lookups=2)
        async with tasks.scope() as spawner:
            server = dns.UdpServer(r, spawner)
            transport = Sent()
            server.transport = transport
            assert DNSRecord.parse(await r.answer(DNSRecord.question("orders.x").pack())).rr
            flood = [DNSRecord.question(f"n{i}.never.x") for i in range(5)]
            for query in flood:
                server.datagram_received(query.pack(), ("127.0.0.1", 5353))
            cached = DNSRecord.question("orders.x")
            server.datagram_received(cached.pack(), ("127.0.0.1", 5354))
            assert r.in_flight == 2 and r.refused == 3
            refused, hit = transport.sent[:3], transport.sent[3]
            assert [(a.header.id, str(a.q.qname)) for a in refused] == [
                (q.header.id, str(q.q.qname)) for q in flood[2:]
            ]
            assert {a.header.rcode for a in refused} == {RCODE.SERVFAIL}
            assert hit.header.id == cached.header.id and addresses(hit) == ["10.96.0.21"]
            await asyncio.sleep(0.5)  # the two lookups time out: SERVFAIL, slots back
            assert r.in_flight == 0 and len(transport.sent) == 6
            assert tunnel.asked.count("n0.never.x") == 1 and "n2.never.x" not in tunnel.asked

    asyncio.run(scenario())


def test_the_cap_holds_over_tcp_too() -> None:
    r = resolver(FakeTunnel({}), max_lookups=0)
    query = DNSRecord.question("orders.x").pack()

    async def over_tcp() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(len(query).to_bytes(2, "big") + query)
        reader.feed_eof()
        written = bytearray()

        class Writer:
            def write(self, data: bytes) -> None:
                written.extend(data)

            async def drain(self) -> None:
                pass

            def close(self) -> None:
                pass

        await dns.serve_tcp(r, reader, Writer())  # type: ignore[arg-type]
        return bytes(written[2:])

    answer = DNSRecord.parse(asyncio.run(over_tcp()))
    assert answer.header.rcode == RCODE.SERVFAIL and r.refused == 1 and r.in_flight == 0


@pytest.mark.parametrize("edns", [False, True])
def test_a_servfail_made_from_the_querys_bytes_is_a_proper_reply(edns: bool) -> None:
    query = DNSRecord.question("Orders.X", "AAAA")
    query.header.cd = 1
    if edns:
        query.add_ar(EDNS0(udp_len=4096))
    reply = DNSRecord.parse(dns.servfail(query.pack()))
    assert reply.header.id == query.header.id
    assert (reply.header.qr, reply.header.rd, reply.header.ra, reply.header.cd) == (1, 1, 1, 1)
    assert (reply.header.aa, reply.header.ad, reply.header.tc) == (0, 0, 0)
    assert reply.header.rcode == RCODE.SERVFAIL
    assert reply.q.qname.label == query.q.qname.label and reply.q.qtype == QTYPE.AAAA
    assert reply.rr == [] and [rr.rtype for rr in reply.ar] == ([QTYPE.OPT] if edns else [])
    assert dns.servfail(b"\x12\x34garbage")[:2] == b"\x12\x34"


def test_a_burst_of_queries_queued_on_the_socket_is_answered_whole() -> None:
    """Queries that arrive while the loop is busy wait in the socket's queue, which holds
    thousands (beyond net.core.rmem_max: the sidecar has NET_ADMIN, as these tests run as
    root); all are read and answered once the loop runs again."""

    async def scenario() -> list[int]:
        r = resolver(FakeTunnel({"orders.x": "10.96.0.21"}))
        await r.answer(DNSRecord.question("orders.x").pack())  # cached from now on
        async with tasks.scope() as spawner:
            server = dns.UdpServer(r, spawner)
            server.listen(("127.0.0.1", 0))
            assert server.sock is not None
            buffer = server.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert buffer >= dns.RECEIVE_BUFFER  # Linux reports twice what was set
            address = server.sock.getsockname()
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.setblocking(False)
            for ident in range(150):  # the loop does not run meanwhile
                query = DNSRecord.question("orders.x")
                query.header.id = ident
                client.sendto(query.pack(), address)
            loop = asyncio.get_running_loop()
            answered: list[int] = []
            while len(answered) < 150:
                reply = await asyncio.wait_for(loop.sock_recv(client, 4096), 2)
                answered.append(DNSRecord.parse(reply).header.id)
            server.close()
            client.close()
            return answered

    assert sorted(asyncio.run(scenario())) == list(range(150))
