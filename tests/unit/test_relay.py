"""The per-stream relay as event/action sequences, no sockets: `>> event << action` playbooks,
two relays over a real protocol `Connection` pair (a stalled stream beside a busy one), and a
hypothesis state machine that checks the relay's promises under any order of events."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from composemirror.protocol import (
    Connection,
    DataReceived,
    Failure,
    Proto,
    Role,
    StreamClosed,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamRequested,
    StreamReset,
    WindowUpdated,
    new_key,
)
from composemirror.relay import (
    Abort,
    Acknowledge,
    Action,
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
    Splice,
    Started,
    TunnelDrained,
    TunnelFull,
    Write,
    WriteEof,
)


class Playbook:
    """`assert Playbook() >> event << expected_action ...`: feeds each event to the relay and
    checks that it returns exactly the actions written after it (as mitmproxy's playbooks do)."""

    def __init__(self, relay: Relay | None = None) -> None:
        self.relay = relay or Relay()
        self.steps: list[tuple[Event, list[Action]]] = []

    def __rshift__(self, event: Event) -> Playbook:
        self.steps.append((event, []))
        return self

    def __lshift__(self, action: Action) -> Playbook:
        assert self.steps, "an action must follow an event"
        self.steps[-1][1].append(action)
        return self

    def __bool__(self) -> bool:
        for number, (event, expected) in enumerate(self.steps, 1):
            actual = self.relay.handle(event)
            assert actual == expected, f"step {number}, {event}: {actual} != {expected}"
        return True


def started(credit: int = 1 << 20) -> Playbook:
    """The sidecar's usual start: the app's connection is accepted, then its stream opened."""
    return Playbook() >> Connected() << PauseReading() >> Started(credit) << ResumeReading()


# -- early data --------------------------------------------------------------------------------


def test_the_apps_first_bytes_wait_for_the_start_then_go_first() -> None:
    assert (
        Playbook()
        >> Connected()
        << PauseReading()
        >> SocketRead(b"GET /")
        << PauseReading(again=True)
        >> SocketRead(b" HTTP/1.1")
        << PauseReading(again=True)
        >> Started(100)
        << Send(b"GET /")
        << Send(b" HTTP/1.1")
        << ResumeReading()
        >> SocketRead(b"\r\n")
        << Send(b"\r\n")
    )


def test_the_peers_early_data_and_eof_wait_for_the_socket_and_are_acknowledged_then() -> None:
    assert (
        Playbook()
        >> PeerData(b"hello")
        >> PeerData(b" there")
        >> PeerEnded()
        >> Connected()
        << PauseReading()
        << Write(b"hello")
        << Acknowledge(5)
        << Write(b" there")
        << Acknowledge(6)
        << WriteEof()
        >> Started(10)
        << ResumeReading()
    )


def test_an_eof_read_before_the_start_follows_the_held_bytes() -> None:
    assert (
        Playbook()
        >> Connected()
        << PauseReading()
        >> SocketRead(b"abc")
        << PauseReading(again=True)
        >> SocketEnded()
        >> Started(10)
        << Send(b"abc")
        << SendEof()
    )


# -- half-close both ways ----------------------------------------------------------------------


def test_the_socket_half_closes_and_the_peer_still_answers() -> None:
    assert (
        started()
        >> SocketRead(b"request")
        << Send(b"request")
        >> SocketEnded()
        << SendEof()
        >> SocketEnded()  # a re-armed reader reports EOF again: nothing more
        >> PeerData(b"answer")
        << Write(b"answer")
        << Acknowledge(6)
        >> PeerEnded()
        << WriteEof()
        >> PeerClosed()
        << Close()
        >> SocketLost()
    )


def test_the_peer_half_closes_and_the_socket_still_sends() -> None:
    assert (
        started()
        >> PeerEnded()
        << WriteEof()
        >> SocketRead(b"more")
        << Send(b"more")
        >> SocketEnded()
        << SendEof()
        >> PeerClosed()
        << Close()
    )


# -- resets and refusal ------------------------------------------------------------------------


def test_a_reset_by_the_peer_aborts_the_socket_and_nothing_goes_back() -> None:
    assert started() >> SocketRead(b"x") << Send(b"x") >> PeerReset() << Abort() >> SocketLost()


def test_a_lost_socket_resets_the_stream_once() -> None:
    assert started() >> SocketLost() << Reset() >> SocketLost()


def test_a_refused_open_aborts_the_apps_connection_even_with_early_data_sent() -> None:
    assert (
        started()
        >> SocketRead(b"early")
        << Send(b"early")
        >> SocketEnded()
        << SendEof()
        >> PeerReset()
        << Abort()
    )  # what open_failed feeds


def test_a_stream_reset_while_the_agent_connected_is_reset_when_started() -> None:
    assert Playbook() >> PeerReset() >> Connected() >> Started(10) << Reset() << Abort()


# -- windows, acknowledgements and pause reasons -----------------------------------------------


def test_the_window_bounds_what_is_sent_and_reading_pauses_until_credit() -> None:
    assert (
        started(credit=4)
        >> SocketRead(b"abcdef")
        << Send(b"abcd")
        << PauseReading()
        >> SocketRead(b"gh")
        << PauseReading(again=True)
        >> SocketEnded()
        >> Credit(1)
        << Send(b"e")
        >> Credit(10)
        << Send(b"f")
        << Send(b"gh")
        << SendEof()
    )


def test_a_full_socket_owes_its_acknowledgements_until_it_drains() -> None:
    assert (
        started()
        >> SocketFull()
        >> PeerData(b"abc")
        << Write(b"abc")
        >> PeerData(b"de")
        << Write(b"de")
        >> SocketDrained()
        << Acknowledge(5)
        >> PeerData(b"f")
        << Write(b"f")
        << Acknowledge(1)
        >> SocketFull()
        >> SocketDrained()
    )


def test_reading_resumes_only_when_every_pause_reason_is_gone() -> None:
    assert (
        started(credit=2)
        >> TunnelFull()
        << PauseReading()
        >> SocketRead(b"abc")
        << Send(b"ab")  # a read already under way still goes
        >> Credit(5)
        << Send(b"c")  # the window opened, the tunnel is still full
        >> TunnelDrained()
        << ResumeReading()
    )


def test_a_full_tunnel_at_the_start_keeps_the_socket_paused() -> None:
    assert (
        Playbook()
        >> Connected()
        << PauseReading()
        >> Started(10, tunnel_full=True)
        >> TunnelDrained()
        << ResumeReading()
    )


def test_a_connection_handed_elsewhere_keeps_what_it_read() -> None:
    playbook = (
        Playbook()
        >> Connected()
        << PauseReading()
        >> SocketRead(b"abc")
        << PauseReading(again=True)
        >> SocketEnded()
    )
    assert playbook
    held, eof = playbook.relay.unsent()
    assert b"".join(held) == b"abc" and eof


# -- two streams over a real Connection pair ---------------------------------------------------


@dataclass
class FakeSocket:
    """What a relay did to its socket."""

    written: bytearray = field(default_factory=bytearray)
    eof_written: bool = False
    reading: bool = True
    closed: str = ""


class Wire:
    """Client and agent `Connection`s joined in memory, one relay per stream at each end."""

    def __init__(self, window: int) -> None:
        key = new_key()
        self.ends = {
            "client": Connection(Role.CLIENT, key, initial_window=window),
            "agent": Connection(Role.AGENT, key, initial_window=window),
        }
        self.relays: dict[tuple[str, int], Relay] = {}
        self.sockets: dict[tuple[str, int], FakeSocket] = {}
        self.ends["agent"].initiate()
        self.pump()

    def open(self) -> int:
        """An app connection, accepted and started at once, as the sidecar does."""
        stream_id = self.ends["client"].open_stream(Proto.TCP, "db", 5432)
        self.new_end("client", stream_id)
        self.feed("client", stream_id, Connected())
        self.feed("client", stream_id, Started(self.ends["client"].send_window(stream_id)))
        self.pump()
        return stream_id

    def new_end(self, side: str, stream_id: int) -> None:
        self.relays[side, stream_id] = Relay()
        self.sockets[side, stream_id] = FakeSocket()

    def feed(self, side: str, stream_id: int, event: Event) -> None:
        conn = self.ends[side]
        socket = self.sockets[side, stream_id]
        for action in self.relays[side, stream_id].handle(event):
            match action:
                case Send(data):
                    assert conn.send_data(stream_id, data) == len(data)
                case SendEof():
                    conn.send_eof(stream_id)
                case Acknowledge(nbytes):
                    conn.acknowledge(stream_id, nbytes)
                case Reset():
                    conn.reset_stream(stream_id)
                case Write(data):
                    socket.written += data
                case WriteEof():
                    socket.eof_written = True
                case PauseReading():
                    socket.reading = False
                case ResumeReading():
                    socket.reading = True
                case Abort():
                    socket.closed = "reset"
                case Close():
                    socket.closed = "closed"

    def pump(self) -> None:
        """Carry bytes both ways until both ends are quiet."""
        moved = True
        while moved:
            moved = False
            for side, other in (("client", "agent"), ("agent", "client")):
                data = self.ends[side].data_to_send()
                events = self.ends[other].receive_data(data)
                moved = moved or bool(data) or bool(events)
                for event in events:
                    self.dispatch(other, event)

    def dispatch(self, side: str, event: object) -> None:
        conn = self.ends[side]
        match event:
            case StreamRequested(stream_id):
                self.new_end(side, stream_id)
                self.feed(side, stream_id, Connected())  # the agent's connect succeeded
                conn.accept_stream(stream_id)
                self.feed(side, stream_id, Started(conn.send_window(stream_id)))
            case DataReceived(stream_id, data):
                self.feed(side, stream_id, PeerData(data))
            case WindowUpdated(stream_id):
                self.feed(side, stream_id, Credit(conn.send_window(stream_id)))
            case StreamEnded(stream_id):
                self.feed(side, stream_id, PeerEnded())
            case StreamClosed(stream_id):
                self.feed(side, stream_id, PeerClosed())
            case StreamReset(stream_id, _) | StreamFailed(stream_id, _, _):
                self.feed(side, stream_id, PeerReset())
            case StreamOpened():
                pass

    def app_sends(self, stream_id: int, data: bytes, chunk: int = 4096) -> int:
        """The app writes `data`; reading stops when its relay pauses. Returns bytes read."""
        socket = self.sockets["client", stream_id]
        read = 0
        while read < len(data) and socket.reading:
            self.feed("client", stream_id, SocketRead(data[read : read + chunk]))
            read += len(data[read : read + chunk])
            self.pump()
        return read


def test_a_stalled_stream_does_not_block_another() -> None:
    wire = Wire(window=16 * 1024)
    slow, fast = wire.open(), wire.open()
    wire.feed("agent", slow, SocketFull())  # the slow stream's server does not read
    payload = bytes(range(256)) * 512  # 128 KiB, eight windows

    slow_read = wire.app_sends(slow, payload)
    fast_read = wire.app_sends(fast, payload)

    assert fast_read == len(payload)
    assert bytes(wire.sockets["agent", fast].written) == payload
    # The stalled stream took one window plus what its app had read when the window closed.
    assert len(wire.sockets["agent", slow].written) == 16 * 1024
    assert slow_read < len(payload) and not wire.sockets["client", slow].reading

    wire.feed("agent", slow, SocketDrained())  # the server catches up
    wire.pump()
    slow_read += wire.app_sends(slow, payload[slow_read:])
    assert slow_read == len(payload)
    assert bytes(wire.sockets["agent", slow].written) == payload


def test_early_data_and_half_close_end_to_end_over_the_protocol() -> None:
    wire = Wire(window=64 * 1024)
    stream = wire.open()
    wire.feed("client", stream, SocketRead(b"query"))
    wire.feed("client", stream, SocketEnded())
    wire.pump()
    server = wire.sockets["agent", stream]
    assert bytes(server.written) == b"query" and server.eof_written
    wire.feed("agent", stream, SocketRead(b"answer"))
    wire.feed("agent", stream, SocketEnded())
    wire.pump()
    app = wire.sockets["client", stream]
    assert bytes(app.written) == b"answer" and app.eof_written
    assert app.closed == "closed" and server.closed == "closed"


def test_a_reset_reaches_the_other_socket() -> None:
    wire = Wire(window=64 * 1024)
    stream = wire.open()
    wire.feed("agent", stream, SocketLost())  # the server's connection died
    wire.pump()
    assert wire.sockets["client", stream].closed == "reset"


def test_a_refused_open_resets_the_apps_connection() -> None:
    wire = Wire(window=64 * 1024)
    client = wire.ends["client"]
    stream_id = client.open_stream(Proto.TCP, "db", 5432)
    wire.new_end("client", stream_id)
    wire.feed("client", stream_id, Connected())
    wire.feed("client", stream_id, Started(client.send_window(stream_id)))
    wire.feed("client", stream_id, SocketRead(b"early"))
    wire.ends["agent"].receive_data(client.data_to_send())
    wire.ends["agent"].fail_stream(stream_id, Failure.REFUSED, "connection refused")
    for event in client.receive_data(wire.ends["agent"].data_to_send()):
        wire.dispatch("client", event)
    assert wire.sockets["client", stream_id].closed == "reset"


def test_bytes_held_at_a_start_without_window_keep_reading_paused_until_credit() -> None:
    assert (
        Playbook()
        >> Connected()
        << PauseReading()
        >> SocketRead(b"x")
        << PauseReading(again=True)
        >> Started(0)
        >> TunnelFull()
        >> TunnelDrained()  # the tunnel has room, but the stream's window is still shut
        >> Credit(1)
        << Send(b"x")
        << ResumeReading()
    )


# -- the bridge's per-chunk fast paths ----------------------------------------------------------


@pytest.mark.parametrize(("credit", "size"), [(10, 9), (10, 10), (10, 11), (0, 1)])
def test_a_chunk_takes_the_fast_path_exactly_when_the_event_would_send_it_whole(
    credit: int, size: int
) -> None:
    fast, event = Relay(), Relay()
    for relay in (fast, event):
        relay.on_connected()
        relay.on_started(credit)
    taken = fast.take(size)
    actions = event.on_socket_read(b"x" * size)
    assert taken == (actions == [Send(b"x" * size)]) == (size <= credit)
    if taken:
        assert fast.credit == event.credit == credit - size


def test_peer_bytes_take_the_fast_path_only_into_a_connected_socket_with_room() -> None:
    relay = Relay()
    assert not relay.deliverable()  # early data waits for the socket
    relay.on_connected()
    assert relay.deliverable()
    relay.on_socket_full()
    assert not relay.deliverable()  # acknowledged once it drains
    relay.on_socket_drained()
    assert relay.deliverable()


# -- two sockets spliced (the sidecar's local connections) --------------------------------------

NEAR, FAR = Splice.NEAR, Splice.FAR


def splice_steps(*steps: tuple[int, Event, list[tuple[int, Action]]]) -> bool:
    """Feed each (side, event) to one splice; it must return exactly the actions given."""
    splice = Splice()
    for number, (side, event, expected) in enumerate(steps, 1):
        actual = splice.handle(side, event)
        assert actual == expected, f"step {number}, {side} {event}: {actual} != {expected}"
    return True


def test_a_splice_half_closes_each_way_and_closes_each_socket_once_both_ways_ended() -> None:
    assert splice_steps(
        (NEAR, SocketRead(b"query"), [(FAR, Write(b"query"))]),
        (NEAR, SocketEnded(), [(FAR, WriteEof())]),
        (NEAR, SocketEnded(), []),  # a reader re-armed after EOF reports it again
        (FAR, SocketRead(b"answer"), [(NEAR, Write(b"answer"))]),
        (FAR, SocketEnded(), [(NEAR, WriteEof()), (NEAR, Close()), (FAR, Close())]),
        (NEAR, SocketLost(), []),
        (FAR, SocketLost(), []),
    )


def test_a_full_socket_stops_the_other_being_read_until_it_drains() -> None:
    assert splice_steps(
        (FAR, SocketFull(), [(NEAR, PauseReading())]),
        (FAR, SocketDrained(), [(NEAR, ResumeReading())]),
        (NEAR, SocketFull(), [(FAR, PauseReading())]),
    )


def test_a_reset_on_one_side_resets_the_other_and_an_orderly_close_closes_it() -> None:
    assert splice_steps(
        (FAR, SocketLost(failed=True), [(NEAR, Abort())]),
        (NEAR, SocketLost(failed=True), []),
        (NEAR, SocketRead(b"late"), []),
    )
    assert splice_steps((NEAR, SocketLost(), [(FAR, Close())]), (FAR, SocketEnded(), []))


# -- any order of events -----------------------------------------------------------------------


def _sent(actions: Iterable[Action]) -> bytes:
    return b"".join(bytes(a.data) for a in actions if isinstance(a, Send))


@settings(max_examples=200, stateful_step_count=40, deadline=None)
class RelayMachine(RuleBasedStateMachine):
    """Random events in any order a socket and a stream can produce them."""

    def __init__(self) -> None:
        super().__init__()
        self.relay = Relay()
        self.connected = self.started = self.lost = self.gone = False
        self.socket_eof = self.peer_eof = self.socket_full = False
        self.read = bytearray()  # what the socket produced
        self.sent = bytearray()  # what went into the stream
        self.eof_sent = False
        self.peer_sent = bytearray()  # what the peer sent on the stream
        self.written = bytearray()
        self.eof_written = False
        self.acknowledged = 0
        self.credit = 0
        self.reading: bool | None = None
        self.closed_socket = False

    def do(self, event: Event) -> list[Action]:
        actions = self.relay.handle(event)
        for action in actions:
            match action:
                case Send(data):
                    assert not self.eof_sent, "data after EOF"
                    self.sent += data
                    self.credit -= len(data)
                    assert self.credit >= 0, "sent beyond the window"
                case SendEof():
                    assert not self.eof_sent
                    self.eof_sent = True
                case Write(data):
                    assert self.connected and not self.eof_written
                    self.written += data
                case WriteEof():
                    assert self.connected
                    self.eof_written = True
                case Acknowledge(nbytes):
                    assert not self.socket_full, "acknowledged into a full socket"
                    self.acknowledged += nbytes
                case PauseReading(again):
                    assert self.connected
                    assert again or self.reading is not False, "paused twice"
                    self.reading = False
                case ResumeReading():
                    assert self.connected and self.reading is not True, "resumed twice"
                    self.reading = True
                case Abort() | Close():
                    assert self.connected
                    self.closed_socket = True
                case Reset():
                    pass
        return actions

    @precondition(lambda self: not self.connected)
    @rule()
    def connect(self) -> None:
        self.connected = True
        self.reading = True
        self.do(Connected())

    @precondition(lambda self: not self.started)
    @rule(credit=st.integers(0, 64), tunnel_full=st.booleans())
    def start(self, credit: int, tunnel_full: bool) -> None:
        self.started = True
        self.credit = credit
        self.do(Started(credit, tunnel_full=tunnel_full))

    @precondition(
        lambda self: (
            self.connected and not self.socket_eof and not self.lost and not self.closed_socket
        )
    )
    @rule(data=st.binary(min_size=1, max_size=40))
    def socket_read(self, data: bytes) -> None:
        self.read += data
        twin = copy.copy(self.relay)
        twin.held, twin.early = deque(self.relay.held), list(self.relay.early)
        fast = twin.take(len(data))
        actions = self.do(SocketRead(data))
        # The bridge's fast path says yes exactly when the event's only action is the Send,
        # and leaves the relay as the event does.
        assert fast == (actions == [Send(data)])
        if fast:
            assert vars(twin) == vars(self.relay)

    @precondition(lambda self: self.connected and not self.lost and not self.closed_socket)
    @rule()
    def socket_ended(self) -> None:
        self.socket_eof = True
        self.do(SocketEnded())

    @precondition(lambda self: self.connected and not self.lost)
    @rule(full=st.booleans())
    def socket_buffer(self, full: bool) -> None:
        if full != self.socket_full:
            self.socket_full = full
            self.do(SocketFull() if full else SocketDrained())

    @precondition(lambda self: self.connected and not self.lost)
    @rule()
    def socket_lost(self) -> None:
        self.lost = True
        self.do(SocketLost())

    @precondition(lambda self: self.started and not self.gone)
    @rule(grant=st.integers(1, 64))
    def credit_granted(self, grant: int) -> None:
        self.credit += grant
        self.do(Credit(self.credit))

    @precondition(lambda self: not self.peer_eof and not self.gone)
    @rule(data=st.binary(min_size=1, max_size=40))
    def peer_data(self, data: bytes) -> None:
        self.peer_sent += data
        fast = self.relay.deliverable()
        actions = self.do(PeerData(data))
        assert fast == (actions == [Write(data), Acknowledge(len(data))])

    @precondition(lambda self: not self.peer_eof and not self.gone)
    @rule()
    def peer_ended(self) -> None:
        self.peer_eof = True
        self.do(PeerEnded())

    @precondition(lambda self: not self.gone)
    @rule()
    def peer_reset(self) -> None:
        self.gone = True
        self.do(PeerReset())

    @precondition(lambda self: not self.gone and self.peer_eof and self.eof_sent)
    @rule()
    def peer_closed(self) -> None:
        self.gone = True
        self.do(PeerClosed())

    @precondition(lambda self: not self.gone)
    @rule(full=st.booleans())
    def tunnel(self, full: bool) -> None:
        self.do(TunnelFull() if full else TunnelDrained())

    @rule()
    def time_passes(self) -> None:
        """Always possible, so a finished stream still lets the machine take steps."""

    @invariant()
    def the_stream_carries_a_prefix_of_what_was_read_in_order(self) -> None:
        assert self.read.startswith(self.sent)

    @invariant()
    def the_socket_gets_a_prefix_of_what_the_peer_sent_once_it_exists(self) -> None:
        assert self.peer_sent.startswith(self.written)
        if self.connected:
            assert self.written == self.peer_sent

    @invariant()
    def acknowledged_bytes_were_written_and_a_drained_socket_owes_nothing(self) -> None:
        assert self.acknowledged <= len(self.written)
        if not self.socket_full:
            assert self.acknowledged == len(self.written)

    @invariant()
    def bytes_wait_only_while_reading_is_paused(self) -> None:
        waiting = len(self.read) - len(self.sent)
        if waiting and not self.socket_eof and not self.gone and not self.lost:
            assert self.reading is False

    @invariant()
    def eof_goes_after_everything_read(self) -> None:
        if self.eof_sent:
            assert self.socket_eof and self.sent == self.read
        if self.started and self.socket_eof and self.credit > 0 and not (self.gone or self.lost):
            assert self.eof_sent

    @invariant()
    def the_peers_eof_reaches_a_connected_socket(self) -> None:
        if self.peer_eof and self.connected:
            assert self.eof_written


TestRelayMachine = RelayMachine.TestCase
