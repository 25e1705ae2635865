"""DNS as the target resolves it: its nameservers (and their timeout and attempts) from resolv.conf.

Every name on the DNS wire is absolute: the app's own resolver has already applied the target's
search list and ndots (the sidecar gives the app the target's resolv.conf settings), so the name
asked is resolved exactly, once, as the cluster's DNS would resolve it for the target. A question
asked again while its lookup runs (the app's resolver retrying) joins that lookup, so the cluster's
DNS is asked no more often than by the target's own resolver. Answers keep the upstream's flags
and never claim AA or AD they did not get. dnslib parses and builds messages; sockets are asyncio's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from dataclasses import dataclass

from dnslib import (
    QTYPE,
    RCODE,
    RR,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSLabelError,
    DNSQuestion,
    DNSRecord,
)

from composemirror.link import MAX_LOOKUPS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvConf:
    """The parts of resolv.conf(5) that decide how a name is looked up; the defaults are
    glibc's (resolv.conf(5), RES_TIMEOUT and RES_DFLRETRY)."""

    nameservers: tuple[str, ...] = ("127.0.0.1",)
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 5.0
    """Seconds to wait for one nameserver's answer before asking the next (or again)."""
    attempts: int = 2
    """Rounds over the nameservers before the lookup fails."""


def parse_resolv_conf(text: str) -> ResolvConf:
    """The settings of a resolv.conf(5) text; options it does not give keep glibc's defaults
    (`ResolvConf`), and values beyond glibc's caps are capped as glibc caps them."""
    nameservers: list[str] = []
    search: tuple[str, ...] = ()
    default = ResolvConf()
    ndots, timeout, attempts = default.ndots, default.timeout, default.attempts
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) > 1:
            nameservers.append(words[1])
        elif words[0] in ("search", "domain"):
            search = tuple(w.rstrip(".") for w in words[1:])
        elif words[0] == "options":
            for option in words[1:]:
                key, _, value = option.partition(":")
                if key == "ndots" and value.isdigit():
                    ndots = min(int(value), 15)
                elif key == "timeout" and value.isdigit():
                    timeout = float(min(int(value), 30))
                elif key == "attempts" and value.isdigit():
                    attempts = min(int(value), 5)
    return ResolvConf(
        nameservers=tuple(nameservers) or ("127.0.0.1",),
        search=search,
        ndots=ndots,
        timeout=timeout,
        attempts=attempts,
    )


def candidates(name: str, conf: ResolvConf) -> list[str]:
    """The names a stub resolver with `conf` tries for `name`, in order (resolv.conf(5)'s ndots
    rule as glibc applies it)."""
    name = name.rstrip(".")
    if not name:
        return ["."]
    expanded = [f"{name}.{domain}" for domain in conf.search]
    return [name, *expanded] if name.count(".") >= conf.ndots else [*expanded, name]


ZONE_SHARE = 4
"""One domain (a name's last two labels) may hold 1/ZONE_SHARE of the lookups in flight, so a
flood of names under one domain that never resolve (random labels under `never.test`, however
deep) cannot take every slot from the other names, as BIND's `fetches-per-zone` quota does for
the zone being asked. The target's resolver is spared too: Docker's embedded DNS, for one, drops
queries beyond 100 at once."""
SATURATION_LOG_INTERVAL = 10.0
"""Seconds between two warnings that queries are being refused."""


def zone_of(name: str) -> str:
    """The domain a lookup of `name` counts against: its last two labels, lower case
    (`a.b.never.test` -> `never.test`, `orders.shop.svc.cluster.local` -> `cluster.local`)."""
    labels = name.rstrip(".").lower().split(".")
    return ".".join(labels[-2:]) or "."


Found = tuple[DNSRecord, str] | None
"""What a lookup found: the upstream's response and the name it answers; None if nothing."""


class Resolver:
    """Answers raw DNS queries as the target's nameservers answer the same question.

    `expand` is for a caller whose app did not get the target's search list and ndots (a pod
    agent until its backend reports the pod's resolver): then a name is tried with the search
    list, as before. Otherwise (the default) exactly the name asked is resolved.

    At most `max_lookups` lookups are in flight at once, and `max_zone_lookups` under any one
    domain (`zone_of`); a query beyond either is answered SERVFAIL at once (what a resolver answers
    when it cannot resolve now), so names that never resolve cannot exhaust the agent's files
    and memory or delay the other names.

    A query whose question (name, type and class, in any letter case) is being looked up already
    waits for that lookup instead of starting another, and takes no slot. The sidecar answers
    SERVFAIL to a query the agent has not answered within its own timeout, and the app's resolver
    then asks again: joined, the retry costs the cluster's DNS nothing, so an app asks it no more
    often than the target's resolver would (which asks again only after its `timeout`).
    """

    def __init__(
        self,
        conf: ResolvConf,
        *,
        expand: bool = False,
        max_lookups: int = MAX_LOOKUPS,
        max_zone_lookups: int | None = None,
    ) -> None:
        """`max_zone_lookups` defaults to `max_lookups // ZONE_SHARE` (at least 1)."""
        self.conf = conf
        self.expand = expand
        self.max_lookups = max_lookups
        self.max_zone_lookups = max_zone_lookups or max(1, max_lookups // ZONE_SHARE)
        self.in_flight = 0
        """Lookups under way now."""
        self.zones: dict[str, int] = {}
        """Lookups under way now, per domain (only domains with one or more)."""
        self.refused = 0
        """Queries answered SERVFAIL because a limit was reached, since start."""
        self.joined = 0
        """Queries answered by a lookup another query had started, since start."""
        self.asking: dict[tuple[str, int, int], asyncio.Future[Found]] = {}
        """The lookups under way, by question (see `question_key`)."""
        self._last_warning = -SATURATION_LOG_INTERVAL

    async def resolve(self, query: bytes) -> bytes:
        """The response to `query`: always a response (FORMERR, SERVFAIL at worst)."""
        try:
            request = DNSRecord.parse(query)
        except Exception:  # dnslib raises many kinds on garbage; all mean "not a query"
            return _formerr(query)
        if not request.questions:
            return _formerr(query)
        # Every name on the wire is absolute: the app's resolver applied the search list.
        name = str(request.q.qname).rstrip(".") or "."
        key = question_key(request)
        running = self.asking.get(key)
        if running is not None:
            self.joined += 1
            # Shielded: a waiter that goes away leaves the lookup to the others.
            return _respond(request, await asyncio.shield(running))
        zone = zone_of(name)
        in_zone = self.zones.get(zone, 0)
        if self.in_flight >= self.max_lookups or in_zone >= self.max_zone_lookups:
            self._refuse(name, zone)
            return bytes(_servfail(request).pack())
        self.in_flight += 1
        self.zones[zone] = in_zone + 1
        shared: asyncio.Future[Found] = asyncio.get_running_loop().create_future()
        self.asking[key] = shared
        found: Found = None
        try:
            found = await self._lookup(request, name)
        finally:
            # Cancelled or not, the queries that joined get an answer (SERVFAIL at worst).
            shared.set_result(found)
            del self.asking[key]
            self.in_flight -= 1
            left = self.zones[zone] - 1
            if left:
                self.zones[zone] = left
            else:
                del self.zones[zone]
        return _respond(request, found)

    def _refuse(self, name: str, zone: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_warning >= SATURATION_LOG_INTERVAL:
            self._last_warning = now
            log.warning(
                "too many lookups in flight (%d, %d under %s): %s and others answered SERVFAIL "
                "(%d so far)",
                self.in_flight, self.zones.get(zone, 0), zone, name, self.refused,
            )  # fmt: skip

    async def _lookup(self, request: DNSRecord, name: str) -> Found:
        """The upstream's response and the name it answers (`name` or, when expanding, the
        candidate found); None when no nameserver answered."""
        question = request.q
        names = candidates(name, self.conf) if self.expand else [name]
        response: DNSRecord | None = None
        looked_up = name
        for candidate in names:
            try:
                answer = await self.ask(candidate, question.qtype, question.qclass)
            except (TimeoutError, OSError, DNSError, DNSLabelError) as e:
                log.debug("lookup of %s failed: %s", candidate, e)
                continue
            if answer.header.rcode != RCODE.NXDOMAIN or response is None:
                response, looked_up = answer, candidate
            if answer.header.rcode == RCODE.NOERROR and answer.rr:
                break
        return None if response is None else (response, looked_up)

    async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
        """One question to the nameservers: UDP, then TCP when the answer is truncated."""
        question = DNSRecord(
            DNSHeader(id=random.randint(0, 0xFFFF), rd=1), q=DNSQuestion(name, qtype, qclass)
        )
        wire = question.pack()
        last: Exception = TimeoutError(f"no nameserver answered for {name}")
        for _ in range(self.conf.attempts):
            for server in self.conf.nameservers:
                try:
                    data = await asyncio.wait_for(_udp(server, wire), self.conf.timeout)
                    response = DNSRecord.parse(data)
                    if response.header.tc:
                        data = await asyncio.wait_for(_tcp(server, wire), self.conf.timeout)
                        response = DNSRecord.parse(data)
                    if response.header.id == question.header.id:
                        return response
                except (TimeoutError, OSError) as e:
                    last = e
        raise last


def question_key(request: DNSRecord) -> tuple[str, int, int]:
    """(name in lower case without the final dot, type, class) of `request`'s question: names
    differ in letter case only when a client randomises it (DNS 0x20), and mean the same name
    (RFC 4343)."""
    question = request.q
    return str(question.qname).rstrip(".").lower(), int(question.qtype), int(question.qclass)


def _respond(request: DNSRecord, found: Found) -> bytes:
    """The packed answer to `request` from what a lookup found; SERVFAIL when it found nothing."""
    if found is None:
        return bytes(_servfail(request).pack())
    return bytes(_reply(request, *found).pack())


def _reply(request: DNSRecord, response: DNSRecord, looked_up: str) -> DNSRecord:
    """`response` (for `looked_up`) as the answer to `request`: the client's id, RD bit and
    question (with its letter case), records for `looked_up` under the name asked; the
    upstream's AA, AD and RCODE, never more (RFC 1035 4.1.1; RFC 6840 5.8: AD only when the
    upstream set it and the client asked with AD or DO)."""
    reply = DNSRecord(
        DNSHeader(
            id=request.header.id,
            qr=1,
            opcode=request.header.opcode,
            aa=response.header.aa,
            rd=request.header.rd,
            ra=response.header.ra,
            ad=response.header.ad and (request.header.ad or _dnssec_ok(request)),
            cd=request.header.cd,
            rcode=response.header.rcode,
        ),
        q=request.q,
    )
    asked = request.q.qname
    found = DNSLabel(looked_up)
    for record in response.rr:
        # A copy: a response shared by several queries keeps its own owner names.
        owner = asked if record.rname == found else record.rname
        reply.add_answer(RR(owner, record.rtype, record.rclass, record.ttl, record.rdata))
    for record in response.auth:
        reply.add_auth(record)
    for record in response.ar:
        if record.rtype != QTYPE.OPT:
            reply.add_ar(record)
    return reply


def _dnssec_ok(request: DNSRecord) -> bool:
    """The DO bit of the query's EDNS OPT record (RFC 3225)."""
    return any(rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)


def _servfail(request: DNSRecord) -> DNSRecord:
    reply = request.reply(aa=0)
    reply.header.ad = 0
    reply.header.rcode = RCODE.SERVFAIL
    return reply


def _formerr(query: bytes) -> bytes:
    ident = query[:2] if len(query) >= 2 else b"\0\0"
    return ident + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, waiter: asyncio.Future[bytes]) -> None:
        self.waiter = waiter

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.waiter.done():
            self.waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.waiter.done():
            self.waiter.set_exception(exc)


async def _udp(server: str, wire: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Answer(waiter), remote_addr=(server, 53)
    )
    try:
        transport.sendto(wire)
        return await waiter
    finally:
        transport.close()


async def _tcp(server: str, wire: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server, 53)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()
