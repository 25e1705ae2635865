"""Datagram flows: the one idle expiry, the one holding path, and the sidecar's direct flows on it.

The flow rules need no sockets; the direct flow runs on loopback UDP sockets, as it does in the
sidecar, without the firewall (its reply socket is connected to the app by hand).
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import cast

from composemirror.datagrams import BACKLOG, Flow, FlowTable, StreamFlow
from composemirror.sidecar.status import Counters
from composemirror.sidecar.udp import LocalFlow, UdpProxy


class Recorded(StreamFlow):
    def __init__(self) -> None:
        super().__init__()
        self.local: list[bytes] = []
        self.released = 0

    def send_local(self, data: bytes) -> None:
        self.local.append(data)

    def release(self) -> None:
        self.released += 1
        super().release()


class Direct(Flow):
    """A flow whose far end is a list, as the sidecar's direct flows' is a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.local: list[bytes] = []
        self.far: list[bytes] = []

    def send_local(self, data: bytes) -> None:
        self.local.append(data)

    def send_far(self, data: bytes) -> None:
        self.far.append(data)

    def release(self) -> None:
        pass


def test_only_flows_idle_longer_than_the_timeout_are_closed_and_forgotten() -> None:
    table = FlowTable(idle_timeout=60)
    old, fresh = Recorded(), Recorded()
    table.add(old, "old")
    table.add(fresh, "fresh")
    old.last_active, fresh.last_active = 100.0, 150.0

    closed: list[Flow] = table.close_idle(now=200.0)

    assert closed == [old] and old.closed and old.released == 1
    assert table.get("old") is None and table.get("fresh") is fresh and len(table) == 1


def test_a_closed_flow_is_released_once() -> None:
    table = FlowTable()
    flow = Recorded()
    table.add(flow)
    flow.close()
    flow.close()
    table.close_all()
    assert flow.released == 1 and len(table) == 0


def test_datagrams_wait_for_their_side_and_the_oldest_are_dropped_beyond_the_backlog() -> None:
    flow = Recorded()
    for n in range(BACKLOG + 2):
        flow.from_local(b"%d" % n)
    flow.deliver(b"answer")
    assert flow.drops == 2 and flow.outbound[0] == b"2"
    assert flow.local == []
    flow.local_ready()
    assert flow.local == [b"answer"]


def test_answers_held_for_a_socket_not_ready_are_bounded_and_their_drops_counted() -> None:
    flow = Recorded()
    for n in range(BACKLOG + 3):
        flow.deliver(b"%d" % n)
    flow.local_ready()
    assert flow.drops == 3
    assert flow.local == [b"%d" % n for n in range(3, BACKLOG + 3)]


def test_a_direct_flow_takes_the_same_path_both_ways() -> None:
    flow = Direct()
    flow.local_ready()
    flow.from_local(b"early")  # the far socket is not there yet
    assert flow.far == []
    flow.far_ready()
    flow.from_local(b"later")
    flow.from_far(b"answer")
    assert flow.far == [b"early", b"later"] and flow.local == [b"answer"]
    flow.close()
    flow.from_local(b"after")
    flow.from_far(b"after")
    assert flow.far == [b"early", b"later"] and flow.local == [b"answer"]


def test_a_reset_from_the_peer_ends_the_flow() -> None:
    table = FlowTable()
    flow = Recorded()
    table.add(flow)
    flow.peer_reset()
    flow.deliver(b"late")
    assert flow.closed and len(table) == 0 and flow.local == []


def test_the_sidecars_direct_flow_relays_both_ways_and_expires_with_the_others() -> None:
    """App socket -> reply socket -> LocalFlow -> upstream socket -> an echo server, and back;
    what the app sent before the upstream socket existed goes first; the table's idle expiry
    closes both of the flow's sockets."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.bind(("127.0.0.1", 0))
        app.setblocking(False)
        reply = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        reply.bind(("127.0.0.1", 0))
        reply.connect(app.getsockname())
        reply.setblocking(False)
        counters = Counters()
        proxy = cast(
            UdpProxy, SimpleNamespace(loop=loop, egress=SimpleNamespace(counters=counters))
        )
        table = FlowTable(idle_timeout=60)
        flow = LocalFlow(proxy, app.getsockname(), echo.getsockname(), reply)
        table.add(flow, "flow")
        try:
            app.sendto(b"first", reply.getsockname())
            await asyncio.sleep(0.05)  # read by the flow, held: no upstream socket yet
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            upstream.setblocking(False)
            upstream.connect(echo.getsockname())
            flow.connect(upstream)
            app.sendto(b"second", reply.getsockname())
            received = [await asyncio.wait_for(loop.sock_recvfrom(echo, 100), 5) for _ in "12"]
            assert [data for data, _ in received] == [b"first", b"second"]
            for data, sender in received:
                echo.sendto(data.upper(), sender)
            answers = [await asyncio.wait_for(loop.sock_recvfrom(app, 100), 5) for _ in "12"]
            assert [data for data, _ in answers] == [b"FIRST", b"SECOND"]
            assert {sender for _, sender in answers} == {reply.getsockname()}

            assert table.close_idle(now=flow.last_active + 61) == [flow]
            assert upstream.fileno() == -1 and reply.fileno() == -1 and len(table) == 0
        finally:
            flow.close()
            for sock in (echo, app):
                sock.close()

    asyncio.run(scenario())
