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
from collections.abc import Callable
from typing import Any

from composemirror.protocol import Failure
from composemirror.relay import (
    Abort,
    Acknowledge,
    Action,
    Close,
    PauseReading,
    Relay,
    Reset,
    ResumeReading,
    Send,
    SendEof,
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
        self._perform(self.relay.on_started(tunnel.window(self.stream_id), tunnel.writing_paused))

    # -- the socket ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        self._perform(self.relay.on_connected())

    def data_received(self, data: bytes) -> None:
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

    def _write(self, action: Write) -> None:
        assert self.transport is not None
        self.transport.write(action.data)

    def _acknowledge(self, action: Acknowledge) -> None:
        assert self.tunnel is not None
        self.tunnel.acknowledge(self.stream_id, action.nbytes)

    def _pause_reading(self, action: PauseReading) -> None:
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        if action.again and not transport.is_reading():
            # The transport believes it is paused but still reads: re-pause it for real.
            transport.resume_reading()
        transport.pause_reading()

    def _resume_reading(self, action: ResumeReading) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _send_eof(self, action: SendEof) -> None:
        assert self.tunnel is not None
        self.tunnel.send_eof(self.stream_id)

    def _write_eof(self, action: WriteEof) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def _reset(self, action: Reset) -> None:
        if self.tunnel is not None:
            self.tunnel.reset(self.stream_id)

    def _abort(self, action: Abort) -> None:
        assert self.transport is not None
        reset_transport(self.transport)

    def _close(self, action: Close) -> None:
        assert self.transport is not None
        self.transport.close()


# By type rather than by `match`: this runs for every chunk, and a dict lookup does not get
# slower with the number of kinds of action.
_PERFORM: dict[type, Callable[[Bridge, Any], None]] = {
    Send: Bridge._send,
    Write: Bridge._write,
    Acknowledge: Bridge._acknowledge,
    PauseReading: Bridge._pause_reading,
    ResumeReading: Bridge._resume_reading,
    SendEof: Bridge._send_eof,
    WriteEof: Bridge._write_eof,
    Reset: Bridge._reset,
    Abort: Bridge._abort,
    Close: Bridge._close,
}
