"""The UDP transparent proxy: where each intercepted datagram flow of the app goes.

TPROXY hands the app's datagrams to one transparent socket that reads each one's original
destination. A flow (app address, original destination) is decided once, as the TCP proxy decides
a connection: remote flows become UDP tunnel streams (one DATA frame per datagram), local ones a
direct socket. Replies leave from a socket bound to the original destination, so the app sees
them come from where it sent. IPv4 only; a flow ends after a minute without traffic.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import deque

from composemirror.filters import Route
from composemirror.mux import Tunnel, TunnelClosed
from composemirror.protocol import Failure, Proto
from composemirror.sidecar.proxy import Egress

log = logging.getLogger(__name__)

# From linux/in.h; Python's socket module lacks the last two.
IP_TRANSPARENT = 19
IP_ORIGDSTADDR = 20
IP_RECVORIGDSTADDR = IP_ORIGDSTADDR
IDLE_TIMEOUT = 60.0
"""A flow with no datagram either way for this long is closed, as a NAT table forgets it."""
MAX_DATAGRAM = 65_535
BACKLOG = 64
"""Datagrams a flow keeps while it opens; beyond that the oldest are dropped."""
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


class Flow(abc.ABC):
    """One flow of the app: its address, where it sent to, and the socket replies leave from."""

    def __init__(self, proxy: UdpProxy, app: Address, original: Address,
                 reply: socket.socket) -> None:
        self.proxy = proxy
        self.app = app
        self.original = original
        self.reply = reply
        self.pending: deque[bytes] = deque(maxlen=BACKLOG)
        self.last_active = time.monotonic()
        self.closed = False
        proxy.loop.add_reader(reply.fileno(), self._app_readable)

    @property
    def key(self) -> FlowKey:
        return self.app, self.original

    def from_app(self, data: bytes) -> None:
        if not self.closed:
            self.last_active = time.monotonic()
            self.forward(data)

    @abc.abstractmethod
    def forward(self, data: bytes) -> None:
        """Send one datagram of the app on, or hold it while the flow opens."""

    def to_app(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        try:
            self.reply.send(data)
        except OSError as e:  # a full buffer or a closed app socket: UDP may lose a datagram
            log.debug("udp reply to %s:%s lost: %s", *self.app, e)

    def hold(self, data: bytes) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.proxy.egress.counters.udp_dropped += 1
        self.pending.append(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        self.proxy.loop.remove_reader(self.reply.fileno())
        self.reply.close()
        self.proxy.forget(self)

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of what the flow holds besides its reply socket."""

    def _app_readable(self) -> None:
        for data in _read(self.reply):
            self.from_app(data)


class RemoteFlow(Flow):
    """A flow through the tunnel; it is the stream's `mux.Endpoint`."""

    def __init__(self, proxy: UdpProxy, app: Address, original: Address,
                 reply: socket.socket) -> None:
        super().__init__(proxy, app, original, reply)
        self.tunnel: Tunnel | None = None
        self.stream_id = 0

    # -- mux.Endpoint --------------------------------------------------------------------------

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        """Bound to its stream: datagrams go at once (the agent holds them until connected)."""
        self.tunnel, self.stream_id = tunnel, stream_id
        while self.pending:
            tunnel.send(stream_id, self.pending.popleft())

    def opened(self) -> None:
        self.proxy.egress.counters.udp_remote += 1

    def open_failed(self, failure: Failure, message: str) -> None:
        log.info("remote udp %s:%s failed: %s", *self.original, message or failure.name.lower())
        self.tunnel = None
        self.proxy.egress.counters.udp_failed += 1
        self.close()

    def forward(self, data: bytes) -> None:
        if self.tunnel is None:
            self.hold(data)
        else:
            self.tunnel.send(self.stream_id, data)

    def release(self) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.reset(self.stream_id)

    def deliver(self, data: bytes) -> None:
        self.to_app(data)

    def window_open(self) -> None:
        pass  # UDP streams have no flow control

    def peer_eof(self) -> None:
        self.peer_reset()

    def peer_reset(self) -> None:
        self.tunnel = None  # the stream is gone: nothing to reset
        self.close()

    def stream_closed(self) -> None:
        self.peer_reset()

    def pause_source(self, reason: str) -> None:
        pass  # the tunnel buffers; a datagram source cannot be paused anyway

    def resume_source(self, reason: str) -> None:
        pass


class LocalFlow(Flow):
    """A flow sent directly from the sidecar."""

    def __init__(self, proxy: UdpProxy, app: Address, original: Address,
                 reply: socket.socket) -> None:
        super().__init__(proxy, app, original, reply)
        self.upstream: socket.socket | None = None

    def connect(self, upstream: socket.socket) -> None:
        """The direct socket is ready: send what arrived meanwhile, then relay both ways."""
        self.upstream = upstream
        self.proxy.loop.add_reader(upstream.fileno(), self._upstream_readable)
        while self.pending:
            self.forward(self.pending.popleft())

    def forward(self, data: bytes) -> None:
        if self.upstream is None:
            self.hold(data)
            return
        try:
            self.upstream.send(data)
        except OSError as e:
            log.debug("udp to %s:%s lost: %s", *self.original, e)

    def release(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self.proxy.loop.remove_reader(upstream.fileno())
            upstream.close()

    def _upstream_readable(self) -> None:
        if self.upstream is not None:
            for data in _read(self.upstream):
                self.to_app(data)


class UdpProxy:
    """Receives the app's diverted datagrams and routes each flow. Create it in the event loop."""

    def __init__(self, egress: Egress, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.egress = egress
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.flows: dict[FlowKey, Flow] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.sock: socket.socket | None = None

    def listen(self, address: Address) -> None:
        """Start receiving at `address` (where the TPROXY rule delivers)."""
        self.sock = listening_socket(address)
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for flow in list(self.flows.values()):
            flow.close()
        for task in self.tasks:
            task.cancel()

    async def expire(self) -> None:
        """Close idle flows, forever."""
        while True:
            await asyncio.sleep(self.idle_timeout / 4)
            self.close_idle(time.monotonic())

    def close_idle(self, now: float) -> None:
        for flow in [f for f in self.flows.values() if now - f.last_active > self.idle_timeout]:
            log.debug("udp %s:%s -> %s:%s idle, closed", *flow.app, *flow.original)
            flow.close()

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]

    def received(self, data: bytes, app: Address, original: Address) -> None:
        """One datagram of the app, sent to `original`."""
        flow = self.flows.get((app, original))
        if flow is None:
            flow = self._open(app, original)
        if flow is None:
            self.egress.counters.udp_dropped += 1
        else:
            flow.from_app(data)

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(READ_BURST):
            try:
                data, ancdata, _, app = self.sock.recvmsg(MAX_DATAGRAM,
                                                          socket.CMSG_SPACE(16))
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
        decision, known = self.egress.decide(address, port, "udp")
        tunnel: Tunnel | None = None
        if decision == Route.REMOTE:
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
            self.flows[remote.key] = remote
            tunnel.open(Proto.UDP, address, port, remote)
            return remote
        local = LocalFlow(self, app, original, reply)
        self.flows[local.key] = local
        task = asyncio.create_task(self._local(local, known))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return local

    async def _local(self, flow: LocalFlow, known: tuple[str, Route] | None) -> None:
        address, port = flow.original
        address = await self.egress.local_address(address, known)
        if flow.closed:
            return
        try:
            upstream = upstream_socket((address, port), self.egress.mark)
        except OSError as e:
            log.info("local udp %s:%s failed: %s", address, port, e)
            self._failed(flow)
            return
        self.egress.counters.udp_local += 1
        flow.connect(upstream)

    def _failed(self, flow: Flow) -> None:
        self.egress.counters.udp_failed += 1
        self.egress.counters.udp_dropped += len(flow.pending)
        flow.close()
