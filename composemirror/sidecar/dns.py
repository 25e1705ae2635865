"""The sidecar's DNS server: every query of the shared network namespace arrives here.

Local names (the project's services, `hosts` entries, names the filters keep local, and every
name Docker's DNS answers for the namespace) are answered on this side: `hosts` names with the
address Docker's DNS gives their compose service, the rest by /etc/hosts or Docker's DNS. Remote
names go through the tunnel to the agent, which resolves them as the target does. Answers are
cached by TTL; an upstream that does not answer gives SERVFAIL, which is never cached. The book
records the name each address was answered for, so the proxy decides by the name asked.
Docker's DNS asks the host's resolvers from inside the namespace, so its queries arrive here too:
they are passed on to where Docker sent them (see `Resolver.forwarded_by_docker`). At most
`MAX_LOOKUPS` queries are looked up at once; beyond, a query is SERVFAIL at once, while cached
answers are always served at once (see `Resolver.admit`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dnslib import AAAA, PTR, QTYPE, RCODE, RR, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from composemirror.errors import TunnelClosed
from composemirror.filters import (
    Filter,
    Route,
    Scope,
    normalise_name,
    route_query,
    routing_key,
)
from composemirror.sidecar.status import Counters
from composemirror.sidecar.tunnel import TunnelClient
from composemirror.tasks import Tasks

log = logging.getLogger(__name__)

DOCKER_DNS = ("127.0.0.11", 53)
CONNTRACK = Path("/proc/net/nf_conntrack")
"""The namespace's connection tracking table, which holds where a redirected query was sent."""
UPSTREAM_TIMEOUT = 4.0
DOCKER_PROBE_TIMEOUT = 1.0
"""How long a single-label name waits for Docker's DNS before it is asked of the cluster."""
MAX_LOOKUPS = 256
"""Queries looked up at once (the cache could not answer them); the agent's default cap too."""
CACHE_SIZE = 10_000
NEGATIVE_TTL = 5
MAX_TTL = 300
BOOK_SIZE = 65_536
UDP_PAYLOAD = 512
EDNS_PAYLOAD = 1232
"""The UDP payload size this server advertises over EDNS (DNS Flag Day 2020's figure)."""
"""The most a UDP answer may hold for a query without EDNS (RFC 1035 4.2.1)."""
READ_BURST = 64
"""Queries read from the UDP socket at most each time it is readable, before others run."""
RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes of queries the kernel may queue for the UDP socket (some thousands of queries)."""
SO_RCVBUFFORCE = 33
"""socket(7)'s option that sets a receive buffer beyond rmem_max (Linux; Python has no name)."""
MAX_QUERY = 65535
SATURATION_LOG_INTERVAL = 10.0
"""Seconds between two warnings that queries are refused (see `Resolver.admit`)."""
AD_BIT = 0x20
CD_BIT = 0x10
"""Bits of the header's second flags byte (RFC 4035 3.2)."""


STAND_INS = ipaddress.IPv4Network("198.18.0.0/15")
"""Where stand-in addresses come from: RFC 2544's benchmarking range, routed nowhere real. The
firewall sends every connection to it to the proxies, whatever the local networks are."""


@dataclass(frozen=True, slots=True)
class Answered:
    """What an address given to the app stands for."""

    name: str
    """The name the app asked for (normalised), not a CNAME's target."""
    side: Route
    """Where the name was resolved."""
    address: str
    """The address it resolved to there: the one a connection is made to."""


class Book:
    """The name (and side) behind each address the app was given, so the proxies decide each
    connection by the name the app asked for it, never by "the last name that resolved to this
    address".

    The app gets the address the name has on its side, as the target would, unless that
    address would be ambiguous here. A remote name then gets a *stand-in* address of its own
    from `STAND_INS` (one per name and address), which the proxies translate back, as
    Telepresence translates cluster subnets that conflict with local ones into a virtual
    subnet. That happens when the cluster's address is one this side owns (a local subnet, an
    /etc/hosts address, loopback: `reserved`), or when the address was already given for a
    name whose connections are decided differently (another `routing_key`). So aliases of one
    address share it when they route alike, and only then. The trade-off: in those cases the
    app sees an address the target does not (`getent hosts` differs, the connection does not).
    The first name to claim an address keeps it; local answers always keep their own address.
    """

    def __init__(
        self,
        size: int = BOOK_SIZE,
        *,
        key: Callable[[str, Route], str] = lambda name, side: f"side:{side}",
        reserved: Callable[[str], bool] = lambda address: False,
        stand_ins: ipaddress.IPv4Network = STAND_INS,
    ) -> None:
        self.size = size
        self.key = key
        self.reserved = reserved
        self.stand_ins = stand_ins
        self.entries: OrderedDict[str, tuple[str, Answered]] = OrderedDict()
        """Real address -> (routing key, the first name given it)."""
        self.standing: OrderedDict[str, Answered] = OrderedDict()
        """Stand-in address -> what it stands for."""
        self.stood: dict[tuple[str, str], str] = {}
        """(name, real address) -> its stand-in."""
        self.next = 1

    def give(self, name: str, side: Route, address: str) -> str:
        """The address to answer `name` with, for `address` resolved on `side`; remembered."""
        name = normalise_name(name)
        answered = Answered(name, side, address)
        if ipaddress.ip_address(address).version != 4:
            return address  # IPv6 is not intercepted: nothing to decide
        if side == Route.REMOTE and (self.reserved(address) or self._is_stand_in(address)):
            return self._stand_in(answered)
        key = self.key(name, side)
        found = self.entries.get(address)
        if found is None:
            self.entries[address] = (key, answered)
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
            return address
        self.entries.move_to_end(address)
        if found[0] == key or side == Route.LOCAL:
            return address
        return self._stand_in(answered)

    @classmethod
    def deciding(cls, outgoing: Filter | None, scope: Scope) -> Book:
        """A book for a sidecar with this filter and scope (see `filters.routing_key`)."""
        return cls(
            key=lambda name, side: routing_key(outgoing, name, side, scope),
            reserved=lambda address: scope.owns_address(ipaddress.ip_address(address)),
        )

    def lookup(self, address: str) -> Answered | None:
        """What `address` was given for, if the app got it from this book."""
        if self._is_stand_in(address):
            return self.standing.get(address)
        found = self.entries.get(address)
        return None if found is None else found[1]

    def remember(self, address: str, name: str, route: Route) -> None:
        """Record an address the app may reach by `name` without asking (an /etc/hosts line)."""
        self.give(name, route, address)

    def _is_stand_in(self, address: str) -> bool:
        parsed = ipaddress.ip_address(address)
        return parsed.version == 4 and parsed in self.stand_ins

    def _stand_in(self, answered: Answered) -> str:
        pair = (answered.name, answered.address)
        given = self.stood.get(pair)
        if given is not None:
            self.standing.move_to_end(given)
            return given
        if self.next < self.stand_ins.num_addresses - 1:
            given = str(self.stand_ins[self.next])
            self.next += 1
        else:  # all taken: the one used longest ago is reused
            given, old = self.standing.popitem(last=False)
            del self.stood[(old.name, old.address)]
        self.standing[given] = answered
        self.stood[pair] = given
        return given


@dataclass(slots=True)
class _Entry:
    stored: float
    expires: float
    record: DNSRecord
    age: int = -1
    wire: bytes = b""


class Cache:
    """Answers by (name, type, class), kept for their TTL (negative ones for the SOA minimum).

    A hit costs no parsing: the packed answer, its TTLs aged, is rebuilt at most once a second.
    """

    def __init__(self, size: int = CACHE_SIZE, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.clock = clock
        self.entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()

    def wire(self, key: tuple[str, int, int]) -> bytes | None:
        """The cached answer for `key`, packed, with its TTLs aged; None when absent or expired."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now >= entry.expires:
            del self.entries[key]
            return None
        age = int(now - entry.stored)
        if age != entry.age:
            aged = DNSRecord.parse(entry.record.pack())
            for rr in (*aged.rr, *aged.auth):
                rr.ttl = max(0, rr.ttl - age)
            entry.age, entry.wire = age, bytes(aged.pack())
        return entry.wire

    def get(self, key: tuple[str, int, int]) -> DNSRecord | None:
        wire = self.wire(key)
        return None if wire is None else DNSRecord.parse(wire)

    def put(self, key: tuple[str, int, int], record: DNSRecord) -> None:
        ttl = cache_ttl(record)
        if ttl <= 0:
            return
        now = self.clock()
        self.entries[key] = _Entry(now, now + ttl, record)
        self.entries.move_to_end(key)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


def question_of(query: bytes) -> tuple[int, tuple[str, int, int]] | None:
    """(end of the question section, cache key) of a plain one-question query; None otherwise.

    The hot path of every lookup: a few slices instead of a full dnslib parse.
    """
    if len(query) < 17 or query[4:6] != b"\x00\x01" or query[2] & 0x80:
        return None
    labels = []
    pos = 12
    while True:
        if pos >= len(query):
            return None
        size = query[pos]
        if size == 0:
            pos += 1
            break
        if size & 0xC0:
            return None
        labels.append(query[pos + 1 : pos + 1 + size])
        pos += 1 + size
    if pos + 4 > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, pos)
    name = b".".join(labels).decode("ascii", "replace").lower()
    return pos + 4, (name, qtype, qclass)


def splice(cached: bytes, query: bytes, end: int) -> bytes | None:
    """`cached` answering `query`: the query's id, RD and CD bits and question (with its letter
    case). AD stays only for a client that asked with AD or DO (RFC 6840 5.7-5.8): an answer
    cached for one client must not vouch for its data to another that did not ask."""
    if cached[12:end].lower() != query[12:end].lower():
        return None
    flags = (cached[2] & 0xFE) | (query[2] & 0x01)
    low = (cached[3] & ~(AD_BIT | CD_BIT)) | (query[3] & CD_BIT)
    if query[3] & AD_BIT or _asks_dnssec(query, end):
        low |= cached[3] & AD_BIT
    return query[:2] + bytes((flags, low)) + cached[4:12] + query[12:end] + cached[end:]


def _opt_flags(query: bytes, end: int) -> int | None:
    """The flags of the query's EDNS OPT record (RFC 6891 6.1.3), None without one. Read from the
    wire: a one-question query's OPT record follows the question, with an empty owner name."""
    if query[10:12] == b"\x00\x00" or len(query) < end + 11 or query[end] != 0:
        return None
    rtype, _, _, _, flags = struct.unpack_from("!HHBBH", query, end + 1)
    return int(flags) if rtype == QTYPE.OPT else None


def _asks_dnssec(query: bytes, end: int) -> bool:
    """Whether the query set EDNS's DO bit (RFC 3225)."""
    return bool((_opt_flags(query, end) or 0) & 0x8000)


def with_edns(response: bytes, query: bytes) -> bytes:
    """`response` with an OPT record exactly when `query` had one (RFC 6891 7: a responder
    answers EDNS with EDNS, and a query without it with none). Answers are built and cached
    without OPT; this adds ours, advertising EDNS_PAYLOAD."""
    parsed = question_of(query)
    if parsed is None or _opt_flags(query, parsed[0]) is None or len(response) < 12:
        return response
    additional = struct.unpack_from("!H", response, 10)[0] + 1
    opt = b"\x00" + struct.pack("!HHIH", QTYPE.OPT, EDNS_PAYLOAD, 0, 0)
    return response[:10] + struct.pack("!H", additional) + response[12:] + opt


def without_edns(record: DNSRecord) -> DNSRecord:
    """`record` without its OPT record, so it can answer any query (see `with_edns`)."""
    record.ar = [rr for rr in record.ar if rr.rtype != QTYPE.OPT]
    return record


def cache_ttl(record: DNSRecord) -> int:
    """How long an answer may be reused: its smallest TTL; 0 for failures (never cached)."""
    rcode = record.header.rcode
    if rcode == RCODE.NOERROR and record.rr:
        return int(min(MAX_TTL, min(rr.ttl for rr in record.rr)))
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        soa = [rr for rr in record.auth if rr.rtype == QTYPE.SOA]
        if soa:
            return int(min(MAX_TTL, soa[0].ttl, soa[0].rdata.times[-1]))
        return NEGATIVE_TTL
    return 0


class Resolver:
    """Decides where each query goes and answers it."""

    def __init__(
        self,
        *,
        tunnels: TunnelClient,
        book: Book,
        counters: Counters,
        scope: Scope,
        hosts: dict[str, str],
        dns_filter: Filter | None,
        outgoing: Filter | None,
        remote_enabled: bool,
        mark: int,
        hosts_file: Path = Path("/etc/hosts"),
        search: tuple[str, ...] = (),
        max_lookups: int = MAX_LOOKUPS,
    ) -> None:
        self.tunnels = tunnels
        self.book = book
        self.counters = counters
        self.scope = scope
        self.hosts = hosts
        self.dns_filter = dns_filter
        self.outgoing = outgoing
        self.remote_enabled = remote_enabled
        self.mark = mark
        self.cache = Cache()
        self.static = read_hosts_file(hosts_file)
        self.search = tuple(normalise_name(domain) for domain in search)
        """The namespace's search domains (the target's): see `shadows_local`."""
        self.domains: set[str] = set()
        """Names of the namespace's Docker networks (see `learn_domains`)."""
        self.asking: Counter[tuple[str, int]] = Counter()
        """(name, type) of the questions being asked of Docker's DNS now: the same question
        arriving meanwhile is Docker's own forwarding (see `forwarded_by_docker`)."""
        self.conntrack = CONNTRACK
        self.max_lookups = max_lookups
        """Queries looked up at once, at most (see `admit`)."""
        self.in_flight = 0
        """Queries admitted and not yet answered."""
        self.refused = 0
        """Queries answered SERVFAIL because `max_lookups` were in flight, since start."""
        self._last_warning = -SATURATION_LOG_INTERVAL
        for name, addresses in self.static.items():
            for address in addresses:
                # An app reads /etc/hosts without asking: its lines are answers given locally.
                self.book.remember(address, name, Route.LOCAL)

    def route(self, name: str) -> Route:
        """Where `name` is resolved: `filters.route_query`, and every name Docker's DNS answers
        for this namespace is local unless a filter lists it (see `docker_owns`)."""
        if not self.remote_enabled:
            return Route.LOCAL
        route = route_query(name, dns=self.dns_filter, outgoing=self.outgoing, scope=self.scope)
        if route == Route.REMOTE and not self.listed(name) and self.docker_owns(name):
            return Route.LOCAL
        return route

    def listed(self, name: str) -> bool:
        """Whether a filter names `name` (then it goes where the filter says)."""
        return any(f is not None and f.match_name(name) for f in (self.dns_filter, self.outgoing))

    def listed_remote(self, name: str) -> bool:
        """Whether a `remote` filter (the DNS filter's or the outgoing one's) names `name`."""
        return any(
            f is not None and f.mode == "remote" and f.match_name(name)
            for f in (self.dns_filter, self.outgoing)
        )

    def docker_owns(self, name: str) -> bool:
        """Whether `name` is one Docker's DNS answers for this namespace without asking anyone:
        `<container>.<network>` on one of its networks (`domains`), or a reverse lookup of an
        address this side owns (its networks, /etc/hosts). A single-label name is asked of
        Docker's DNS first in `answer` (Docker does not forward those when `ndots` is set)."""
        if any(name.endswith("." + domain) for domain in self.domains):
            return True
        address = reverse_address(name)
        return address is not None and self.scope.owns_address(address)

    async def learn_domains(self, addresses: list[str]) -> None:
        """Learn the namespace's network names from Docker's reverse answers for its own
        addresses (`<container>.<network>.`), so `<name>.<network>` stays local."""
        for address in addresses:
            try:
                response = await self.ask_local(DNSRecord.question(reverse_name(address), "PTR"))
            except (OSError, TimeoutError, ValueError) as e:
                log.debug("no network name for %s: %s", address, e)
                continue
            for rr in response.rr:
                if rr.rtype == QTYPE.PTR:
                    labels = normalise_name(str(rr.rdata)).split(".")
                    if len(labels) > 1:
                        self.domains.add(".".join(labels[1:]))

    def shadows_local(self, name: str) -> bool:
        """Whether `name` is a project name expanded with a search domain, e.g. `db` tried as
        `db.team.svc.cluster.local` because the app resolves with the target's `ndots:5`.

        The project's own names stay local (the fidelity principle), so such a name is
        NXDOMAIN here, without asking the cluster: the app's resolver then tries the next
        candidate and reaches the bare name, which is local. A name the filters send remote,
        or a `hosts` name, is never shadowed; nor is a name a `remote` filter lists (for some
        of its traffic at least): listing it is how the cluster's one is asked for.
        """
        if (
            not self.remote_enabled
            or name in self.hosts
            or self.listed_remote(name)
            or self.route(name) == Route.LOCAL
        ):
            return False
        for domain in self.search:
            stem = name.removesuffix("." + domain)
            if stem != name and (stem in self.hosts or self.scope.owns_name(stem)):
                return self.route(stem) == Route.LOCAL
        return False

    def cached(self, query: bytes) -> bytes | None:
        """The response from the cache, synchronously, or None (then `answer` it)."""
        parsed = question_of(query)
        if parsed is None:
            return None
        end, key = parsed
        wire = self.cache.wire(key)
        reply = None if wire is None else splice(wire, query, end)
        if reply is None:
            return None
        self.counters.dns_cached += 1
        return with_edns(reply, query)

    def admit(self, query: bytes) -> bytes | None:
        """None when `query` may be looked up now: it then counts as in flight until `release`.
        When `max_lookups` are in flight, the SERVFAIL to answer it with at once instead (what
        a resolver answers when it cannot resolve now; the agent's cap answers the same).

        Queries Docker's DNS forwards count too. A flood of names that miss the cache (random
        labels, names slow to fail) would otherwise pile up lookups without bound, each a task
        the event loop must run before it reads the next query. Bounded, the excess costs a
        few slices of bytes each, so cached names are still answered at once."""
        if self.in_flight < self.max_lookups:
            self.in_flight += 1
            return None
        self.refused += 1
        self.counters.dns_failed += 1
        now = time.monotonic()
        if now - self._last_warning >= SATURATION_LOG_INTERVAL:
            self._last_warning = now
            log.warning(
                "too many DNS lookups in flight (%d): queries answered SERVFAIL (%d so far)",
                self.in_flight, self.refused,
            )  # fmt: skip
        return servfail(query)

    def release(self) -> None:
        """A query `admit` let in is answered."""
        self.in_flight -= 1

    async def answer(self, query: bytes) -> bytes:
        """The response to a raw query (always a response, never an exception)."""
        cached = self.cached(query)
        if cached is not None:
            return cached
        try:
            request = DNSRecord.parse(query)
        except Exception:  # dnslib raises many kinds on garbage; answer FORMERR
            return _formerr(query)
        if not request.questions:
            return _formerr(query)
        question = request.q
        name = normalise_name(str(question.qname))
        key = (name, question.qtype, question.qclass)
        if self.shadows_local(name):
            self.counters.dns_local += 1
            missing = _reply_to(request)
            missing.header.rcode = RCODE.NXDOMAIN
            return with_edns(bytes(missing.pack()), query)
        route = Route.LOCAL if name in self.hosts else self.route(name)
        stand_in = self.stand_in_pointer(request, name)
        if stand_in is not None:
            return with_edns(bytes(stand_in.pack()), query)
        try:
            if name in self.hosts:
                response = await self.ask_local(request, self.hosts[name])
            elif route == Route.LOCAL:
                response = self.from_hosts_file(request, name) or await self.ask_local(request)
            else:
                response = await self.docker_first(request, name)
                if response is not None:
                    route = Route.LOCAL
                else:
                    response = DNSRecord.parse(
                        await asyncio.wait_for(
                            self.tunnels.current().query(query), UPSTREAM_TIMEOUT
                        )
                    )
        except (TimeoutError, OSError, TunnelClosed) as e:
            log.debug("%s (%s): %s", name, route, e)
            self.counters.dns_failed += 1
            failure = _reply_to(request)
            failure.header.rcode = RCODE.SERVFAIL
            return with_edns(bytes(failure.pack()), query)
        if route == Route.LOCAL:
            self.counters.dns_local += 1
        else:
            self.counters.dns_remote += 1
        for rr in response.rr:
            if rr.rtype == QTYPE.A:
                given = self.book.give(name, route, str(rr.rdata))
                if given != str(rr.rdata):
                    rr.rdata = A(given)
        response = without_edns(response)
        self.cache.put(key, response)
        return with_edns(_as_reply(request, response), query)

    def forwarded_by_docker(self, query: bytes, source: tuple[str, int]) -> tuple[str, int] | None:
        """The nameserver (address, port) a UDP query from `source` was sent to when it is Docker's
        DNS forwarding a question this sidecar is asking it, else None.

        Docker's DNS asks the host's resolvers (or the service's `dns`) for a name it does not
        own from inside the container's namespace, where the firewall sends every query here.
        Answered here, the query would go back to Docker and round again until both time out
        (SERVFAIL after seconds where a plain container gets NXDOMAIN at once), so it goes
        where Docker sent it, read from the connection tracking table.
        """
        parsed = question_of(query)
        if parsed is None:
            return None
        name, qtype, _ = parsed[1]
        if not self.asking[(name, qtype)]:
            return None
        try:
            table = self.conntrack.read_text()
        except OSError as e:
            log.debug("no connection tracking table: %s", e)
            return None
        destination = original_destination(table, source)
        return None if destination in (None, DOCKER_DNS) else destination

    async def pass_on(self, query: bytes, nameserver: tuple[str, int]) -> bytes:
        """`nameserver`'s response to `query` (Docker's forwarding, see `forwarded_by_docker`),
        unchanged; SERVFAIL when it does not answer, as Docker would be told by a silent one."""
        try:
            return await asyncio.wait_for(self._udp(query, nameserver), UPSTREAM_TIMEOUT)
        except (TimeoutError, OSError) as e:
            log.debug("nameserver %s:%d: %s", *nameserver, e)
            failure = _reply_to(DNSRecord.parse(query))
            failure.header.rcode = RCODE.SERVFAIL
            return bytes(failure.pack())

    async def docker_first(self, request: DNSRecord, name: str) -> DNSRecord | None:
        """Docker's own answer for a single-label `name` otherwise sent to the cluster (a
        container on a shared or external network), or None. Docker answers its names itself
        and, under an explicit `ndots`, forwards no single-label name, so this costs a local
        round trip. Without one, Docker may ask the host's resolvers: the probe waits at most
        DOCKER_PROBE_TIMEOUT for them before the cluster is asked."""
        if "." in name or self.listed(name):
            return None
        try:
            # Owned or not, Docker says NOERROR to a name's other types: its A answer tells.
            probe = await asyncio.wait_for(
                self.ask_local(DNSRecord.question(name, "A")), DOCKER_PROBE_TIMEOUT
            )
            if probe.header.rcode != RCODE.NOERROR or not probe.rr:
                return None
            return await self.ask_local(request)
        except (OSError, TimeoutError):
            return None

    def stand_in_pointer(self, request: DNSRecord, name: str) -> DNSRecord | None:
        """The answer to a reverse lookup of a stand-in address (see `Book`): the name it was
        given for, as the cluster's DNS would answer for the real address."""
        address = reverse_address(name)
        if address is None or request.q.qtype != QTYPE.PTR:
            return None
        answered = self.book.lookup(str(address)) if address.version == 4 else None
        if answered is None or answered.address == str(address):
            return None
        reply = _reply_to(request)
        reply.add_answer(RR(request.q.qname, QTYPE.PTR, rdata=PTR(answered.name + "."), ttl=30))
        return reply

    async def ask_local(self, request: DNSRecord, alias_of: str | None = None) -> DNSRecord:
        """Ask Docker's DNS; for a `hosts` name, ask for its compose service instead."""
        question = request.q
        asked = DNSRecord(
            DNSHeader(id=request.header.id, rd=1),
            q=DNSQuestion(alias_of or question.qname, question.qtype, question.qclass),
        )
        key = (normalise_name(str(asked.q.qname)), int(question.qtype))
        self.asking[key] += 1
        try:
            data = await asyncio.wait_for(self._udp(asked.pack()), UPSTREAM_TIMEOUT)
        finally:
            self.asking[key] -= 1
            if not self.asking[key]:
                del self.asking[key]
        response = DNSRecord.parse(data)
        if alias_of is not None:
            target = DNSLabel(alias_of)
            for rr in response.rr:
                if rr.rname == target:
                    rr.rname = question.qname
            response.questions = [question]
        return response

    async def local_address(self, name: str) -> str | None:
        """An IPv4 address for `name` on this side, or None. For a remotely answered name that
        the filter sends local: locally the name may mean something else (mirrord does this)."""
        try:
            response = await self.ask_local(DNSRecord.question(name, "A"))
        except (OSError, TimeoutError):
            return None
        for rr in response.rr:
            if rr.rtype == QTYPE.A:
                return str(rr.rdata)
        return None

    def from_hosts_file(self, request: DNSRecord, name: str) -> DNSRecord | None:
        addresses = self.static.get(name)
        if not addresses:
            return None
        question = request.q
        reply = _reply_to(request)
        for address in addresses:
            if question.qtype == QTYPE.A and ":" not in address:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=60))
            elif question.qtype == QTYPE.AAAA and ":" in address:
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=60))
        return reply

    async def _udp(self, wire: bytes, nameserver: tuple[str, int] = DOCKER_DNS) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, nameserver)
            await loop.sock_sendall(sock, wire)
            return await loop.sock_recv(sock, 65535)
        finally:
            sock.close()


def original_destination(table: str, source: tuple[str, int]) -> tuple[str, int] | None:
    """Where the UDP datagram from `source` (address, port) was sent before the firewall
    redirected it: the original tuple's `dst` and `dport` of its entry in `table`, the text of
    /proc/net/nf_conntrack; None when no entry has that source."""
    want = {"src": source[0], "sport": str(source[1])}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[2] != "udp":
            continue
        original: dict[str, str] = {}
        for field in fields[3:]:
            key, _, value = field.partition("=")
            if key in original:  # the reply tuple starts: the original one is complete
                break
            if value:
                original[key] = value
        if all(original.get(k) == v for k, v in want.items()) and "dst" in original:
            return original["dst"], int(original.get("dport", "53"))
    return None


def reverse_name(address: str) -> str:
    """The in-addr.arpa/ip6.arpa name of `address` (RFC 1035 3.5, RFC 3596 2.5)."""
    return ipaddress.ip_address(address).reverse_pointer


def reverse_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a reverse-lookup name asks about, or None for any other name."""
    name = normalise_name(name)
    if name.endswith(".in-addr.arpa"):
        parts = name.removesuffix(".in-addr.arpa").split(".")
        text = ".".join(reversed(parts))
    elif name.endswith(".ip6.arpa"):
        nibbles = "".join(reversed(name.removesuffix(".ip6.arpa").split(".")))
        if len(nibbles) != 32:
            return None
        text = ":".join(nibbles[i : i + 4] for i in range(0, 32, 4))
    else:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def read_search(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The search domains of a resolv.conf(5) (the last `search` or `domain` line, as glibc)."""
    search: tuple[str, ...] = ()
    try:
        text = path.read_text()
    except OSError:
        return search
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if words and words[0] in ("search", "domain"):
            search = tuple(w.rstrip(".") for w in words[1:] if w.rstrip("."))
    return search


def read_hosts_file(path: Path) -> dict[str, list[str]]:
    """name -> addresses from an /etc/hosts file (extra_hosts end up there)."""
    table: dict[str, list[str]] = {}
    try:
        text = path.read_text()
    except OSError:
        return table
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        for name in words[1:]:
            table.setdefault(normalise_name(name), []).append(words[0])
    return table


class _Sender(Protocol):
    def sendto(self, data: bytes, address: tuple[str, int], /) -> int | None: ...


class UdpServer:
    """DNS over UDP; answers longer than the client accepts are truncated (TC set).

    Read from its own socket in bursts (`READ_BURST` datagrams a wake-up) with a large receive
    buffer: asyncio's datagram transport reads one datagram a turn of the loop, so under a
    flood of lookups the kernel's queue overflowed and queries were dropped, cached ones too.
    """

    def __init__(self, resolver: Resolver, tasks: Tasks) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.transport: _Sender | None = None
        """Where answers are sent from: the listening socket (a fake in tests)."""
        self.sock: socket.socket | None = None

    def listen(self, address: tuple[str, int]) -> None:
        """Receive queries at `address`; call in the event loop. Raises OSError (the address
        is taken)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Beyond net.core.rmem_max, which the sidecar's NET_ADMIN allows.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setblocking(False)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self.sock = self.transport = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        """Stop receiving."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = self.transport = None

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(READ_BURST):
            try:
                data, addr = self.sock.recvfrom(MAX_QUERY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error of an earlier answer: go on
                log.debug("dns udp: %s", e)
                continue
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        cached = self.resolver.cached(data)
        if cached is not None:
            self._send(cached, data, addr)
            return
        refused = self.resolver.admit(data)
        if refused is not None:
            self._send(refused, data, addr)
            return
        self.tasks.spawn(self._reply(data, addr), name="dns reply")

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            nameserver = self.resolver.forwarded_by_docker(data, addr)
            if nameserver is not None:
                self._send(await self.resolver.pass_on(data, nameserver), data, addr)
            else:
                self._send(await self.resolver.answer(data), data, addr)
        finally:
            self.resolver.release()

    def _send(self, response: bytes, query: bytes, addr: tuple[str, int]) -> None:
        if len(response) > UDP_PAYLOAD:
            limit = _udp_limit(query)
            if len(response) > limit:
                response = truncate(response, limit)
        if self.transport is not None:
            try:
                self.transport.sendto(response, addr)
            except OSError as e:  # a full send buffer or a gone client: the client asks again
                log.debug("dns answer to %s:%d: %s", *addr, e)


async def serve_tcp(
    resolver: Resolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """DNS over TCP: length-prefixed messages, several per connection."""
    try:
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            query = await reader.readexactly(size)
            response = resolver.cached(query) or resolver.admit(query)
            if response is None:
                try:
                    response = await resolver.answer(query)
                finally:
                    resolver.release()
            writer.write(struct.pack("!H", len(response)) + response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _as_reply(request: DNSRecord, response: DNSRecord) -> bytes:
    response.header.id = request.header.id
    response.header.qr = 1
    response.header.rd = request.header.rd
    response.header.ra = 1
    return bytes(response.pack())


def _reply_to(request: DNSRecord) -> DNSRecord:
    """An empty response to `request` made here: not authoritative and not authenticated (dnslib's
    `reply()` sets AA and copies the query's AD)."""
    reply = request.reply(aa=0)
    reply.header.ad = 0
    return reply


def _udp_limit(query: bytes) -> int:
    """The largest UDP answer the client takes: its EDNS payload size, else 512 (RFC 6891 6.2.5)."""
    try:
        request = DNSRecord.parse(query)
    except Exception:  # already answered FORMERR; the limit does not matter
        return UDP_PAYLOAD
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(UDP_PAYLOAD, int(rr.rclass))
    return UDP_PAYLOAD


def truncate(response: bytes, limit: int) -> bytes:
    """`response` cut to `limit` bytes as a name server does it: header and question kept, TC
    set, then as many whole answer records as fit, the rest of the message dropped (RFC 1035
    4.1.1 and 4.2.1, RFC 2181 9; miekg/dns `Msg.Truncate`, which CoreDNS uses, does the same).
    A stub resolver such as glibc's retries a TC answer over TCP only when it can match the
    question, so the question must stay. An EDNS OPT record is kept (RFC 6891 7)."""
    record = DNSRecord.parse(response)
    opt = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    short = DNSRecord(DNSHeader(id=record.header.id, bitmap=record.header.bitmap))
    short.header.tc = 1
    short.questions = list(record.questions)
    short.ar = list(opt)
    for rr in record.rr:
        short.rr.append(rr)
        if len(short.pack()) > limit:
            short.rr.pop()
            break
    return bytes(short.pack())


def servfail(query: bytes) -> bytes:
    """SERVFAIL for `query`, made from its bytes (no parsing, as cheap as a cache hit): its id,
    opcode, RD and CD bits and question, RA set, an OPT record when it had one (`with_edns`);
    FORMERR for what is not a plain one-question query."""
    parsed = question_of(query)
    if parsed is None:
        return _formerr(query)
    end = parsed[0]
    flags = 0x80 | (query[2] & 0x79)  # QR; the opcode and RD asked
    low = 0x80 | (query[3] & CD_BIT) | RCODE.SERVFAIL  # RA
    header = query[:2] + bytes((flags, low)) + struct.pack("!HHHH", 1, 0, 0, 0)
    return with_edns(header + query[12:end], query)


def _formerr(query: bytes) -> bytes:
    ident = query[:2] if len(query) >= 2 else b"\0\0"
    return ident + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)
