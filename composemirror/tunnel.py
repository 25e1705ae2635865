"""One tunnel connection as an asyncio protocol: bytes in, protocol events to endpoints, bytes out.

A `Tunnel` drives the sans-IO `protocol.Connection` over one transport and hands each stream's
events to its `Endpoint` (a `bridge.Bridge` for TCP, a datagram flow for UDP); requests from the
peer go to a `Handler` (the agent). Sidecar and agent share it. It holds no per-stream relay
state (that is `relay`) and knows nothing of DNS, firewalls, Docker or Kubernetes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Protocol

from composemirror.errors import TunnelClosed
from composemirror.protocol import (
    Authenticated,
    Connection,
    DataReceived,
    DnsAnswerReceived,
    DnsQueryReceived,
    Event,
    Failure,
    LocalProtocolError,
    PongReceived,
    Proto,
    ProtocolError,
    Rejected,
    RemoteProtocolError,
    StreamClosed,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamRequested,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
"""Receive buffer of an authenticated tunnel."""
HANDSHAKE_READ_SIZE = 4096
"""Receive buffer until the peer is authenticated: the handshake's frames are under 100 bytes,
and an unauthenticated peer must not cost the agent more than this."""
TUNNEL_HIGH_WATER = 512 * 1024


class Handler(Protocol):
    """What a tunnel's owner does with requests from the peer (the agent serves them)."""

    def stream_requested(self, tunnel: Tunnel, event: StreamRequested) -> None: ...

    def dns_query(self, tunnel: Tunnel, event: DnsQueryReceived) -> None: ...


class Endpoint(Protocol):
    """One stream's local end (a `bridge.Bridge` or a datagram flow): the stream's events."""

    def attach(self, tunnel: Tunnel, stream_id: int) -> None: ...

    def opened(self) -> None: ...

    def open_failed(self, failure: Failure, message: str) -> None: ...

    def deliver(self, data: bytes) -> None: ...

    def window_open(self) -> None: ...

    def peer_eof(self) -> None: ...

    def peer_reset(self) -> None: ...

    def stream_closed(self) -> None: ...

    def tunnel_full(self) -> None: ...

    def tunnel_drained(self) -> None: ...


class Tunnel(asyncio.BufferedProtocol):
    """One tunnel connection: bytes in, events dispatched, bytes out."""

    def __init__(
        self,
        conn: Connection,
        handler: Handler | None = None,
        *,
        handshake_timeout: float | None = None,
    ) -> None:
        """`handshake_timeout` (seconds, None for none): a peer that has not authenticated
        by then is disconnected; the agent sets it, so that silent connections cost nothing
        for long."""
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
        # Small until authenticated; the full buffer is allocated on `Authenticated`.
        self._buffer = bytearray(HANDSHAKE_READ_SIZE)
        self.handshake_timeout = handshake_timeout
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Small: Python 3.11's transport moves its whole buffer on every partial send, so a
        # large buffer costs more than the pauses it saves (measured: 4 MiB -> 512 KiB, +40 %).
        transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)
        if self.handshake_timeout is not None:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout, self._handshake_expired
            )
        self.conn.initiate()
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        try:
            events = self.conn.receive_data(memoryview(self._buffer)[:nbytes])
        except RemoteProtocolError as e:
            self.close(f"protocol error: {e}")
            return
        except LocalProtocolError as e:
            log.exception("tunnel misused")  # a bug on this end: keep its traceback
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
            endpoint.tunnel_full()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for endpoint in list(self.endpoints.values()):
            endpoint.tunnel_drained()

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

    def window(self, stream_id: int) -> int:
        """How many bytes the stream may send now (0 once it or the tunnel is gone)."""
        if not self.alive:
            return 0
        try:
            return self.conn.send_window(stream_id)
        except ProtocolError:
            return 0

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
                self._stop_handshake_timer()
                self._buffer = bytearray(READ_SIZE)
                if not self.authenticated.done():
                    self.authenticated.set_result(None)
            case Rejected(reason):
                self.close(f"rejected: {reason}")
            case PongReceived():
                pass

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.conn.authenticated:
            self.close(f"no handshake within {self.handshake_timeout:g} s")

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _finish(self, reason: str) -> None:
        self._stop_handshake_timer()
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
