"""The sidecar's DNS server: every query of the shared network namespace arrives here.

Local names (the project's services, `hosts` entries, names the filters keep local) are answered
on this side: `hosts` names with the address Docker's DNS gives their compose service, the rest by
/etc/hosts or Docker's DNS. Remote names go through the tunnel to the agent, which resolves them
as the target does. Answers are cached by TTL; an upstream that does not answer gives SERVFAIL,
which is never cached. Each address answered is remembered with its name, for the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from composemirror.errors import TunnelClosed
from composemirror.filters import Filter, Route, Scope, normalise_name, route_query
from composemirror.sidecar.status import Counters
from composemirror.sidecar.tunnel import TunnelClient
from composemirror.tasks import Tasks

log = logging.getLogger(__name__)

DOCKER_DNS = ("127.0.0.11", 53)
UPSTREAM_TIMEOUT = 4.0
CACHE_SIZE = 10_000
NEGATIVE_TTL = 5
MAX_TTL = 300
BOOK_SIZE = 65_536
UDP_PAYLOAD = 512
EDNS_PAYLOAD = 1232
"""The UDP payload size this server advertises over EDNS (DNS Flag Day 2020's figure)."""
"""The most a UDP answer may hold for a query without EDNS (RFC 1035 4.2.1)."""
AD_BIT = 0x20
CD_BIT = 0x10
"""Bits of the header's second flags byte (RFC 4035 3.2)."""


class Book:
    """Which name (and side) each answered address was given for: the proxy decides with it."""

    def __init__(self, size: int = BOOK_SIZE) -> None:
        self.size = size
        self.entries: OrderedDict[str, tuple[str, Route]] = OrderedDict()

    def remember(self, address: str, name: str, route: Route) -> None:
        self.entries[address] = (name, route)
        self.entries.move_to_end(address)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def lookup(self, address: str) -> tuple[str, Route] | None:
        return self.entries.get(address)


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

    def route(self, name: str) -> Route:
        if not self.remote_enabled:
            return Route.LOCAL
        return route_query(name, dns=self.dns_filter, outgoing=self.outgoing, scope=self.scope)

    def shadows_local(self, name: str) -> bool:
        """Whether `name` is a project name expanded with a search domain, e.g. `db` tried as
        `db.team.svc.cluster.local` because the app resolves with the target's `ndots:5`.

        The project's own names stay local (the fidelity principle), so such a name is
        NXDOMAIN here, without asking the cluster: the app's resolver then tries the next
        candidate and reaches the bare name, which is local. A name the filters send remote,
        or a `hosts` name, is never shadowed.
        """
        if not self.remote_enabled or name in self.hosts or self.route(name) == Route.LOCAL:
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
        try:
            if name in self.hosts:
                response = await self.ask_local(request, self.hosts[name])
            elif route == Route.LOCAL:
                response = self.from_hosts_file(request, name) or await self.ask_local(request)
            else:
                response = DNSRecord.parse(
                    await asyncio.wait_for(self.tunnels.current().query(query), UPSTREAM_TIMEOUT)
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
            if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                self.book.remember(str(rr.rdata), name, route)
        response = without_edns(response)
        self.cache.put(key, response)
        return with_edns(_as_reply(request, response), query)

    async def ask_local(self, request: DNSRecord, alias_of: str | None = None) -> DNSRecord:
        """Ask Docker's DNS; for a `hosts` name, ask for its compose service instead."""
        question = request.q
        asked = DNSRecord(
            DNSHeader(id=request.header.id, rd=1),
            q=DNSQuestion(alias_of or question.qname, question.qtype, question.qclass),
        )
        data = await asyncio.wait_for(self._udp(asked.pack()), UPSTREAM_TIMEOUT)
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

    async def _udp(self, wire: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, DOCKER_DNS)
            await loop.sock_sendall(sock, wire)
            return await loop.sock_recv(sock, 65535)
        finally:
            sock.close()


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


class UdpServer(asyncio.DatagramProtocol):
    """DNS over UDP; answers longer than the client accepts are truncated (TC set)."""

    def __init__(self, resolver: Resolver, tasks: Tasks) -> None:
        self.resolver = resolver
        self.tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        cached = self.resolver.cached(data)
        if cached is not None and self.transport is not None:
            self._send(cached, data, addr)
            return
        self.tasks.spawn(self._reply(data, addr), name="dns reply")

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        self._send(await self.resolver.answer(data), data, addr)

    def _send(self, response: bytes, query: bytes, addr: tuple[str, int]) -> None:
        if len(response) > UDP_PAYLOAD:
            limit = _udp_limit(query)
            if len(response) > limit:
                response = truncate(response, limit)
        if self.transport is not None:
            self.transport.sendto(response, addr)


async def serve_tcp(
    resolver: Resolver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """DNS over TCP: length-prefixed messages, several per connection."""
    try:
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            response = await resolver.answer(await reader.readexactly(size))
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


def _formerr(query: bytes) -> bytes:
    ident = query[:2] if len(query) >= 2 else b"\0\0"
    return ident + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)
