"""The asyncio adapters of `relay`: a TCP socket bridged to a tunnel stream, or to another socket.

`Bridge` turns the socket's and the stream's callbacks into `relay.Relay` events, and `Splicer`
two sockets' callbacks into `relay.Splice` events; both perform the actions returned, a socket's
the same way. Every decision (early data, half-close, windows, acknowledgements, pauses,
resets) is the relay's: they must hold no relay state of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

from composemirror.protocol import Failure
from composemirror.relay import (
    Abort,
    Acknowledge,
    Action,
    Close,
    Event,
    PauseReading,
    Relay,
    Reset,
    ResumeReading,
    Send,
    SendEof,
    SocketDrained,
    SocketEnded,
    SocketFull,
    SocketLost,
    SocketRead,
    Splice,
    Write,
    WriteEof,
)
from composemirror.tunnel import Tunnel

SOCKET_HIGH_WATER = 512 * 1024
"""A socket whose write buffer is above this stops acknowledging, so its peer stops sending."""


def reset_transport(transport: asyncio.Transport) -> None:
    """Close a TCP transport with a reset (RST), as a refused or aborted connection does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# -- what is done to a socket, for both adapters ------------------------------------------------


def _write(transport: asyncio.Transport, action: Write) -> None:
    transport.write(action.data)


def _write_eof(transport: asyncio.Transport, action: WriteEof) -> None:
    if transport.can_write_eof():
        transport.write_eof()


def _pause_reading(transport: asyncio.Transport, action: PauseReading) -> None:
    if transport.is_closing():
        return
    if action.again and not transport.is_reading():
        # The transport believes it is paused but still reads: re-pause it for real.
        transport.resume_reading()
    transport.pause_reading()


def _resume_reading(transport: asyncio.Transport, action: ResumeReading) -> None:
    if not transport.is_closing():
        transport.resume_reading()


def _abort(transport: asyncio.Transport, action: Abort) -> None:
    reset_transport(transport)


def _close(transport: asyncio.Transport, action: Close) -> None:
    transport.close()


_ON_SOCKET: dict[type, Callable[[asyncio.Transport, Any], None]] = {
    Write: _write,
    WriteEof: _write_eof,
    PauseReading: _pause_reading,
    ResumeReading: _resume_reading,
    Abort: _abort,
    Close: _close,
}


class Bridge(asyncio.Protocol):
    """Relays one TCP socket to one tunnel stream; a `tunnel.Endpoint`.

    Life: `attach` binds it to a stream; `start` lets the socket's bytes flow into the stream
    (the client starts at once, the agent once its connection is up).
    """

    def __init__(self) -> None:
        self.relay = Relay()
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None

    @property
    def finished(self) -> bool:
        """The stream is over: reset, closed, or its socket lost."""
        return self.relay.finished

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id

    def start(self) -> None:
        """Relay from the socket into the stream, beginning with what arrived meanwhile."""
        tunnel = self.tunnel
        assert tunnel is not None
        self._perform(self.relay.on_started(tunnel.window(self.stream_id), tunnel.writing_paused))

    # -- the socket ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        self._perform(self.relay.on_connected())

    def data_received(self, data: bytes) -> None:
        if self.relay.take(len(data)):  # the steady state: what on_socket_read would return
            tunnel = self.tunnel
            assert tunnel is not None
            tunnel.send(self.stream_id, data)
        else:
            self._perform(self.relay.on_socket_read(data))

    def eof_received(self) -> bool:
        self._perform(self.relay.on_socket_ended())
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self._perform(self.relay.on_socket_full())

    def resume_writing(self) -> None:
        self._perform(self.relay.on_socket_drained())
        if self.tunnel is not None:
            self.tunnel.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._perform(self.relay.on_socket_lost())

    # -- the stream (tunnel.Endpoint) ---------------------------------------------------------

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self._perform(self.relay.on_peer_reset())

    def deliver(self, data: bytes) -> None:
        if self.relay.deliverable():  # the steady state: what on_peer_data would return
            tunnel, transport = self.tunnel, self.transport
            assert tunnel is not None and transport is not None
            transport.write(data)
            tunnel.acknowledge(self.stream_id, len(data))
        else:
            self._perform(self.relay.on_peer_data(data))

    def window_open(self) -> None:
        if self.tunnel is not None:
            self._perform(self.relay.on_credit(self.tunnel.window(self.stream_id)))

    def peer_eof(self) -> None:
        self._perform(self.relay.on_peer_ended())

    def peer_reset(self) -> None:
        self._perform(self.relay.on_peer_reset())

    def stream_closed(self) -> None:
        self._perform(self.relay.on_peer_closed())

    def tunnel_full(self) -> None:
        self._perform(self.relay.on_tunnel_full())

    def tunnel_drained(self) -> None:
        self._perform(self.relay.on_tunnel_drained())

    # -- performing the relay's actions --------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            _PERFORM[type(action)](self, action)

    def _send(self, action: Send) -> None:
        assert self.tunnel is not None
        self.tunnel.send(self.stream_id, action.data)

    def _acknowledge(self, action: Acknowledge) -> None:
        assert self.tunnel is not None
        self.tunnel.acknowledge(self.stream_id, action.nbytes)

    def _send_eof(self, action: SendEof) -> None:
        assert self.tunnel is not None
        self.tunnel.send_eof(self.stream_id)

    def _reset(self, action: Reset) -> None:
        if self.tunnel is not None:
            self.tunnel.reset(self.stream_id)

    def _on_socket(self, action: Action) -> None:
        assert self.transport is not None
        _ON_SOCKET[type(action)](self.transport, action)

    def _write(self, action: Write) -> None:
        # The per-chunk action: straight to the transport, sparing `_on_socket`'s lookup.
        assert self.transport is not None
        self.transport.write(action.data)


# By type rather than by `match`: this runs for every chunk, and a dict lookup does not get
# slower with the number of kinds of action.
_PERFORM: dict[type, Callable[[Bridge, Any], None]] = {
    Send: Bridge._send,
    Write: Bridge._write,
    Acknowledge: Bridge._acknowledge,
    SendEof: Bridge._send_eof,
    Reset: Bridge._reset,
    **dict.fromkeys((PauseReading, ResumeReading, WriteEof, Abort, Close), Bridge._on_socket),
}


class Splicer:
    """Two sockets joined by a `relay.Splice`: the sidecar's local connections.

    Life: the far socket's protocol is `end(Splice.FAR)`; `join` then hands it the app's socket,
    taken over from the `Bridge` that held it while the route was decided, with what the app
    sent meanwhile.
    """

    def __init__(self) -> None:
        self.splice = Splice()
        self.transports: list[asyncio.Transport | None] = [None, None]
        self.ends = (SpliceEnd(self, Splice.NEAR), SpliceEnd(self, Splice.FAR))

    def end(self, side: int) -> SpliceEnd:
        """The asyncio protocol of one side's socket."""
        return self.ends[side]

    def join(self, app: asyncio.Transport, held: list[memoryview], eof: bool) -> None:
        """Take over the app's socket (paused while its route was decided): first what it sent
        meanwhile (`held`, and its EOF if it came), then read it again. An app socket gone
        meanwhile closes the far one."""
        app.set_protocol(self.ends[Splice.NEAR])
        self.ends[Splice.NEAR].connection_made(app)
        if app.is_closing():
            self.feed(Splice.NEAR, SocketLost())
            return
        for chunk in held:
            self.feed(Splice.NEAR, SocketRead(bytes(chunk)))
        if eof:
            self.feed(Splice.NEAR, SocketEnded())
        elif not app.is_closing():
            app.resume_reading()

    def feed(self, side: int, event: Event) -> None:
        """One event of `side`'s socket; the splice's actions are performed at once."""
        for target, action in self.splice.handle(side, event):
            transport = self.transports[target]
            if transport is not None:
                _ON_SOCKET[type(action)](transport, action)


class SpliceEnd(asyncio.Protocol):
    """One socket of a `Splicer`: its callbacks, as splice events."""

    def __init__(self, splicer: Splicer, side: int) -> None:
        self.splicer = splicer
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.splicer.transports[self.side] = transport

    def data_received(self, data: bytes) -> None:
        self.splicer.feed(self.side, SocketRead(data))

    def eof_received(self) -> bool:
        self.splicer.feed(self.side, SocketEnded())
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self.splicer.feed(self.side, SocketFull())

    def resume_writing(self) -> None:
        self.splicer.feed(self.side, SocketDrained())

    def connection_lost(self, exc: Exception | None) -> None:
        self.splicer.feed(self.side, SocketLost(failed=exc is not None))
