"""asyncio glue between the sans-IO tunnel `Connection` and sockets; sidecar and agent share it.

A `Tunnel` owns one tunnel transport and dispatches the protocol's events. A `Bridge` relays one
TCP socket to one stream with backpressure both ways: the peer's window bounds what the socket
may send, and received bytes are acknowledged only once the socket has taken them, so a slow
stream stalls itself and never the others. A `DatagramBridge` does the same for one UDP flow.
Stdlib only; it knows nothing of DNS, firewalls, Docker or Kubernetes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections import deque
from typing import Any, Protocol, cast

from composemirror.protocol import (
    Authenticated,
    Connection,
    DataReceived,
    DnsAnswerReceived,
    DnsQueryReceived,
    Event,
    Failure,
    PongReceived,
    Proto,
    ProtocolError,
    Rejected,
    StreamClosed,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamRequested,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger(__name__)

SOCKET_HIGH_WATER = 512 * 1024
"""A socket whose write buffer is above this stops acknowledging, so its peer stops sending."""
READ_SIZE = 1024 * 1024
TUNNEL_HIGH_WATER = 512 * 1024


def reset_transport(transport: asyncio.Transport) -> None:
    """Close a TCP transport with a reset (RST), as a refused or aborted connection does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class TunnelClosed(Exception):
    """The tunnel went away before the request was answered."""


class Handler(Protocol):
    """What a tunnel's owner does with requests from the peer (the agent serves them)."""

    def stream_requested(self, tunnel: Tunnel, event: StreamRequested) -> None: ...

    def dns_query(self, tunnel: Tunnel, event: DnsQueryReceived) -> None: ...


class Endpoint(Protocol):
    """One stream's local end: a `Bridge`, a `DatagramBridge` or a UDP flow."""

    def attach(self, tunnel: Tunnel, stream_id: int) -> None: ...

    def opened(self) -> None: ...

    def open_failed(self, failure: Failure, message: str) -> None: ...

    def deliver(self, data: bytes) -> None: ...

    def window_open(self) -> None: ...

    def peer_eof(self) -> None: ...

    def peer_reset(self) -> None: ...

    def stream_closed(self) -> None: ...

    def pause_source(self, reason: str) -> None: ...

    def resume_source(self, reason: str) -> None: ...


class Tunnel(asyncio.BufferedProtocol):
    """One tunnel connection: bytes in, events dispatched, bytes out."""

    def __init__(self, conn: Connection, handler: Handler | None = None) -> None:
        self.conn = conn
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.endpoints: dict[int, Endpoint] = {}
        self.answers: dict[int, asyncio.Future[bytes]] = {}
        self.query_ids = itertools.count(1)
        loop = asyncio.get_running_loop()
        self.authenticated: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[str] = loop.create_future()
        self.last_heard = time.monotonic()
        self.writing_paused = False
        self._buffer = bytearray(READ_SIZE)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Small: Python 3.11's transport moves its whole buffer on every partial send, so a
        # large buffer costs more than the pauses it saves (measured: 4 MiB -> 512 KiB, +40 %).
        transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)
        self.conn.initiate()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        try:
            events = self.conn.receive_data(memoryview(self._buffer)[:nbytes])
        except ProtocolError as e:
            self.close(f"protocol error: {e}")
            return
        self.dispatch(events)
        self.flush()

    def eof_received(self) -> bool:
        self.close("the peer closed the tunnel")
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        for endpoint in list(self.endpoints.values()):
            endpoint.pause_source("tunnel")

    def resume_writing(self) -> None:
        self.writing_paused = False
        for endpoint in list(self.endpoints.values()):
            endpoint.resume_source("tunnel")

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"tunnel lost: {exc}" if exc else "tunnel closed"
        self._finish(reason)

    # -- use ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.done.done()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, reason: str) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._finish(reason)

    def open(self, proto: Proto, host: str, port: int, endpoint: Endpoint) -> int:
        """Ask the agent for a stream to host:port and attach `endpoint` to it at once: it may
        send before the agent has connected (early data saves a round trip). The outcome
        arrives as `endpoint.opened()` or `endpoint.open_failed()`. Raises TunnelClosed."""
        if not self.alive:
            raise TunnelClosed(self.done.result())
        stream_id = self.conn.open_stream(proto, host, port)
        self.endpoints[stream_id] = endpoint
        endpoint.attach(self, stream_id)
        self.flush()
        return stream_id

    async def query(self, payload: bytes) -> bytes:
        """Resolve a raw DNS message through the agent; raises TunnelClosed."""
        if not self.alive:
            raise TunnelClosed(self.done.result())
        query_id = next(self.query_ids) & 0xFFFFFFFF
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.answers[query_id] = waiter
        self.conn.send_dns_query(query_id, payload)
        self.flush()
        try:
            return await waiter
        finally:
            self.answers.pop(query_id, None)

    def send(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as the stream's window takes; return how much."""
        if not self.alive:
            return len(data)  # the stream is being reset; drop what is left
        sent = self.conn.send_data(stream_id, data)
        self.flush()
        return sent

    def send_eof(self, stream_id: int) -> None:
        if not self.alive:
            return
        self.conn.send_eof(stream_id)
        # Our EOF may complete the stream; the protocol reports that on its next input.
        self.dispatch(self.conn.receive_data(b""))
        self.flush()

    def reset(self, stream_id: int, failure: Failure = Failure.RESET) -> None:
        self.endpoints.pop(stream_id, None)
        if self.alive:
            self.conn.reset_stream(stream_id, failure)
            self.flush()

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        if self.alive:
            self.conn.acknowledge(stream_id, nbytes)

    # -- events ------------------------------------------------------------------------------

    def dispatch(self, events: list[Event]) -> None:
        for event in events:
            try:
                self._dispatch(event)
            except Exception:
                # A fault in one stream's handling must not take the others down with the
                # tunnel: report it loudly, reset that stream, go on.
                log.exception("handling %r failed", event)
                stream_id = getattr(event, "stream_id", None)
                if stream_id is not None:
                    endpoint = self.endpoints.get(stream_id)
                    self.reset(stream_id)
                    if endpoint is not None:
                        endpoint.peer_reset()

    def _dispatch(self, event: Event) -> None:
        match event:
            case DataReceived(stream_id, data):
                endpoint = self.endpoints.get(stream_id)
                if endpoint is not None:
                    endpoint.deliver(data)
            case WindowUpdated(stream_id):
                endpoint = self.endpoints.get(stream_id)
                if endpoint is not None:
                    endpoint.window_open()
            case StreamEnded(stream_id):
                endpoint = self.endpoints.get(stream_id)
                if endpoint is not None:
                    endpoint.peer_eof()
            case StreamClosed(stream_id):
                endpoint = self.endpoints.pop(stream_id, None)
                if endpoint is not None:
                    endpoint.stream_closed()
            case StreamReset(stream_id, _):
                endpoint = self.endpoints.pop(stream_id, None)
                if endpoint is not None:
                    endpoint.peer_reset()
            case StreamOpened(stream_id):
                endpoint = self.endpoints.get(stream_id)
                if endpoint is not None:
                    endpoint.opened()
            case StreamFailed(stream_id, failure, message):
                endpoint = self.endpoints.pop(stream_id, None)
                if endpoint is not None:
                    endpoint.open_failed(failure, message)
            case DnsAnswerReceived(query_id, payload):
                answer = self.answers.get(query_id)
                if answer is not None and not answer.done():
                    answer.set_result(payload)
            case StreamRequested() if self.handler is not None:
                self.handler.stream_requested(self, event)
            case DnsQueryReceived() if self.handler is not None:
                self.handler.dns_query(self, event)
            case Authenticated():
                if not self.authenticated.done():
                    self.authenticated.set_result(None)
            case Rejected(reason):
                self.close(f"rejected: {reason}")
            case PongReceived():
                pass

    def _finish(self, reason: str) -> None:
        if self.done.done():
            return
        log.info("%s", reason)
        self.done.set_result(reason)
        if not self.authenticated.done():
            self.authenticated.set_exception(TunnelClosed(reason))
            self.authenticated.exception()  # read it, so an unawaited failure is not logged
        for answer in self.answers.values():
            if not answer.done():
                answer.set_exception(TunnelClosed(reason))
        endpoints, self.endpoints = self.endpoints, {}
        for endpoint in endpoints.values():
            endpoint.peer_reset()


class Bridge(asyncio.Protocol):
    """Relays one TCP socket to one tunnel stream.

    Life: `attach` binds it to a stream; `start` lets the socket's bytes flow into the stream
    (the client starts at once, the agent once its connection is up). Bytes the peer sends
    before the socket exists (early data, on the agent) are kept and written when it does.
    """

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.pending: deque[memoryview] = deque()
        self.eof_pending = False
        self.eof_seen = False
        self.early: list[bytes] = []
        self.early_eof = False
        self.paused: set[str] = {"opening"}
        self.socket_full = False
        self.owed = 0
        self.finished = False
        self.started = False

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id

    def start(self) -> None:
        """Relay from the socket into the stream, beginning with what arrived meanwhile."""
        assert self.tunnel is not None
        self.started = True
        if self.finished:
            self.tunnel.reset(self.stream_id)
            if self.transport is not None:
                reset_transport(self.transport)
            return
        if self.tunnel.writing_paused:
            self.paused.add("tunnel")
        self.paused.discard("opening")
        self.window_open()

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self.peer_reset()

    # -- socket side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        self._apply_pause()
        if self.early:
            early, self.early = self.early, []
            for data in early:
                self.deliver(data)
        if self.early_eof:
            self.peer_eof()

    def data_received(self, data: bytes) -> None:
        if not self.started or self.pending:
            # Python 3.11 may deliver data although reading was paused in connection_made.
            self.pending.append(memoryview(data))
            self._apply_pause(force=True)
            return
        assert self.tunnel is not None
        taken = self.tunnel.send(self.stream_id, data)
        if taken < len(data):
            self.pending.append(memoryview(data)[taken:])
            self.pause_source("window")

    def eof_received(self) -> bool:
        if self.eof_seen:
            return True  # a reader re-armed after EOF reports it again
        self.eof_seen = True
        if not self.started or self.pending:
            self.eof_pending = True
        elif self.tunnel is not None:
            self.tunnel.send_eof(self.stream_id)
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self.socket_full = True

    def resume_writing(self) -> None:
        self.socket_full = False
        if self.owed and self.tunnel is not None:
            self.tunnel.acknowledge(self.stream_id, self.owed)
            self.owed = 0
            self.tunnel.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.finished = True
            if self.tunnel is not None:
                self.tunnel.reset(self.stream_id)

    # -- tunnel side -------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self.transport is None:
            self.early.append(data)  # acknowledged once the socket has taken it
            return
        assert self.tunnel is not None
        self.transport.write(data)
        if self.socket_full:
            self.owed += len(data)
        else:
            self.tunnel.acknowledge(self.stream_id, len(data))

    def window_open(self) -> None:
        if not self.started:
            return
        assert self.tunnel is not None
        while self.pending:
            chunk = self.pending[0]
            taken = self.tunnel.send(self.stream_id, chunk)
            if taken < len(chunk):
                self.pending[0] = chunk[taken:]
                return
            self.pending.popleft()
        if self.eof_pending:
            self.eof_pending = False
            self.tunnel.send_eof(self.stream_id)
        self.resume_source("window")

    def peer_eof(self) -> None:
        if self.transport is None:
            self.early_eof = True
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def peer_reset(self) -> None:
        self.finished = True
        if self.transport is not None:
            reset_transport(self.transport)

    def stream_closed(self) -> None:
        self.finished = True
        if self.transport is not None:
            self.transport.close()

    def pause_source(self, reason: str) -> None:
        self.paused.add(reason)
        self._apply_pause()

    def resume_source(self, reason: str) -> None:
        self.paused.discard(reason)
        self._apply_pause()

    def _apply_pause(self, *, force: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.eof_seen:
            return
        if self.paused:
            if force and not transport.is_reading():
                # The transport believes it is paused but still reads: re-pause it for real.
                transport.resume_reading()
            transport.pause_reading()
        else:
            transport.resume_reading()


class DatagramBridge(asyncio.DatagramProtocol):
    """Relays one UDP flow to one stream: each datagram is one DATA frame."""

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.last_active = time.monotonic()
        self.backlog: deque[bytes] = deque(maxlen=64)
        self.early: deque[bytes] = deque(maxlen=64)
        self.started = False

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id

    def start(self) -> None:
        assert self.tunnel is not None
        while self.backlog:
            self.tunnel.send(self.stream_id, self.backlog.popleft())
        self.started = True

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self.peer_reset()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)
        while self.early:  # datagrams the peer sent while this socket was being made
            self.transport.sendto(self.early.popleft())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.last_active = time.monotonic()
        if not self.started or self.tunnel is None:
            self.backlog.append(data)
        elif self.tunnel.alive:
            self.tunnel.send(self.stream_id, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp stream %s: %s", self.stream_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tunnel is not None:
            self.tunnel.reset(self.stream_id)

    def deliver(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.transport is None:
            self.early.append(data)
        else:
            self.transport.sendto(data)

    def window_open(self) -> None:
        pass

    def peer_eof(self) -> None:
        self.peer_reset()

    def peer_reset(self) -> None:
        if self.transport is not None:
            self.tunnel = None
            self.transport.close()

    def stream_closed(self) -> None:
        self.peer_reset()

    def pause_source(self, reason: str) -> None:
        pass

    def resume_source(self, reason: str) -> None:
        pass
