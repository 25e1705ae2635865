"""The tunnel end to end in one process: app socket → Bridge → Tunnel → agent → server socket.

Real sockets on loopback and a real unix socket between the tunnel ends, no engine: half-close,
refusal, reset, flow control between streams, bulk integrity and DNS through the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSLabelError, DNSRecord

from composemirror import tasks
from composemirror.agent.resolver import ResolvConf, Resolver, parse_resolv_conf
from composemirror.agent.server import Agent
from composemirror.bridge import Bridge, reset_transport
from composemirror.datagrams import StreamFlow
from composemirror.link import UnixAddress
from composemirror.protocol import Connection, Failure, Proto, Role, new_key
from composemirror.tunnel import Tunnel

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Harness:
    """An agent on a unix socket, a client tunnel to it, and an 'app' listener that relays
    each accepted connection to `target` through the tunnel, as the sidecar's proxy does."""

    def __init__(self, tunnel: Tunnel, target: tuple[str, int]) -> None:
        self.tunnel = tunnel
        self.target = target
        self.failures: list[Failure] = []

    def accept(self) -> AppSide:
        return AppSide(self)


class AppSide(Bridge):
    def __init__(self, rig: Harness) -> None:
        super().__init__()
        self.rig = rig

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.rig.tunnel.open(Proto.TCP, *self.rig.target, self)
        self.start()

    def open_failed(self, failure: Failure, message: str) -> None:
        self.rig.failures.append(failure)
        super().open_failed(failure, message)


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path, handler: Handler | None, resolver: Resolver | None = None
) -> AsyncIterator[tuple[Harness, int]]:
    """Yield the harness and the port of the app listener."""
    async with tasks.scope() as spawner, _harness(tmp_path, handler, resolver, spawner) as rig:
        yield rig


@contextlib.asynccontextmanager
async def _harness(
    tmp_path: Path, handler: Handler | None, resolver: Resolver | None, spawner: tasks.Tasks
) -> AsyncIterator[tuple[Harness, int]]:
    loop = asyncio.get_running_loop()
    key = new_key()
    agent = Agent(key, resolver or Resolver(ResolvConf()), spawner)
    path = tmp_path / "agent.sock"
    agent_server = await agent.serve(UnixAddress(str(path)))
    if handler is not None:
        upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
        target = upstream.sockets[0].getsockname()[:2]
    else:  # a port nothing listens on
        upstream = None
        target = ("127.0.0.1", _free_port())
    _, tunnel = await loop.create_unix_connection(
        lambda: Tunnel(Connection(Role.CLIENT, key)), str(path)
    )
    await asyncio.wait_for(tunnel.authenticated, 5)
    rig = Harness(tunnel, target)
    app_server = await loop.create_server(rig.accept, "127.0.0.1", 0)
    try:
        yield rig, app_server.sockets[0].getsockname()[1]
    finally:
        app_server.close()
        tunnel.close("test over")
        agent_server.close()
        if upstream is not None:
            upstream.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def echo_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to EOF, then answers with the digest and size of what it got, then closes."""
    digest = hashlib.sha256()
    size = 0
    while chunk := await reader.read(1 << 16):
        digest.update(chunk)
        size += len(chunk)
    writer.write(f"{size} {digest.hexdigest()}".encode())
    await writer.drain()
    writer.close()


def run(coroutine: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 60))  # type: ignore[arg-type]


def test_half_close_lets_the_server_answer_after_the_client_is_done(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def scenario() -> None:
        async with harness(tmp_path, echo_then_close) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            answer = await reader.read()
            assert answer.decode() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"
            writer.close()

    run(scenario())


def test_bulk_both_ways_arrives_intact(tmp_path: Path) -> None:
    payload = os.urandom(8 * 1024 * 1024)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 18):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with harness(tmp_path, echo) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            received, _ = await asyncio.gather(reader.read(), send())
            assert received == payload

    run(scenario())


def test_refusal_reaches_the_client_as_a_failed_open(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, None) as (rig, port):
            reader, _ = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            assert rig.failures == [Failure.REFUSED]

    run(scenario())


def test_a_server_reset_resets_the_app_connection(tmp_path: Path) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        reset_transport(writer.transport)

    async def scenario() -> None:
        async with harness(tmp_path, reset) as (rig, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await reader.read()
            assert rig.tunnel.alive  # one stream's reset does not touch the tunnel

    run(scenario())


def test_a_stalled_stream_does_not_stop_another(tmp_path: Path) -> None:
    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int((await reader.readline()).decode())
        block = b"x" * (1 << 20)
        while size > 0:
            writer.write(block[: min(size, len(block))])
            size -= len(block)
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with harness(tmp_path, source) as (_, port):
            _, stalled = await asyncio.open_connection("127.0.0.1", port)
            stalled.write(b"67108864\n")  # 64 MiB that nobody reads
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"33554432\n")
            got = 0
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
            assert got == 32 * 1024 * 1024
            stalled.close()

    run(scenario())


class Zone(Resolver):
    """The agent's resolver with a fake cluster DNS answering from a table (no AA, as CoreDNS
    answers cluster names it forwards; `exact.test` and its search-expanded form both exist)."""

    table: ClassVar[dict[str, str]] = {
        "orders.shop.svc.cluster.local": "10.96.0.21",
        "exact.test": "10.124.0.31",
        "exact.test.team.svc.cluster.local": "10.124.0.32",
    }

    def __init__(self, conf: ResolvConf, *, expand: bool = False) -> None:
        super().__init__(conf, expand=expand)
        self.asked: list[str] = []

    async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
        self.asked.append(name)
        reply = DNSRecord.question(name, QTYPE[qtype]).reply(aa=0)
        if name in self.table and qtype == QTYPE.A:
            reply.add_answer(RR(name, QTYPE.A, rdata=A(self.table[name]), ttl=5))
        elif name not in self.table:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


POD = (
    "nameserver 10.96.0.10\nsearch team.svc.cluster.local "
    "svc.cluster.local cluster.local\noptions ndots:5\n"
)


def test_the_agent_resolves_exactly_the_name_asked_never_expanding_it(tmp_path: Path) -> None:
    """Every name on the DNS wire is absolute: the app's own resolver applied the target's search
    list already, so a second expansion here would answer for a different name."""
    zone = Zone(parse_resolv_conf(POD))

    async def scenario() -> None:
        async with harness(tmp_path, echo_then_close, zone) as (rig, _):

            async def ask(name: str) -> DNSRecord:
                return DNSRecord.parse(await rig.tunnel.query(DNSRecord.question(name).pack()))

            exact = await ask("exact.test")
            assert [str(rr.rdata) for rr in exact.rr] == ["10.124.0.31"]
            assert [str(rr.rname) for rr in exact.rr] == ["exact.test."]
            expanded = await ask("exact.test.team.svc.cluster.local")
            assert [str(rr.rdata) for rr in expanded.rr] == ["10.124.0.32"]
            short = await ask("orders")
            assert short.header.rcode == RCODE.NXDOMAIN
            assert short.header.aa == 0 and short.header.ad == 0

    run(scenario())
    assert zone.asked == ["exact.test", "exact.test.team.svc.cluster.local", "orders"]


@pytest.mark.parametrize("length", [232, 237, 253])
def test_names_near_the_length_limit_get_an_answer_at_once(tmp_path: Path, length: int) -> None:
    """A long missing name is NXDOMAIN, a long existing one resolves; neither waits for a
    timeout (RFC 1035 2.3.4: 255 bytes on the wire, 253 characters written out)."""
    labels = ["a" * 63, "b" * 63, "c" * 63]
    name = ".".join(labels)
    name = name + "." + "d" * (length - len(name) - 1)
    assert len(name) == length
    zone = Zone(parse_resolv_conf(POD))
    zone.table = {**Zone.table, name: "10.124.0.40"}

    async def scenario() -> None:
        async with harness(tmp_path, echo_then_close, zone) as (rig, _):
            found = DNSRecord.parse(
                await asyncio.wait_for(rig.tunnel.query(DNSRecord.question(name).pack()), 2)
            )
            assert [str(rr.rdata) for rr in found.rr] == ["10.124.0.40"]
            missing = DNSRecord.parse(
                await asyncio.wait_for(
                    rig.tunnel.query(DNSRecord.question("x" + name[1:]).pack()), 2
                )
            )
            assert missing.header.rcode == RCODE.NXDOMAIN

    run(scenario())


def test_answers_keep_the_upstreams_flags_and_never_claim_ad_for_a_plain_query() -> None:
    class Signed(Zone):
        async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
            reply = await super().ask(name, qtype, qclass)
            reply.header.ad = 1
            return reply

    agent = Signed(parse_resolv_conf(POD))
    plain = DNSRecord.question("exact.test")
    plain.header.ad = 0
    reply = DNSRecord.parse(run_value(agent.resolve(plain.pack())))
    assert reply.header.aa == 0 and reply.header.ad == 0 and reply.header.ra == 1
    asking = DNSRecord.question("exact.test")
    asking.header.ad = 1
    assert DNSRecord.parse(run_value(agent.resolve(asking.pack()))).header.ad == 1


def test_a_question_the_nameservers_cannot_take_is_answered_servfail_not_dropped() -> None:
    """An error in a lookup is an answer (SERVFAIL), never an exception left in a task while
    the app waits out its timeout."""

    class Broken(Resolver):
        async def ask(self, name: str, qtype: int, qclass: int) -> DNSRecord:
            raise DNSLabelError(f"Domain label too long: {name}")

    reply = DNSRecord.parse(run_value(Broken(ResolvConf()).resolve(DNSRecord.question("x").pack())))
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.aa == 0


def run_value(coroutine: Coroutine[Any, Any, bytes]) -> bytes:
    return asyncio.run(coroutine)


def test_resolv_conf_is_read_as_the_libc_reads_it() -> None:
    conf = parse_resolv_conf(
        "# pod\nnameserver 127.0.0.11\nnameserver 10.96.0.10\n"
        "search a.local b.local.\noptions ndots:5 timeout:1 attempts:3\n"
    )
    assert conf == ResolvConf(
        nameservers=("127.0.0.11", "10.96.0.10"),
        search=("a.local", "b.local"),
        ndots=5,
        timeout=1.0,
        attempts=3,
    )
    assert parse_resolv_conf("").nameservers == ("127.0.0.1",)


def test_resolv_conf_without_options_keeps_the_libcs_timeout_and_attempts() -> None:
    """A pod's resolv.conf rarely sets them: the target's resolver waits 5 s per try, twice
    (glibc's RES_TIMEOUT and RES_DFLRETRY), and so must the agent, or the app's retries after
    a slow upstream would ask the cluster's DNS more often than the target does."""
    conf = parse_resolv_conf("nameserver 10.96.0.10\noptions ndots:5\n")
    assert (conf.timeout, conf.attempts) == (5.0, 2)


def test_a_server_that_speaks_first_is_heard(tmp_path: Path) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")  # arrives with (or before) the agent's OPENED
        await writer.drain()
        line = await reader.readline()
        writer.write(b"250 " + line)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with harness(tmp_path, greet) as (rig, port):
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await reader.readline() == b"220 ready\r\n"
                writer.write(b"HELO\r\n")
                assert await reader.read() == b"250 HELO\r\n"
                writer.close()
            assert rig.tunnel.alive

    run(scenario())


def test_early_data_reaches_a_server_that_waits_for_the_client(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with harness(tmp_path, echo_then_close) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 64)  # sent before the agent has connected upstream
            writer.write_eof()
            assert (await reader.read()).startswith(b"64 ")

    run(scenario())


def test_early_data_in_the_same_frame_batch_as_the_open_is_kept(tmp_path: Path) -> None:
    """OPEN and DATA reach the agent in one read: the data must wait for the connection."""

    async def scenario() -> None:
        async with harness(tmp_path, echo_then_close) as (rig, _):
            done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            class Collector(Bridge):
                def deliver(self, data: bytes) -> None:
                    done.set_result(data)

            collector = Collector()
            stream_id = rig.tunnel.conn.open_stream(Proto.TCP, *rig.target)
            rig.tunnel.endpoints[stream_id] = collector
            collector.attach(rig.tunnel, stream_id)
            rig.tunnel.conn.send_data(stream_id, b"abc")
            rig.tunnel.conn.send_eof(stream_id)
            rig.tunnel.flush()  # OPEN, DATA and EOF leave in one write
            assert (await asyncio.wait_for(done, 5)).startswith(b"3 ")

    run(scenario())


def test_a_datagram_sent_with_the_open_is_echoed(tmp_path: Path) -> None:
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        port = echo.get_extra_info("sockname")[1]
        got: asyncio.Queue[bytes] = asyncio.Queue()

        class Flow(StreamFlow):
            def send_local(self, data: bytes) -> None:
                got.put_nowait(data)

        async with harness(tmp_path, echo_then_close) as (rig, _):
            flow = Flow()
            rig.tunnel.open(Proto.UDP, "127.0.0.1", port, flow)
            flow.start()
            flow.local_ready()
            for n in range(3):
                rig.tunnel.send(flow.stream_id, b"dgram %d" % n)  # the first goes with OPEN
            assert [await asyncio.wait_for(got.get(), 5) for _ in range(3)] == [
                b"dgram 0",
                b"dgram 1",
                b"dgram 2",
            ]
        echo.close()

    run(scenario())


def test_a_pod_agent_without_the_apps_search_list_still_expands_short_names() -> None:
    zone = Zone(parse_resolv_conf(POD.replace("team.svc", "shop.svc")), expand=True)
    reply = DNSRecord.parse(run_value(zone.resolve(DNSRecord.question("orders").pack())))
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [("orders.", "10.96.0.21")]
    assert zone.asked[0] == "orders.shop.svc.cluster.local"
