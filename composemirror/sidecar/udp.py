"""The UDP transparent proxy: where each intercepted datagram flow of the app goes.

TPROXY hands the app's datagrams to one transparent socket that reads each one's original
destination. A flow (app address, original destination) is decided once, as the TCP proxy decides
a connection: remote flows become UDP tunnel streams (one DATA frame per datagram), local ones a
direct socket. Replies leave from a socket bound to the original destination, so the app sees
them come from where it sent. IPv4 only; a flow ends after a minute without traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

from composemirror.datagrams import IDLE_TIMEOUT, Flow, FlowTable, StreamFlow
from composemirror.errors import TunnelClosed
from composemirror.filters import Route
from composemirror.protocol import Failure, Proto
from composemirror.sidecar.proxy import Decision, Egress
from composemirror.tasks import Tasks
from composemirror.tunnel import Tunnel

log = logging.getLogger(__name__)

# From linux/in.h; Python's socket module lacks the last two.
IP_TRANSPARENT = 19
IP_ORIGDSTADDR = 20
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR
MAX_DATAGRAM = 65_535
READ_BURST = 64
"""Datagrams read per wake-up of one socket, so a busy flow cannot starve the others."""

Address = tuple[str, int]
FlowKey = tuple[Address, Address]
_SOCKADDR_IN = struct.Struct("!2xH4s")  # family (host order, skipped), port, address


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """Where a datagram was sent before TPROXY diverted it, from recvmsg's ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= _SOCKADDR_IN.size:
            port, packed = _SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntoa(packed), port
    return None


def listening_socket(address: Address) -> socket.socket:
    """The socket TPROXY delivers to; it reports each datagram's original destination."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def reply_socket(original: Address, app: Address, mark: int) -> socket.socket:
    """A socket that speaks as `original` to the app.

    IP_TRANSPARENT lets it bind an address that is not the namespace's, and SO_REUSEADDR lets the
    flows of several app sockets to one destination each have one. Being connected, it is the
    socket TPROXY gives the flow's later datagrams to; the mark keeps its replies out of the
    firewall.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        sock.bind(original)
        sock.connect(app)
    except OSError:
        sock.close()
        raise
    return sock


def upstream_socket(destination: Address, mark: int) -> socket.socket:
    """A socket of the sidecar's own (marked, so not intercepted) connected to `destination`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        sock.connect(destination)  # UDP: only sets the peer, never blocks
    except OSError:
        sock.close()
        raise
    return sock


def _read(sock: socket.socket) -> list[bytes]:
    """The datagrams `sock` has ready, at most READ_BURST."""
    datagrams: list[bytes] = []
    for _ in range(READ_BURST):
        try:
            datagrams.append(sock.recv(MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            # An ICMP error (port unreachable...) for an earlier datagram; reading clears it.
            log.debug("udp %s: %s", sock.getsockname(), e)
    return datagrams


class AppSide:
    """A flow's end at the app: the socket its datagrams arrive on and its replies leave from."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: Address,
        original: Address,
        reply: socket.socket,
        received: Callable[[bytes], None],
    ) -> None:
        self.loop = loop
        self.app = app
        self.original = original
        self.reply = reply
        self.received = received
        loop.add_reader(reply.fileno(), self._readable)

    def send(self, data: bytes) -> None:
        try:
            self.reply.send(data)
        except OSError as e:  # a full buffer or a closed app socket: UDP may lose a datagram
            log.debug("udp reply to %s:%s lost: %s", *self.app, e)

    def close(self) -> None:
        self.loop.remove_reader(self.reply.fileno())
        self.reply.close()

    def _readable(self) -> None:
        for data in _read(self.reply):
            self.received(data)


class RemoteFlow(StreamFlow):
    """A flow through the tunnel: the app's datagrams go into a UDP stream, its answers back."""

    def __init__(
        self, proxy: UdpProxy, app: Address, original: Address, reply: socket.socket
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.original = original
        self.side = AppSide(proxy.loop, app, original, reply, self.from_local)
        self.local_ready()

    def send_local(self, data: bytes) -> None:
        self.side.send(data)

    def dropped(self) -> None:
        super().dropped()
        self.proxy.egress.counters.udp_dropped += 1

    def opened(self) -> None:
        self.proxy.egress.counters.udp_remote += 1

    def open_failed(self, failure: Failure, message: str) -> None:
        log.info("remote udp %s:%s failed: %s", *self.original, message or failure.name.lower())
        self.proxy.egress.counters.udp_failed += 1
        super().open_failed(failure, message)

    def release(self) -> None:
        super().release()
        self.side.close()


class LocalFlow(Flow):
    """A flow sent directly from the sidecar: its far end is a socket of the sidecar's own,
    ready once `connect` gives it (the route's local address may need a lookup first)."""

    def __init__(
        self, proxy: UdpProxy, app: Address, original: Address, reply: socket.socket
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.original = original
        self.side = AppSide(proxy.loop, app, original, reply, self.from_local)
        self.upstream: socket.socket | None = None
        self.local_ready()

    def connect(self, upstream: socket.socket) -> None:
        """The direct socket is ready: send what arrived meanwhile, then relay both ways."""
        self.upstream = upstream
        self.proxy.loop.add_reader(upstream.fileno(), self._upstream_readable)
        self.far_ready()

    def send_local(self, data: bytes) -> None:
        self.side.send(data)

    def send_far(self, data: bytes) -> None:
        assert self.upstream is not None
        try:
            self.upstream.send(data)
        except OSError as e:
            log.debug("udp to %s:%s lost: %s", *self.original, e)

    def dropped(self) -> None:
        super().dropped()
        self.proxy.egress.counters.udp_dropped += 1

    def release(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.proxy.loop.remove_reader(upstream.fileno())
            upstream.close()
        self.side.close()

    def _upstream_readable(self) -> None:
        if self.upstream is not None:
            for data in _read(self.upstream):
                self.from_far(data)


class UdpProxy:
    """Receives the app's diverted datagrams and routes each flow. Create it in the event loop."""

    def __init__(self, egress: Egress, tasks: Tasks, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.egress = egress
        self.tasks = tasks
        self.loop = asyncio.get_running_loop()
        self.flows = FlowTable(idle_timeout)
        self.sock: socket.socket | None = None

    def listen(self, address: Address) -> None:
        """Start receiving at `address` (where the TPROXY rule delivers); idle flows expire."""
        self.sock = listening_socket(address)
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.tasks.service(self.flows.expire(), name="udp flow expiry")

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.flows.close_all()

    def received(self, data: bytes, app: Address, original: Address) -> None:
        """One datagram of the app, sent to `original`."""
        flow = self.flows.get((app, original))
        if flow is None:
            flow = self._open(app, original)
        if flow is None:
            self.egress.counters.udp_dropped += 1
        else:
            flow.from_local(data)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(READ_BURST):
            try:
                data, ancdata, _, app = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("udp proxy: %s", e)
                continue
            original = original_destination(ancdata)
            if original is None:
                log.debug("udp from %s:%s without its original destination", *app)
                continue
            self.received(data, app, original)

    def _open(self, app: Address, original: Address) -> Flow | None:
        address, port = original
        destination = ipaddress.ip_address(address)
        if destination.is_loopback:
            return None  # sent to this socket itself, not diverted: there is nowhere to go
        decision = self.egress.decide(address, port, "udp")
        tunnel: Tunnel | None = None
        if decision.route == Route.REMOTE:
            try:
                tunnel = self.egress.tunnels.current()
            except TunnelClosed as e:
                log.debug("udp %s:%s dropped: %s", address, port, e)
                return None
        try:
            reply = reply_socket(original, app, self.egress.mark)
        except OSError as e:
            log.warning("udp %s:%s: cannot answer the app from there: %s", address, port, e)
            self.egress.counters.udp_failed += 1
            return None
        if tunnel is not None:
            remote = RemoteFlow(self, app, original, reply)
            self.flows.add(remote, (app, original))
            tunnel.open(Proto.UDP, decision.destination, port, remote)
            remote.start()  # datagrams go at once: the agent holds them until connected
            return remote
        local = LocalFlow(self, app, original, reply)
        self.flows.add(local, (app, original))
        self.tasks.spawn(self._local(local, decision), name=f"udp local {address}:{port}")
        return local

    async def _local(self, flow: LocalFlow, decision: Decision) -> None:
        port = flow.original[1]
        address = await self.egress.local_address(decision)
        if flow.closed:
            return
        try:
            upstream = upstream_socket((address, port), self.egress.mark)
        except OSError as e:
            log.info("local udp %s:%s failed: %s", address, port, e)
            self.egress.counters.udp_failed += 1
            self.egress.counters.udp_dropped += len(flow.outbound)
            flow.close()
            return
        self.egress.counters.udp_local += 1
        flow.connect(upstream)
