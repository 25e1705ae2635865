"""A TCP socket bridged to one tunnel stream: the asyncio adapter of `relay.Relay`.

`Bridge` turns the socket's and the stream's callbacks into relay events and performs the
actions the relay returns; every decision (early data, half-close, windows, acknowledgements,
pauses, resets) is the relay's. It must hold no relay state of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from composemirror.protocol import Failure
from composemirror.relay import (
    Abort,
    Acknowledge,
    Close,
    Connected,
    Credit,
    Event,
    PauseReading,
    PeerClosed,
    PeerData,
    PeerEnded,
    PeerReset,
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
    Started,
    TunnelDrained,
    TunnelFull,
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
        self._handle(Started(tunnel.window(self.stream_id), tunnel_full=tunnel.writing_paused))

    # -- the socket ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        self._handle(Connected())

    def data_received(self, data: bytes) -> None:
        self._handle(SocketRead(data))

    def eof_received(self) -> bool:
        self._handle(SocketEnded())
        return True  # keep the socket open for the other direction (half-close)

    def pause_writing(self) -> None:
        self._handle(SocketFull())

    def resume_writing(self) -> None:
        self._handle(SocketDrained())
        if self.tunnel is not None:
            self.tunnel.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle(SocketLost())

    # -- the stream (tunnel.Endpoint) ---------------------------------------------------------

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self._handle(PeerReset())

    def deliver(self, data: bytes) -> None:
        self._handle(PeerData(data))

    def window_open(self) -> None:
        if self.tunnel is not None:
            self._handle(Credit(self.tunnel.window(self.stream_id)))

    def peer_eof(self) -> None:
        self._handle(PeerEnded())

    def peer_reset(self) -> None:
        self._handle(PeerReset())

    def stream_closed(self) -> None:
        self._handle(PeerClosed())

    def tunnel_full(self) -> None:
        self._handle(TunnelFull())

    def tunnel_drained(self) -> None:
        self._handle(TunnelDrained())

    # -- performing the relay's actions --------------------------------------------------------

    def _handle(self, event: Event) -> None:
        tunnel, transport, stream_id = self.tunnel, self.transport, self.stream_id
        for action in self.relay.handle(event):
            match action:
                case Send(data):
                    assert tunnel is not None
                    tunnel.send(stream_id, data)
                case Write(data):
                    assert transport is not None
                    transport.write(data)
                case Acknowledge(nbytes):
                    assert tunnel is not None
                    tunnel.acknowledge(stream_id, nbytes)
                case PauseReading(again):
                    assert transport is not None
                    if transport.is_closing():
                        continue
                    if again and not transport.is_reading():
                        # The transport believes it is paused but still reads: re-pause it.
                        transport.resume_reading()
                    transport.pause_reading()
                case ResumeReading():
                    assert transport is not None
                    if not transport.is_closing():
                        transport.resume_reading()
                case SendEof():
                    assert tunnel is not None
                    tunnel.send_eof(stream_id)
                case WriteEof():
                    assert transport is not None
                    if transport.can_write_eof():
                        transport.write_eof()
                case Reset():
                    if tunnel is not None:
                        tunnel.reset(stream_id)
                case Abort():
                    assert transport is not None
                    reset_transport(transport)
                case Close():
                    assert transport is not None
                    transport.close()
