"""Sans-IO relay of one TCP connection: a socket, and a tunnel stream or another socket.

`Relay` owns every per-stream decision: what the socket's bytes wait for (the stream being
started, the peer's window, a full tunnel), early data either way, half-close both ways, when
received bytes are acknowledged, and what a reset or a lost socket does to the other side.
`Splice` owns the same decisions for two sockets joined directly (the sidecar's local
connections). Both are fed events and return actions; they must do no I/O and know nothing of
asyncio (`bridge` performs the actions).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "Abort",
    "Acknowledge",
    "Action",
    "Close",
    "Connected",
    "Credit",
    "Event",
    "PauseReading",
    "PeerClosed",
    "PeerData",
    "PeerEnded",
    "PeerReset",
    "Relay",
    "Reset",
    "ResumeReading",
    "Send",
    "SendEof",
    "SocketDrained",
    "SocketEnded",
    "SocketFull",
    "SocketLost",
    "SocketRead",
    "Splice",
    "Started",
    "TunnelDrained",
    "TunnelFull",
    "Write",
    "WriteEof",
]


# Why the socket is not read, as bits of `Relay.paused` (any one is enough; bits, not an enum
# in a set, because they change on every window and this is the per-chunk path):
OPENING: Final = 1
"""The stream is not started yet (the client's open is being decided, the agent connects)."""
WINDOW: Final = 2
"""The peer's window is used up: bytes already read wait for its acknowledgement."""
TUNNEL: Final = 4
"""The tunnel's own write buffer is full: every stream waits."""


# Events and actions are slotted dataclasses, not frozen ones: a frozen dataclass is several
# times slower to make, and a few are made for every chunk relayed. Treat them as values.

# -- events: what happened -------------------------------------------------------------------


@dataclass(slots=True)
class Connected:
    """The socket exists (the app's was accepted, or the agent's connect completed)."""


@dataclass(slots=True)
class SocketRead:
    """Bytes read from the socket."""

    data: bytes


@dataclass(slots=True)
class SocketEnded:
    """The socket's reading side reached EOF (its peer half-closed)."""


@dataclass(slots=True)
class SocketFull:
    """The socket's write buffer went above its high-water mark."""


@dataclass(slots=True)
class SocketDrained:
    """The socket's write buffer went back below its low-water mark."""


@dataclass(slots=True)
class SocketLost:
    """The socket is gone (closed or failed). `failed`: by an error, such as a reset."""

    failed: bool = False


@dataclass(slots=True)
class Started:
    """The socket's bytes may now go into the stream, which may take `credit` bytes."""

    credit: int
    tunnel_full: bool = False


@dataclass(slots=True)
class Credit:
    """The stream's send window is now `window` bytes (the peer acknowledged some)."""

    window: int


@dataclass(slots=True)
class PeerData:
    """Bytes the peer sent on the stream; they must be acknowledged once written."""

    data: bytes


@dataclass(slots=True)
class PeerEnded:
    """The peer sent EOF on the stream: it sends no more."""


@dataclass(slots=True)
class PeerReset:
    """The stream was aborted: reset by the peer, refused, or lost with the tunnel."""


@dataclass(slots=True)
class PeerClosed:
    """Both ends sent EOF: the stream is over."""


@dataclass(slots=True)
class TunnelFull:
    """The tunnel's write buffer is full: stop reading sockets."""


@dataclass(slots=True)
class TunnelDrained:
    """The tunnel's write buffer drained."""


Event: TypeAlias = (
    Connected
    | SocketRead
    | SocketEnded
    | SocketFull
    | SocketDrained
    | SocketLost
    | Started
    | Credit
    | PeerData
    | PeerEnded
    | PeerReset
    | PeerClosed
    | TunnelFull
    | TunnelDrained
)

# -- actions: what to do ---------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Send these bytes on the stream; they fit its window."""

    data: bytes | memoryview


@dataclass(slots=True)
class SendEof:
    """Send EOF on the stream."""


@dataclass(slots=True)
class Reset:
    """Reset the stream."""


@dataclass(slots=True)
class Acknowledge:
    """Tell the peer that `nbytes` of its data reached the socket."""

    nbytes: int


@dataclass(slots=True)
class Write:
    """Write these bytes to the socket."""

    data: bytes


@dataclass(slots=True)
class WriteEof:
    """Half-close the socket's writing side."""


@dataclass(slots=True)
class PauseReading:
    """Stop reading the socket. `again`: it was paused already but still delivered bytes."""

    again: bool = False


@dataclass(slots=True)
class ResumeReading:
    """Read the socket again."""


@dataclass(slots=True)
class Abort:
    """Close the socket with a reset (RST), as a refused or aborted connection does."""


@dataclass(slots=True)
class Close:
    """Close the socket in an orderly way."""


Action: TypeAlias = (
    Send
    | SendEof
    | Reset
    | Acknowledge
    | Write
    | WriteEof
    | PauseReading
    | ResumeReading
    | Abort
    | Close
)


class Relay:
    """One stream's relay state; `handle` an event, perform the actions it returns in order.

    Life: the socket may exist before the stream is started (the app's connection, accepted while
    its route is decided) or after (the agent's connection, made once the stream was requested).
    Bytes read before `Started` are held, and so are bytes the peer sends before `Connected`
    (early data both ways, saving a round trip). The socket is read only while nothing in
    `paused` holds it; received bytes are acknowledged at once while the socket's buffer is
    below its high-water mark and owed until it drains otherwise, so a slow socket stalls its
    own stream and never the others.
    """

    def __init__(self) -> None:
        self.connected = False
        self.started = False
        self.finished = False
        """The stream is over (reset, closed or its socket lost): nothing more goes into it."""
        self.paused = OPENING
        """Bits: OPENING, WINDOW, TUNNEL."""
        self.reading = True
        """What the socket was last told: a new socket reads."""
        self.credit = 0
        self.held: deque[memoryview] = deque()
        """Read from the socket, not yet in the stream (before the start, or beyond the window)."""
        self.eof_read = False
        self.eof_held = False
        """The socket's EOF, to send after what is held."""
        self.early: list[bytes] = []
        """The peer's bytes from before the socket existed."""
        self.early_eof = False
        self.socket_full = False
        self.owed = 0
        """Bytes written to a full socket, acknowledged once it drains."""

    def handle(self, event: Event) -> list[Action]:
        """Feed one event; return what to do, in order."""
        match event:
            case SocketRead(data):
                return self.on_socket_read(data)
            case PeerData(data):
                return self.on_peer_data(data)
            case Credit(window):
                return self.on_credit(window)
            case Connected():
                return self.on_connected()
            case Started(credit, tunnel_full):
                return self.on_started(credit, tunnel_full)
            case SocketEnded():
                return self.on_socket_ended()
            case SocketFull():
                return self.on_socket_full()
            case SocketDrained():
                return self.on_socket_drained()
            case SocketLost():
                return self.on_socket_lost()
            case PeerEnded():
                return self.on_peer_ended()
            case PeerReset():
                return self.on_peer_reset()
            case PeerClosed():
                return self.on_peer_closed()
            case TunnelFull():
                return self.on_tunnel_full()
            case TunnelDrained():
                return self.on_tunnel_drained()
        raise TypeError(f"not a relay event: {event!r}")

    def unsent(self) -> tuple[list[memoryview], bool]:
        """What the socket sent that never went into a stream, and whether its EOF came: for
        a connection that is handed elsewhere instead of being started."""
        return list(self.held), self.eof_held

    # -- one method per event: `handle(Event(...))` is `on_event(...)`. An adapter on the
    # per-chunk path calls these directly, sparing an event object and a match per call.

    # -- socket side ---------------------------------------------------------------------------

    def on_connected(self) -> list[Action]:
        self.connected = True
        actions = self._reconsider()
        early, self.early = self.early, []
        for data in early:
            actions += self.on_peer_data(data)
        if self.early_eof:
            actions.append(WriteEof())
        return actions

    # -- the per-chunk fast paths: with the relay in its steady state, a chunk's actions are
    # known without making them. `bridge` asks these first and feeds the event only when they
    # say no; the state changes exactly as the event would change it.

    def take(self, size: int) -> bool:
        """Whether `size` bytes just read go into the stream whole, as `on_socket_read`'s only
        action (`[Send(data)]`); if so they are counted against the window as it would."""
        if self.started and size <= self.credit and not self.held:
            self.credit -= size
            return True
        return False

    def deliverable(self) -> bool:
        """Whether the peer's bytes go to the socket and are acknowledged at once, as
        `on_peer_data` would return them: `[Write(data), Acknowledge(len(data))]`."""
        return self.connected and not self.socket_full

    def on_socket_read(self, data: bytes) -> list[Action]:
        if not self.started or self.held:
            self.held.append(memoryview(data))
            # Python 3.11 may deliver bytes although reading was paused: pause it for real.
            return [] if self.eof_read else [PauseReading(again=True)]
        size = len(data)
        taken = min(size, self.credit)
        if taken == size:
            self.credit -= size
            return [Send(data)]
        actions: list[Action] = []
        view = memoryview(data)
        if taken > 0:
            self.credit -= taken
            actions.append(Send(view[:taken]))
        self.held.append(view[taken:])
        return actions + self._pause(WINDOW)

    def on_socket_ended(self) -> list[Action]:
        if self.eof_read:
            return []  # a reader re-armed after EOF reports it again
        self.eof_read = True
        if not self.started or self.held:
            self.eof_held = True
            return []
        return [SendEof()]

    def on_socket_full(self) -> list[Action]:
        self.socket_full = True
        return []

    def on_socket_drained(self) -> list[Action]:
        self.socket_full = False
        owed, self.owed = self.owed, 0
        return [Acknowledge(owed)] if owed else []

    def on_socket_lost(self) -> list[Action]:
        if self.finished:
            return []
        self.finished = True
        return [Reset()]

    # -- stream side ---------------------------------------------------------------------------

    def on_started(self, credit: int, tunnel_full: bool = False) -> list[Action]:
        self.started = True
        if self.finished:
            # The stream went (reset, or its socket lost) while it was being opened.
            return [Reset(), Abort()] if self.connected else [Reset()]
        self.credit = credit
        self.paused = (self.paused | TUNNEL if tunnel_full else self.paused) & ~OPENING
        return self._send_held()

    def _send_held(self) -> list[Action]:
        if not self.started:
            return []
        actions: list[Action] = []
        held = self.held
        while held:
            chunk = held[0]
            taken = min(len(chunk), self.credit)
            if taken > 0:
                self.credit -= taken
                actions.append(Send(chunk[:taken] if taken < len(chunk) else chunk))
            if taken < len(chunk):
                held[0] = chunk[taken:]
                # The rest waits for the window (also when the start gave none): a drained
                # tunnel must not resume reading meanwhile.
                return actions + self._pause(WINDOW)
            held.popleft()
        if self.eof_held:
            self.eof_held = False
            actions.append(SendEof())
        return actions + self._resume(WINDOW)

    def on_credit(self, window: int) -> list[Action]:
        self.credit = window
        return self._send_held()

    def on_peer_data(self, data: bytes) -> list[Action]:
        if not self.connected:
            self.early.append(data)  # acknowledged once the socket has it
            return []
        if self.socket_full:
            self.owed += len(data)
            return [Write(data)]
        return [Write(data), Acknowledge(len(data))]

    def on_peer_ended(self) -> list[Action]:
        if not self.connected:
            self.early_eof = True
            return []
        return [WriteEof()]

    def on_peer_reset(self) -> list[Action]:
        self.finished = True
        return [Abort()] if self.connected else []

    def on_peer_closed(self) -> list[Action]:
        self.finished = True
        return [Close()] if self.connected else []

    def on_tunnel_full(self) -> list[Action]:
        return self._pause(TUNNEL)

    def on_tunnel_drained(self) -> list[Action]:
        return self._resume(TUNNEL)

    # -- reading -------------------------------------------------------------------------------

    def _pause(self, reason: int) -> list[Action]:
        self.paused |= reason
        return self._reconsider()

    def _resume(self, reason: int) -> list[Action]:
        self.paused &= ~reason
        return self._reconsider()

    def _reconsider(self) -> list[Action]:
        # After EOF there is nothing left to read; before the socket there is nothing to tell.
        if not self.connected or self.eof_read or self.finished:
            return []
        reading = not self.paused
        if reading == self.reading:
            return []
        self.reading = reading
        return [ResumeReading()] if reading else [PauseReading()]


class Splice:
    """Two sockets joined directly, `NEAR` (the app's) and `FAR`; `handle(side, event)` returns
    (side, action) pairs to perform in order.

    What one socket reads the other writes; a socket whose write buffer is full stops the other
    being read until it drains. EOF read on one side is written to the other (half-close), and a
    socket is closed once it has both read and written EOF. A socket lost in an orderly way
    closes the other; one lost to an error (a reset) resets the other. There is no stream here,
    so no window, acknowledgement or early data: the sockets' own buffers are the flow control.
    """

    NEAR: Final = 0
    FAR: Final = 1

    def __init__(self) -> None:
        self.eof_read = [False, False]
        """Per side: its socket's peer half-closed."""
        self.eof_written = [False, False]
        """Per side: EOF was written to it."""
        self.closed = [False, False]
        """Per side: it was closed, aborted or lost; nothing more is done to it."""

    def handle(self, side: int, event: Event) -> list[tuple[int, Action]]:
        """Feed one event of `side`'s socket; return what to do to which side, in order."""
        other = 1 - side
        match event:
            case SocketRead(data):
                return [] if self.closed[other] else [(other, Write(data))]
            case SocketEnded():
                return self._ended(side, other)
            case SocketFull():
                return [] if self.closed[other] else [(other, PauseReading())]
            case SocketDrained():
                return [] if self.closed[other] else [(other, ResumeReading())]
            case SocketLost(failed):
                self.closed[side] = True
                if self.closed[other]:
                    return []
                self.closed[other] = True
                return [(other, Abort() if failed else Close())]
        raise TypeError(f"not a splice event: {event!r}")

    def _ended(self, side: int, other: int) -> list[tuple[int, Action]]:
        if self.eof_read[side]:
            return []  # a reader re-armed after EOF reports it again
        self.eof_read[side] = True
        actions: list[tuple[int, Action]] = []
        if not self.closed[other]:
            self.eof_written[other] = True
            actions.append((other, WriteEof()))
        for end in (other, side):
            if self.eof_read[end] and self.eof_written[end] and not self.closed[end]:
                # asyncio keeps a half-closed socket open; once both ways ended, close it.
                self.closed[end] = True
                actions.append((end, Close()))
        return actions
