"""The agent's bounds, in-process: a connection that does not authenticate is dropped within the
handshake timeout and holds only a small buffer meanwhile; lookups in flight are capped, in all
and per domain, beyond which queries are SERVFAIL at once; the counts return to zero."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from composemirror import tasks
from composemirror.agent.resolver import ResolvConf, Resolver, zone_of
from composemirror.agent.server import Agent
from composemirror.link import UnixAddress
from composemirror.protocol import Connection, Role, new_key
from composemirror.tunnel import HANDSHAKE_READ_SIZE, READ_SIZE, Tunnel


def run(coroutine: object) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 30))  # type: ignore[arg-type]


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with tasks.scope() as spawner:
            key = new_key()
            agent = Agent(key, Resolver(ResolvConf()), spawner, handshake_timeout=0.3)
            made: list[Tunnel] = []
            original = agent.new_tunnel

            def tracked() -> Tunnel:
                made.append(original())
                return made[-1]

            agent.new_tunnel = tracked  # type: ignore[method-assign]
            path = tmp_path / "agent.sock"
            server = await agent.serve(UnixAddress(str(path)))
            started = time.monotonic()
            reader, writer = await asyncio.open_unix_connection(str(path))
            hello = await reader.read(1024)
            assert hello  # the agent speaks first
            assert len(made[0]._buffer) == HANDSHAKE_READ_SIZE
            assert await asyncio.wait_for(reader.read(1024), 5) == b""  # closed by the agent
            assert 0.25 < time.monotonic() - started < 2
            writer.close()

            # A peer with the key is not dropped, and gets the full buffer only now.
            loop = asyncio.get_running_loop()
            _, tunnel = await loop.create_unix_connection(
                lambda: Tunnel(Connection(Role.CLIENT, key)), str(path)
            )
            await asyncio.wait_for(tunnel.authenticated, 5)
            await asyncio.sleep(0.5)
            assert tunnel.alive and made[1].alive
            assert len(made[1]._buffer) == READ_SIZE
            tunnel.close("test over")
            server.close()

    run(scenario())


class Stalled(Resolver):
    """Names with `never` in them never answer; the others answer at once."""

    async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
        if "never" in name:
            await asyncio.Event().wait()
        reply = DNSRecord.question(name).reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A("10.1.2.3"), ttl=5))
        return reply


def test_lookups_in_flight_are_capped_and_the_rest_answer_servfail_at_once() -> None:
    async def scenario() -> None:
        resolver = Stalled(ResolvConf(), max_lookups=8, max_zone_lookups=4)

        async def ask(name: str) -> DNSRecord:
            return DNSRecord.parse(await resolver.resolve(DNSRecord.question(name).pack()))

        flood = [asyncio.ensure_future(ask(f"x{i}.never.test")) for i in range(10)]
        await asyncio.sleep(0.05)
        done = [f for f in flood if f.done()]
        assert len(done) == 6 and all(f.result().header.rcode == RCODE.SERVFAIL for f in done)
        assert resolver.in_flight == 4 and resolver.zones == {"never.test": 4}
        ok = await asyncio.wait_for(ask("orders.shop.svc.cluster.local"), 1)
        assert [str(rr.rdata) for rr in ok.rr] == ["10.1.2.3"]

        # Other domains fill the rest; beyond 8 in all, everything is SERVFAIL.
        others = [asyncio.ensure_future(ask(f"x.never.test{i}")) for i in range(4)]
        await asyncio.sleep(0.05)
        assert resolver.in_flight == 8
        full = await asyncio.wait_for(ask("orders.shop.svc.cluster.local"), 1)
        assert full.header.rcode == RCODE.SERVFAIL
        assert resolver.refused == 7

        for future in flood + others:
            future.cancel()
        await asyncio.gather(*flood, *others, return_exceptions=True)
        assert resolver.in_flight == 0 and resolver.zones == {}

    run(scenario())


def test_the_domain_a_lookup_counts_against() -> None:
    assert zone_of("x1.never.test.") == "never.test"
    assert zone_of("x1.0.123.never.test") == "never.test"
    assert zone_of("Orders.Shop.svc.cluster.local") == "cluster.local"
    assert zone_of("localhost") == "localhost"
    assert zone_of(".") == "."


class Counted(Resolver):
    """Every lookup waits for `release`; `asked` records what reached the nameservers."""

    def __init__(self) -> None:
        super().__init__(ResolvConf(), max_lookups=1)
        self.asked: list[str] = []
        self.release = asyncio.Event()

    async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
        self.asked.append(name)
        await self.release.wait()
        reply = DNSRecord.question(name).reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A("10.1.2.3"), ttl=5))
        return reply


def test_a_question_asked_again_while_looked_up_joins_the_lookup() -> None:
    """The app's resolver asks again after the sidecar's SERVFAIL: the retry (another id, a
    0x20 letter case) costs the nameservers nothing and takes no slot, and each query gets
    its own answer."""

    async def scenario() -> None:
        resolver = Counted()
        first = DNSRecord.question("orders.shop.svc.cluster.local")
        again = DNSRecord.question("Orders.SHOP.svc.cluster.local")
        answers = [asyncio.ensure_future(resolver.resolve(q.pack())) for q in (first, again)]
        await asyncio.sleep(0.05)
        assert resolver.in_flight == 1 and resolver.joined == 1  # the cap of 1 is not hit
        resolver.release.set()
        for query, answer in zip((first, again), answers, strict=True):
            reply = DNSRecord.parse(await answer)
            assert reply.header.id == query.header.id
            assert reply.q.qname.label == query.q.qname.label  # the letter case asked
            assert [(rr.rname.label, str(rr.rdata)) for rr in reply.rr] == [
                (query.q.qname.label, "10.1.2.3")
            ]
        assert resolver.asked == ["orders.shop.svc.cluster.local"]
        assert resolver.asking == {} and resolver.in_flight == 0
        # Once answered, the same question is looked up again (the agent keeps no cache).
        resolver.release.set()
        await resolver.resolve(first.pack())
        assert len(resolver.asked) == 2

    run(scenario())


def test_a_query_that_joined_a_lookup_whose_query_went_away_gets_servfail() -> None:
    async def scenario() -> None:
        resolver = Counted()
        query = DNSRecord.question("orders.shop.svc.cluster.local").pack()
        owner = asyncio.ensure_future(resolver.resolve(query))
        await asyncio.sleep(0.01)
        joined = asyncio.ensure_future(resolver.resolve(query))
        await asyncio.sleep(0.01)
        owner.cancel()
        reply = DNSRecord.parse(await asyncio.wait_for(joined, 1))
        assert reply.header.rcode == RCODE.SERVFAIL
        assert resolver.asking == {} and resolver.in_flight == 0 and resolver.zones == {}

    run(scenario())
