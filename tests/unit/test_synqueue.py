"""Tests of composemirror.sidecar.synqueue: held SYNs, their verdicts and their streams."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from composemirror.errors import TunnelClosed
from composemirror.filters import Route
from composemirror.protocol import Failure, Proto
from composemirror.sidecar import synqueue
from composemirror.sidecar.synqueue import (
    NF_ACCEPT,
    NF_DROP,
    FourTuple,
    Holds,
    Marks,
    QueuedPacket,
    SynQueue,
    Verdict,
    bind_message,
    parse_messages,
    parse_syn,
    verdict_for,
    verdict_message,
)

APP = "172.20.0.3"
REMOTE = "10.124.0.2"


def segment(flags: int, *, ihl: int = 5, version: int = 4, sport: int = 40000) -> bytes:
    """An IPv4 header (with `ihl` 32-bit words) and a TCP header with `flags`."""
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl, 0, 60, 1, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(APP), socket.inet_aton(REMOTE),
    )  # fmt: skip
    ip += b"\x01" * (ihl * 4 - 20)  # options (NOPs)
    tcp = struct.pack("!HHIIBBHHH", sport, 8080, 1, 0, 5 << 4, flags, 64240, 0, 0)
    return ip + tcp


SYN, ACK, RST = 0x02, 0x10, 0x04


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(segment(SYN), FourTuple(APP, 40000, REMOTE, 8080), id="a SYN"),
        pytest.param(
            segment(SYN, ihl=6), FourTuple(APP, 40000, REMOTE, 8080), id="IP options skipped"
        ),
        pytest.param(segment(SYN | ACK), None, id="a SYN-ACK is no new connection"),
        pytest.param(segment(ACK), None, id="an ACK"),
        pytest.param(segment(RST), None, id="a reset"),
        pytest.param(segment(SYN)[:30], None, id="cut short before the flags"),
        pytest.param(segment(SYN, version=6), None, id="not IPv4"),
        pytest.param(segment(SYN)[:9] + b"\x11" + segment(SYN)[10:], None, id="UDP"),
        pytest.param(b"", None, id="nothing"),
    ],
)
def test_parse_syn(payload: bytes, expected: FourTuple | None) -> None:
    assert parse_syn(payload) == expected


@pytest.mark.parametrize(
    ("failure", "message", "expected"),
    [
        (Failure.REFUSED, "connection refused", Verdict.REFUSE),
        (Failure.UNREACHABLE, os.strerror(errno.EHOSTUNREACH), Verdict.HOST_UNREACHABLE),
        (Failure.UNREACHABLE, os.strerror(errno.ENETUNREACH), Verdict.NET_UNREACHABLE),
        (Failure.TIMEOUT, "connect timed out", Verdict.DROP),
        (Failure.OTHER, "Too many open files", Verdict.REFUSE),
        (Failure.NOT_FOUND, "Name or service not known", Verdict.REFUSE),
    ],
)
def test_the_verdict_shows_the_app_what_the_agent_met(
    failure: Failure, message: str, expected: Verdict
) -> None:
    assert verdict_for(failure, message) == expected


def test_a_repeated_syn_is_held_once_and_the_book_is_bounded() -> None:
    holds = Holds(limit=2)
    first, second, third = (FourTuple(APP, port, REMOTE, 80) for port in (1, 2, 3))
    assert holds.hold(first, 10) == "new"
    assert holds.hold(first, 11) == "repeat"
    assert holds.hold(second, 12) == "new"
    assert holds.hold(third, 13) == "full"
    assert holds.release(first) == 10
    assert holds.release(first) is None
    assert holds.hold(third, 14) == "new"


def kernel_packet(packet_id: int, payload: bytes, queue: int = 7) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: the packet header and payload attributes."""
    header = struct.pack("!IHB", packet_id, 0x0800, 3)
    attributes = synqueue._attribute(synqueue.NFQA_PACKET_HDR, header)
    attributes += synqueue._attribute(synqueue.NFQA_PAYLOAD, payload)
    return synqueue._message(synqueue.NFQNL_MSG_PACKET, queue, attributes, flags=0)


def acknowledgement(code: int) -> bytes:
    body = struct.pack("=i", code) + b"\0" * 16
    return struct.pack("=IHHII", 16 + len(body), synqueue.NLMSG_ERROR, 0, 1, 0) + body


def test_queued_packets_and_acknowledgements_are_read_from_one_datagram() -> None:
    data = kernel_packet(5, segment(SYN)) + kernel_packet(6, b"\x45") + acknowledgement(-1)
    packets, errors = parse_messages(data)
    assert packets == [QueuedPacket(5, segment(SYN)), QueuedPacket(6, b"\x45")]
    assert errors == [-1]


def test_a_truncated_datagram_yields_what_is_whole() -> None:
    data = kernel_packet(5, segment(SYN))
    assert parse_messages(data + data[:30]) == ([QueuedPacket(5, segment(SYN))], [])


def attributes_of(message: bytes) -> dict[int, bytes]:
    return dict(synqueue._attributes(message, 20, len(message)))


def test_the_bind_asks_for_whole_headers_a_bounded_queue_and_failing_open() -> None:
    message = bind_message(7, maxlen=100)
    length, kind, flags = struct.unpack_from("=IHH", message)
    assert (length, kind) == (len(message), (3 << 8) | 2)
    assert flags == synqueue.NLM_F_REQUEST | synqueue.NLM_F_ACK
    assert struct.unpack_from("!H", message, 18)[0] == 7  # the queue, big-endian
    found = attributes_of(message)
    assert found[synqueue.NFQA_CFG_CMD] == bytes([1, 0, 0, socket.AF_INET])
    assert found[synqueue.NFQA_CFG_PARAMS][:5] == struct.pack("!IB", synqueue.COPY_RANGE, 2)
    assert found[synqueue.NFQA_CFG_QUEUE_MAXLEN] == struct.pack("!I", 100)
    assert found[synqueue.NFQA_CFG_FLAGS] == found[synqueue.NFQA_CFG_MASK] == b"\0\0\0\1"


@pytest.mark.parametrize(
    ("accept", "mark", "verdict", "expected_mark"),
    [
        (True, None, NF_ACCEPT, None),
        (False, None, NF_DROP, None),
        (True, 0x4350, NF_ACCEPT, struct.pack("!I", 0x4350)),
    ],
)
def test_verdicts(
    accept: bool, mark: int | None, verdict: int, expected_mark: bytes | None
) -> None:
    found = attributes_of(verdict_message(7, 99, accept, mark))
    assert found[synqueue.NFQA_VERDICT_HDR] == struct.pack("!II", verdict, 99)
    assert found.get(synqueue.NFQA_MARK) == expected_mark


# -- the adapter, with a fake socket, egress and tunnel ----------------------------------------

MARKS = Marks(refuse=0x4350, host_unreachable=0x4351, net_unreachable=0x4352)


@dataclass
class Decision:
    route: Route
    destination: str


@dataclass
class FakeTunnel:
    opened: list[tuple[Proto, str, int, Any]] = field(default_factory=list)
    closed: bool = False

    def current(self) -> FakeTunnel:
        if self.closed:
            raise TunnelClosed("agent not connected (connecting)")
        return self

    def open(self, proto: Proto, host: str, port: int, endpoint: Any) -> int:
        self.opened.append((proto, host, port, endpoint))
        return len(self.opened)


@dataclass
class FakeCounters:
    tcp_failed: int = 0


@dataclass
class FakeEgress:
    route: Route = Route.REMOTE
    tunnels: FakeTunnel = field(default_factory=FakeTunnel)
    counters: FakeCounters = field(default_factory=FakeCounters)

    def decide(self, address: str, port: int, protocol: str) -> Decision:
        return Decision(self.route, "10.124.0.200" if address.startswith("198.18.") else address)


class FakeEndpoint:
    def __init__(self) -> None:
        self.pending: tuple[SynQueue, FourTuple] | None = None
        self.abandoned = False

    def abandon(self) -> None:
        self.abandoned = True


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def verdicts(self) -> list[tuple[int, int, int | None]]:
        """(packet id, verdict, mark) of each verdict sent."""
        found = []
        for message in self.sent:
            attributes = attributes_of(message)
            verdict, packet_id = struct.unpack("!II", attributes[synqueue.NFQA_VERDICT_HDR])
            mark = attributes.get(synqueue.NFQA_MARK)
            found.append((packet_id, verdict, struct.unpack("!I", mark)[0] if mark else None))
        return found


def queue(egress: FakeEgress, limit: int = 8) -> tuple[SynQueue, FakeSocket]:
    syns = SynQueue(7, MARKS, egress, FakeEndpoint, Holds(limit))  # type: ignore[arg-type]
    sock = FakeSocket()
    syns.sock = sock  # type: ignore[assignment]
    return syns, sock


def test_a_remote_syn_is_held_until_the_stream_opens_and_repeats_open_nothing() -> None:
    egress = FakeEgress()
    syns, sock = queue(egress)
    syns._arrived(QueuedPacket(1, segment(SYN)))
    syns._arrived(QueuedPacket(2, segment(SYN)))  # the app's kernel sent it again
    assert [(proto, host, port) for proto, host, port, _ in egress.tunnels.opened] == [
        (Proto.TCP, REMOTE, 8080)
    ]
    assert sock.verdicts() == [(2, NF_DROP, None)]  # only the repeat has its verdict
    endpoint = egress.tunnels.opened[0][3]
    connection = FourTuple(APP, 40000, REMOTE, 8080)
    assert endpoint.pending == (syns, connection)
    syns.resolved(connection, None)
    assert sock.verdicts()[-1] == (1, NF_ACCEPT, None)
    assert syns.report()["holding"] == 0


@pytest.mark.parametrize(
    ("failure", "message", "expected"),
    [
        (Failure.REFUSED, "connection refused", (1, NF_ACCEPT, 0x4350)),
        (Failure.UNREACHABLE, os.strerror(errno.EHOSTUNREACH), (1, NF_ACCEPT, 0x4351)),
        (Failure.UNREACHABLE, os.strerror(errno.ENETUNREACH), (1, NF_ACCEPT, 0x4352)),
        (Failure.TIMEOUT, "connect timed out", (1, NF_DROP, None)),
    ],
)
def test_a_failed_open_becomes_the_marked_or_dropped_syn(
    failure: Failure, message: str, expected: tuple[int, int, int | None]
) -> None:
    syns, sock = queue(FakeEgress())
    syns._arrived(QueuedPacket(1, segment(SYN)))
    syns.resolved(FourTuple(APP, 40000, REMOTE, 8080), failure, message)
    assert sock.verdicts() == [expected]
    # A SYN sent again after a timeout is a new attempt, as the target's kernel makes it.
    syns._arrived(QueuedPacket(2, segment(SYN)))
    assert syns.report()["holding"] == 1


def test_a_local_syn_passes_at_once_and_opens_no_stream() -> None:
    egress = FakeEgress(route=Route.LOCAL)
    syns, sock = queue(egress)
    syns._arrived(QueuedPacket(1, segment(SYN)))
    assert sock.verdicts() == [(1, NF_ACCEPT, None)]
    assert egress.tunnels.opened == []


def test_with_no_agent_the_syn_is_refused() -> None:
    egress = FakeEgress()
    egress.tunnels.closed = True
    syns, sock = queue(egress)
    syns._arrived(QueuedPacket(1, segment(SYN)))
    assert sock.verdicts() == [(1, NF_ACCEPT, 0x4350)]
    assert egress.counters.tcp_failed == 1


def test_beyond_the_bound_a_syn_passes_unheld_for_the_proxy_to_open() -> None:
    egress = FakeEgress()
    syns, sock = queue(egress, limit=1)
    syns._arrived(QueuedPacket(1, segment(SYN, sport=1)))
    syns._arrived(QueuedPacket(2, segment(SYN, sport=2)))
    assert len(egress.tunnels.opened) == 1
    assert sock.verdicts() == [(2, NF_ACCEPT, None)]
    assert syns.report()["unheld"] == 1


def test_a_packet_that_is_no_syn_passes() -> None:
    syns, sock = queue(FakeEgress())
    syns._arrived(QueuedPacket(3, segment(ACK)))
    assert sock.verdicts() == [(3, NF_ACCEPT, None)]


def test_an_opened_stream_waits_for_its_connection_and_is_reset_when_none_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(synqueue, "PAIRING_TIMEOUT", 0.01)

    async def scenario() -> None:
        syns, _ = queue(FakeEgress())
        taken, forgotten = FakeEndpoint(), FakeEndpoint()
        first, second = FourTuple(APP, 1, REMOTE, 80), FourTuple(APP, 2, REMOTE, 80)
        syns.paired(first, taken)  # type: ignore[arg-type]
        syns.paired(second, forgotten)  # type: ignore[arg-type]
        assert syns.take(first) is taken  # type: ignore[comparison-overlap]
        assert syns.take(first) is None
        await asyncio.sleep(0.05)
        assert not taken.abandoned
        assert forgotten.abandoned
        assert syns.take(second) is None

    asyncio.run(scenario())


def test_a_repeat_of_a_syn_already_passed_passes_to_the_waiting_stream() -> None:
    async def scenario() -> None:
        egress = FakeEgress()
        syns, sock = queue(egress)
        syns._arrived(QueuedPacket(1, segment(SYN)))
        connection = FourTuple(APP, 40000, REMOTE, 8080)
        syns.paired(connection, egress.tunnels.opened[0][3])
        syns.resolved(connection, None)
        syns._arrived(QueuedPacket(2, segment(SYN)))
        assert len(egress.tunnels.opened) == 1
        assert sock.verdicts() == [(1, NF_ACCEPT, None), (2, NF_ACCEPT, None)]

    asyncio.run(scenario())


def test_a_stand_in_address_opens_the_address_it_stands_for() -> None:
    egress = FakeEgress()
    syns, _ = queue(egress)
    payload = bytearray(segment(SYN))
    payload[16:20] = socket.inet_aton("198.18.0.5")
    syns._arrived(QueuedPacket(1, bytes(payload)))
    assert egress.tunnels.opened[0][1:3] == ("10.124.0.200", 8080)


# -- the proxy's end: the stream's outcome becomes the held SYN's verdict -----------------------


@dataclass
class FakeProxyCounters:
    tcp_remote: int = 0
    tcp_failed: int = 0


@dataclass
class FakeProxy:
    egress: Any = field(default_factory=lambda: FakeEgress(counters=FakeProxyCounters()))  # type: ignore[arg-type]


def held_connection() -> tuple[SynQueue, FakeSocket, Any]:
    from composemirror.sidecar.proxy import AppConnection

    proxy = FakeProxy()
    syns = SynQueue(7, MARKS, proxy.egress, lambda: AppConnection(proxy))  # type: ignore[arg-type]
    sock = FakeSocket()
    syns.sock = sock  # type: ignore[assignment]
    syns._arrived(QueuedPacket(1, segment(SYN)))
    return syns, sock, proxy.egress.tunnels.opened[0][3]


def test_the_streams_opening_lets_the_syn_on_and_keeps_the_stream_for_the_proxy() -> None:
    async def scenario() -> None:
        syns, sock, endpoint = held_connection()
        endpoint.opened()
        assert sock.verdicts() == [(1, NF_ACCEPT, None)]
        assert syns.take(FourTuple(APP, 40000, REMOTE, 8080)) is endpoint

    asyncio.run(scenario())


def test_a_refused_stream_refuses_the_syn() -> None:
    _, sock, endpoint = held_connection()
    endpoint.open_failed(Failure.REFUSED, "connection refused")
    assert sock.verdicts() == [(1, NF_ACCEPT, MARKS.refuse)]


def test_a_link_lost_while_the_syn_is_held_refuses_it() -> None:
    _, sock, endpoint = held_connection()
    endpoint.peer_reset()  # what the tunnel tells every endpoint when it goes
    assert sock.verdicts() == [(1, NF_ACCEPT, MARKS.refuse)]
    endpoint.peer_reset()
    assert len(sock.verdicts()) == 1  # one verdict per held SYN
