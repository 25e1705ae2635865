"""Tests of composemirror.protocol: a CLIENT and an AGENT Connection wired together in memory."""

from __future__ import annotations

import copy
import hashlib
import hmac
import random
import struct
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composemirror.protocol import (
    HEADER,
    INITIAL_WINDOW,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    UDP_WINDOW,
    Authenticated,
    Connection,
    DataReceived,
    DnsAnswerReceived,
    DnsQueryReceived,
    Event,
    Failure,
    FrameType,
    LocalProtocolError,
    PingReceived,
    PongReceived,
    Proto,
    ProtocolError,
    Rejected,
    RemoteProtocolError,
    Role,
    StreamClosed,
    StreamEnded,
    StreamFailed,
    StreamOpened,
    StreamRequested,
    StreamReset,
    WindowUpdated,
    key_from_text,
    key_to_text,
    new_key,
)

KEY = bytes(range(32))
EVENT_TYPES = get_args(Event)


def frame(ftype: int, stream_id: int, payload: bytes = b"") -> bytes:
    """Encode one frame independently of the module under test."""
    return struct.pack("!BII", ftype, stream_id, len(payload)) + payload


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """Decode a byte string that must consist of whole frames."""
    out = []
    pos = 0
    while pos < len(data):
        ftype, stream_id, length = struct.unpack_from("!BII", data, pos)
        pos += 9
        out.append((ftype, stream_id, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def mac(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, label + first + second, hashlib.sha256).digest()


def feed(conn: Connection, data: bytes, chunk: int | None) -> list[Event]:
    if chunk is None:
        return conn.receive_data(data)
    events: list[Event] = []
    for start in range(0, len(data), chunk):
        events += conn.receive_data(data[start : start + chunk])
    return events


def payload_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Pair:
    """A client and an agent whose outputs are shuttled into each other on demand."""

    def __init__(
        self,
        *,
        client_key: bytes = KEY,
        agent_key: bytes = KEY,
        initial_window: int = INITIAL_WINDOW,
        chunk: int | None = None,
    ) -> None:
        self.client = Connection(Role.CLIENT, client_key, initial_window=initial_window)
        self.agent = Connection(Role.AGENT, agent_key, initial_window=initial_window)
        self.chunk = chunk

    def to_agent(self) -> list[Event]:
        return feed(self.agent, self.client.data_to_send(), self.chunk)

    def to_client(self) -> list[Event]:
        return feed(self.client, self.agent.data_to_send(), self.chunk)

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Shuttle bytes both ways until quiet; return (client events, agent events)."""
        client_events: list[Event] = []
        agent_events: list[Event] = []
        for _ in range(1000):
            to_agent = self.client.data_to_send()
            to_client = self.agent.data_to_send()
            if not to_agent and not to_client:
                return client_events, agent_events
            agent_events += feed(self.agent, to_agent, self.chunk)
            client_events += feed(self.client, to_client, self.chunk)
        raise AssertionError("pump did not settle")

    def handshake(self) -> None:
        self.agent.initiate()
        assert self.pump() == ([Authenticated()], [Authenticated()])

    def open(self, proto: Proto = Proto.TCP, host: str = "10.1.2.3", port: int = 80) -> int:
        stream_id = self.client.open_stream(proto, host, port)
        assert self.pump() == ([], [StreamRequested(stream_id, proto, host, port)])
        self.agent.accept_stream(stream_id)
        assert self.pump() == ([StreamOpened(stream_id)], [])
        return stream_id


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.handshake()
    return p


# --------------------------------------------------------------------------- handshake


def test_handshake_exact_frames() -> None:
    client = Connection(Role.CLIENT, KEY)
    agent = Connection(Role.AGENT, KEY)
    client.initiate()
    assert client.data_to_send() == b""
    agent.initiate()

    hello = frames(agent.data_to_send())
    assert len(hello) == 1
    ftype, stream_id, payload = hello[0]
    assert (ftype, stream_id, len(payload)) == (FrameType.HELLO, 0, 22)
    assert payload[:6] == b"CMTN\x00\x01"
    server_nonce = payload[6:]

    assert client.receive_data(frame(ftype, stream_id, payload)) == []
    assert not client.authenticated
    ((ftype, stream_id, auth),) = frames(client.data_to_send())
    assert (ftype, stream_id, len(auth)) == (FrameType.AUTH, 0, 50)
    assert auth[:2] == b"\x00\x01"
    client_nonce = auth[2:18]
    assert client_nonce != server_nonce
    assert auth[18:] == mac(KEY, b"client", server_nonce, client_nonce)

    assert agent.receive_data(frame(FrameType.AUTH, 0, auth)) == [Authenticated()]
    assert agent.authenticated
    welcome = agent.data_to_send()
    assert welcome == frame(FrameType.WELCOME, 0, mac(KEY, b"agent", client_nonce, server_nonce))
    assert client.receive_data(welcome) == [Authenticated()]
    assert client.authenticated
    assert client.data_to_send() == b""
    assert agent.data_to_send() == b""


def test_nonces_are_fresh_per_connection() -> None:
    hellos = set()
    for _ in range(3):
        agent = Connection(Role.AGENT, KEY)
        agent.initiate()
        hellos.add(agent.data_to_send())
    assert len(hellos) == 3


def test_wrong_key_rejected_by_agent() -> None:
    p = Pair(client_key=KEY, agent_key=bytes(32))
    p.agent.initiate()
    assert p.to_client() == []
    with pytest.raises(RemoteProtocolError, match=r"^authentication failed$"):
        p.to_agent()
    reject = p.agent.data_to_send()
    assert reject == frame(FrameType.REJECT, 0, b"authentication failed")
    assert p.client.receive_data(reject) == [Rejected("authentication failed")]
    assert not p.client.authenticated
    assert not p.agent.authenticated
    assert p.client.closed and p.agent.closed
    with pytest.raises(LocalProtocolError):
        p.client.open_stream(Proto.TCP, "10.0.0.1", 80)
    # The failed agent stays failed, for the peer's fault.
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        p.agent.receive_data(b"\x00")


def test_client_verifies_the_agent() -> None:
    """Mutual auth: an impostor without the key cannot produce a valid WELCOME."""
    client = Connection(Role.CLIENT, KEY)
    server_nonce = bytes(16)
    client.receive_data(frame(FrameType.HELLO, 0, b"CMTN\x00\x01" + server_nonce))
    ((_, _, auth),) = frames(client.data_to_send())
    client_nonce = auth[2:18]
    forged = mac(b"not the key", b"agent", client_nonce, server_nonce)
    with pytest.raises(ProtocolError, match=r"^authentication failed$"):
        client.receive_data(frame(FrameType.WELCOME, 0, forged))
    assert client.data_to_send() == frame(FrameType.REJECT, 0, b"authentication failed")
    assert not client.authenticated


def test_client_rejects_welcome_replayed_from_another_session() -> None:
    first = Pair()
    first.agent.initiate()
    first.to_client()
    first.to_agent()
    old_welcome = first.agent.data_to_send()

    client = Connection(Role.CLIENT, KEY)
    agent = Connection(Role.AGENT, KEY)
    agent.initiate()
    client.receive_data(agent.data_to_send())
    with pytest.raises(ProtocolError, match="authentication failed"):
        client.receive_data(old_welcome)


def test_agent_rejects_other_version() -> None:
    p = Pair()
    p.agent.initiate()
    p.to_client()
    ((_, _, auth),) = frames(p.client.data_to_send())
    bad = struct.pack("!H", 2) + auth[2:]
    with pytest.raises(ProtocolError, match=r"^unsupported version 2, agent speaks 1$"):
        p.agent.receive_data(frame(FrameType.AUTH, 0, bad))
    reject = p.agent.data_to_send()
    assert reject == frame(FrameType.REJECT, 0, b"unsupported version 2, agent speaks 1")
    assert p.client.receive_data(reject) == [Rejected("unsupported version 2, agent speaks 1")]


def test_client_rejects_other_version() -> None:
    client = Connection(Role.CLIENT, KEY)
    # A future HELLO may be longer; the version is still reported.
    hello = b"CMTN" + struct.pack("!H", 9) + bytes(40)
    with pytest.raises(ProtocolError, match=r"^unsupported version 9, client speaks 1$"):
        client.receive_data(frame(FrameType.HELLO, 0, hello))
    assert client.data_to_send() == frame(
        FrameType.REJECT, 0, b"unsupported version 9, client speaks 1"
    )
    assert PROTOCOL_VERSION == 1


def test_client_rejects_non_agent() -> None:
    client = Connection(Role.CLIENT, KEY)
    with pytest.raises(ProtocolError, match="not a composemirror agent"):
        client.receive_data(frame(FrameType.HELLO, 0, b"SSH-2.0-OpenSSH"))
    other = Connection(Role.CLIENT, KEY)
    with pytest.raises(ProtocolError, match="exceeds"):
        other.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@pytest.mark.parametrize(
    ("role", "data"),
    [
        (Role.CLIENT, frame(FrameType.PING, 0, bytes(8))),
        (Role.CLIENT, frame(FrameType.OPENED, 1)),
        (Role.CLIENT, frame(FrameType.WELCOME, 0, bytes(32))),
        (Role.AGENT, frame(FrameType.OPEN, 1, b"\x06\x00\x50\x01a")),
        (Role.AGENT, frame(FrameType.DATA, 1, b"x")),
        (Role.AGENT, frame(FrameType.DNS_QUERY, 7, b"q")),
        (Role.AGENT, frame(FrameType.HELLO, 0, b"CMTN\x00\x01" + bytes(16))),
    ],
)
def test_non_handshake_frames_before_handshake_are_errors(role: Role, data: bytes) -> None:
    conn = Connection(role, KEY)
    conn.initiate()
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive_data(data)
    assert frames(conn.data_to_send())[0][0] == FrameType.REJECT


def test_agent_receiving_before_initiate_is_an_error() -> None:
    agent = Connection(Role.AGENT, KEY)
    with pytest.raises(LocalProtocolError, match="before initiate"):
        agent.receive_data(frame(FrameType.AUTH, 0, bytes(50)))
    with pytest.raises(LocalProtocolError, match="before initiate"):
        agent.receive_data(b"")  # the connection stays failed, for the caller's fault


def test_local_misuse_and_remote_violations_are_told_apart(pair: Pair) -> None:
    """A caller's bug leaves the connection usable; a peer's violation fails it."""
    with pytest.raises(LocalProtocolError, match="only the agent accepts streams"):
        pair.client.accept_stream(1)
    with pytest.raises(LocalProtocolError, match="was never opened"):
        pair.client.send_data(7, b"x")
    assert not pair.client.closed
    stream_id = pair.client.open_stream(Proto.TCP, "10.0.0.1", 80)
    with pytest.raises(RemoteProtocolError, match="unknown frame type 99"):
        pair.client.receive_data(frame(99, stream_id))
    assert pair.client.closed
    assert frames(pair.client.data_to_send())[-1][0] == FrameType.REJECT


def test_api_before_handshake_is_an_error() -> None:
    client = Connection(Role.CLIENT, KEY)
    with pytest.raises(ProtocolError, match="handshake"):
        client.open_stream(Proto.TCP, "10.0.0.1", 80)
    with pytest.raises(ProtocolError, match="handshake"):
        client.ping()


def test_reject_api_closes_both_ends(pair: Pair) -> None:
    pair.agent.reject("agent shutting down")
    assert pair.agent.closed
    assert pair.pump() == ([Rejected("agent shutting down")], [])
    assert pair.client.closed
    # Bytes after a REJECT are discarded; the API refuses new work.
    assert pair.client.receive_data(frame(FrameType.PING, 0, bytes(8))) == []
    with pytest.raises(ProtocolError, match="closed"):
        pair.client.ping()
    pair.client.reject("again")  # no-op on a closed connection
    assert pair.client.data_to_send() == b""


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, b"")
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, KEY, initial_window=0)


def test_keys() -> None:
    key = new_key()
    assert len(key) == 32
    assert key != new_key()
    assert key_to_text(key) == key.hex()
    assert key_from_text(key_to_text(key)) == key
    assert key_from_text(f"  {key.hex().upper()}\n") == key
    for bad in ("", "zz", "abc"):
        with pytest.raises(ValueError):
            key_from_text(bad)


# --------------------------------------------------------------------------- streams


def test_open_frames_exact_bytes(pair: Pair) -> None:
    first = pair.client.open_stream(Proto.TCP, "example.com", 443)
    second = pair.client.open_stream(Proto.UDP, "fd00::1", 53)
    assert (first, second) == (1, 3)
    assert pair.client.data_to_send() == (
        frame(FrameType.OPEN, 1, b"\x06\x01\xbb\x0bexample.com")
        + frame(FrameType.OPEN, 3, b"\x11\x00\x35\x07fd00::1")
    )
    assert pair.client.open_streams == 2


def test_open_stream_validates_arguments(pair: Pair) -> None:
    for host in ("", "ex ample", "bücher.de", "a" * 256, "nul\x00"):
        with pytest.raises(ValueError):
            pair.client.open_stream(Proto.TCP, host, 80)
    with pytest.raises(ValueError):
        pair.client.open_stream(Proto.TCP, "10.0.0.1", 65536)
    with pytest.raises(ProtocolError):
        pair.agent.open_stream(Proto.TCP, "10.0.0.1", 80)
    assert pair.client.data_to_send() == b""


def test_tcp_stream_lifecycle(pair: Pair) -> None:
    sid = pair.client.open_stream(Proto.TCP, "db.internal", 5432)
    assert pair.pump() == ([], [StreamRequested(sid, Proto.TCP, "db.internal", 5432)])
    assert pair.agent.open_streams == 1
    pair.agent.accept_stream(sid)
    assert pair.agent.data_to_send() == frame(FrameType.OPENED, sid)
    assert pair.client.receive_data(frame(FrameType.OPENED, sid)) == [StreamOpened(sid)]

    assert pair.client.send_data(sid, b"SELECT 1;") == 9
    assert pair.client.data_to_send() == frame(FrameType.DATA, sid, b"SELECT 1;")
    assert pair.agent.receive_data(frame(FrameType.DATA, sid, b"SELECT 1;")) == [
        DataReceived(sid, b"SELECT 1;")
    ]
    assert pair.agent.send_data(sid, bytearray(b"1 row")) == 5
    assert pair.pump() == ([DataReceived(sid, b"1 row")], [])

    pair.client.send_eof(sid)
    assert pair.client.data_to_send() == frame(FrameType.EOF, sid)
    assert pair.agent.receive_data(frame(FrameType.EOF, sid)) == [StreamEnded(sid)]
    # Half-closed: the agent can still send.
    assert pair.agent.send_data(sid, memoryview(b"bye")) == 3
    pair.agent.send_eof(sid)
    assert pair.agent.receive_data(b"") == [StreamClosed(sid)]
    assert pair.pump() == ([DataReceived(sid, b"bye"), StreamEnded(sid), StreamClosed(sid)], [])
    assert pair.client.open_streams == 0
    assert pair.agent.open_streams == 0
    assert pair.client.receive_data(b"") == []  # StreamClosed is emitted once

    with pytest.raises(ProtocolError):
        pair.client.send_data(sid, b"x")
    with pytest.raises(ProtocolError):
        pair.agent.send_eof(sid)


def test_local_eof_completing_close_is_reported_by_next_receive(pair: Pair) -> None:
    sid = pair.open()
    pair.agent.send_eof(sid)
    assert pair.pump() == ([StreamEnded(sid)], [])
    pair.client.send_eof(sid)
    assert pair.client.open_streams == 0
    # The pending StreamClosed precedes events from newly received bytes.
    pair.agent.ping(b"pingpong")
    assert pair.pump() == (
        [StreamClosed(sid), PingReceived(b"pingpong")],
        [StreamEnded(sid), StreamClosed(sid), PongReceived(b"pingpong")],
    )


def test_send_after_eof_is_an_error(pair: Pair) -> None:
    sid = pair.open()
    pair.client.send_eof(sid)
    with pytest.raises(ProtocolError, match="EOF"):
        pair.client.send_data(sid, b"x")
    with pytest.raises(ProtocolError, match="EOF"):
        pair.client.send_eof(sid)


def test_duplicate_eof_from_peer_is_an_error(pair: Pair) -> None:
    sid = pair.open()
    pair.agent.receive_data(frame(FrameType.EOF, sid))
    with pytest.raises(ProtocolError, match="second EOF"):
        pair.agent.receive_data(frame(FrameType.EOF, sid))


def test_data_after_peer_eof_is_an_error(pair: Pair) -> None:
    sid = pair.open()
    pair.agent.receive_data(frame(FrameType.EOF, sid))
    with pytest.raises(ProtocolError, match="after EOF"):
        pair.agent.receive_data(frame(FrameType.DATA, sid, b"x"))


def test_client_sends_early_data_and_the_agent_may_not(pair: Pair) -> None:
    sid = pair.client.open_stream(Proto.TCP, "10.0.0.9", 22)
    assert pair.client.send_data(sid, b"SSH-2.0") == 7
    pair.client.send_eof(sid)
    events = pair.agent.receive_data(pair.client.data_to_send())
    assert events == [
        StreamRequested(sid, Proto.TCP, "10.0.0.9", 22),
        DataReceived(sid, b"SSH-2.0"),
        StreamEnded(sid),
    ]
    pair.agent.acknowledge(sid, 7)
    with pytest.raises(ProtocolError, match="not open yet"):
        pair.agent.send_data(sid, b"SSH-2.0")
    pair.agent.accept_stream(sid)
    assert pair.agent.send_data(sid, b"hi") == 2


def test_early_data_of_a_failed_open_is_dropped(pair: Pair) -> None:
    sid = pair.client.open_stream(Proto.TCP, "10.0.0.9", 22)
    pair.client.send_data(sid, b"early")
    pair.pump()
    pair.agent.fail_stream(sid, Failure.REFUSED, "refused")
    late = frame(FrameType.DATA, sid, b"late")  # sent before the client learned of it
    assert pair.agent.receive_data(late) == []
    events = pair.client.receive_data(pair.agent.data_to_send())
    assert events == [StreamFailed(sid, Failure.REFUSED, "refused")]
    with pytest.raises(ProtocolError, match="closed or reset"):
        pair.client.send_data(sid, b"more")


@pytest.mark.parametrize("failure", list(Failure))
def test_open_failed(pair: Pair, failure: Failure) -> None:
    sid = pair.client.open_stream(Proto.TCP, "nowhere.invalid", 80)
    pair.pump()
    pair.agent.fail_stream(sid, failure, f"could not connect: {failure.name} ✗")
    message = f"could not connect: {failure.name} ✗"
    assert pair.agent.data_to_send() == frame(
        FrameType.OPEN_FAILED, sid, bytes([failure.value]) + message.encode()
    )
    assert pair.agent.open_streams == 0
    events = pair.client.receive_data(
        frame(FrameType.OPEN_FAILED, sid, bytes([failure.value]) + message.encode())
    )
    assert events == [StreamFailed(sid, failure, message)]
    assert pair.client.open_streams == 0
    with pytest.raises(ProtocolError, match="closed or reset"):
        pair.client.send_data(sid, b"x")
    # A late OPENED (impossible from a correct agent, but harmless) is ignored.
    assert pair.client.receive_data(frame(FrameType.OPENED, sid)) == []


def test_open_failed_codes_on_the_wire() -> None:
    assert [int(f) for f in Failure] == [1, 2, 3, 4, 5, 6]
    assert [f.name for f in Failure] == [
        "REFUSED",
        "TIMEOUT",
        "UNREACHABLE",
        "NOT_FOUND",
        "RESET",
        "OTHER",
    ]


def test_unknown_failure_code_maps_to_other(pair: Pair) -> None:
    sid = pair.client.open_stream(Proto.TCP, "10.0.0.1", 80)
    pair.pump()
    assert pair.client.receive_data(frame(FrameType.OPEN_FAILED, sid, b"\xc8")) == [
        StreamFailed(sid, Failure.OTHER, "")
    ]


def test_client_reset_with_late_frames_from_agent(pair: Pair) -> None:
    sid = pair.open()
    other = pair.open()
    # The agent sends before it learns about the reset.
    assert pair.agent.send_data(sid, b"late data") == 9
    pair.agent.send_eof(sid)
    pair.client.reset_stream(sid, Failure.TIMEOUT)
    assert pair.client.data_to_send() == frame(FrameType.RESET, sid, b"\x02")
    assert pair.client.open_streams == 1
    assert pair.agent.receive_data(frame(FrameType.RESET, sid, b"\x02")) == [
        StreamReset(sid, Failure.TIMEOUT)
    ]
    assert pair.to_client() == []  # DATA + EOF for the reset stream are dropped silently
    late = (
        frame(FrameType.DATA, sid, b"more")
        + frame(FrameType.WINDOW, sid, struct.pack("!I", 100))
        + frame(FrameType.EOF, sid)
        + frame(FrameType.RESET, sid, b"\x05")
    )
    assert pair.client.receive_data(late) == []
    assert pair.agent.receive_data(late.replace(b"\x05", b"\x01")) == []
    # The other stream is unaffected.
    pair.agent.send_data(other, b"fine")
    assert pair.pump() == ([DataReceived(other, b"fine")], [])
    # Sending after a reset is a caller bug; resetting again is a harmless no-op.
    with pytest.raises(ProtocolError, match="closed or reset"):
        pair.client.send_data(sid, b"x")
    with pytest.raises(ProtocolError, match="closed or reset"):
        pair.agent.send_data(sid, b"x")
    pair.client.reset_stream(sid)
    pair.agent.reset_stream(sid)
    assert pair.pump() == ([], [])
    # Acknowledging data of a dead stream is ignored too.
    pair.client.acknowledge(sid, 9)


def test_agent_reset(pair: Pair) -> None:
    sid = pair.open()
    pair.client.send_data(sid, b"request")
    pair.agent.reset_stream(sid)
    reset = pair.agent.data_to_send()
    assert reset == frame(FrameType.RESET, sid, b"\x05")
    assert pair.to_agent() == []  # the DATA that crossed the RESET is dropped
    assert pair.client.receive_data(reset) == [StreamReset(sid, Failure.RESET)]
    assert pair.client.open_streams == pair.agent.open_streams == 0


def test_reset_of_pending_stream_races_with_accept(pair: Pair) -> None:
    sid = pair.client.open_stream(Proto.TCP, "slow.example", 443)
    pair.pump()
    pair.client.reset_stream(sid)
    assert pair.pump() == ([], [StreamReset(sid, Failure.RESET)])
    # The agent's connect finishes after the reset arrived: accept/fail are no-ops.
    pair.agent.accept_stream(sid)
    pair.agent.fail_stream(sid, Failure.TIMEOUT)
    assert pair.agent.data_to_send() == b""
    # And an OPENED that crossed the RESET is ignored by the client.
    assert pair.client.receive_data(frame(FrameType.OPENED, sid)) == []


@pytest.mark.parametrize(
    "data",
    [
        frame(FrameType.DATA, 2, b"x"),  # even ids are never used
        frame(FrameType.DATA, 5, b"x"),  # beyond the highest id opened
        frame(FrameType.WINDOW, 7, struct.pack("!I", 1)),
        frame(FrameType.EOF, 0),
        frame(FrameType.RESET, 9, b"\x01"),
        frame(FrameType.OPENED, 5),
    ],
)
def test_frames_for_never_opened_streams_are_errors(pair: Pair, data: bytes) -> None:
    pair.open()
    with pytest.raises(ProtocolError, match="never opened"):
        pair.client.receive_data(data)


def test_stream_id_reuse_is_an_error(pair: Pair) -> None:
    sid = pair.open()
    pair.client.reset_stream(sid)
    pair.pump()
    with pytest.raises(ProtocolError, match="stream id"):
        pair.agent.receive_data(frame(FrameType.OPEN, sid, b"\x06\x00\x50\x01h"))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x06\x00\x50\x02h",
        b"\x07\x00\x50\x01h",
        b"\x06\x00\x50\x00",
        b"\x06\x00",
        b"\x11\x00\x35\x01\x00",
    ],
)
def test_malformed_open_is_an_error(pair: Pair, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="OPEN"):
        pair.agent.receive_data(frame(FrameType.OPEN, 1, payload))


def test_unknown_and_misdirected_frames_are_errors(pair: Pair) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type 99"):
        pair.agent.receive_data(frame(99, 0))
    other = Pair()
    other.handshake()
    with pytest.raises(ProtocolError, match="unexpected OPEN frame for a client"):
        other.client.receive_data(frame(FrameType.OPEN, 1, b"\x06\x00\x50\x01h"))
    third = Pair()
    third.handshake()
    with pytest.raises(ProtocolError, match="unexpected HELLO"):
        third.agent.receive_data(frame(FrameType.HELLO, 0, b"CMTN\x00\x01" + bytes(16)))


def test_oversized_frame_is_rejected_from_its_header(pair: Pair) -> None:
    header = HEADER.pack(FrameType.DATA, 1, MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        pair.agent.receive_data(header)  # no payload needed to detect it
    assert frames(pair.agent.data_to_send())[0][0] == FrameType.REJECT
    with pytest.raises(ProtocolError):
        pair.agent.receive_data(b"")  # errors are sticky


def test_large_data_is_split_and_reassembled(pair: Pair) -> None:
    sid = pair.open()
    data = payload_bytes(1, 2 * MAX_PAYLOAD + 1234)
    assert pair.client.send_data(sid, data) == len(data)
    wire = pair.client.data_to_send()
    assert [(t, s, len(p)) for t, s, p in frames(wire)] == [
        (FrameType.DATA, sid, MAX_PAYLOAD),
        (FrameType.DATA, sid, MAX_PAYLOAD),
        (FrameType.DATA, sid, 1234),
    ]
    events = pair.agent.receive_data(wire)
    assert events == [
        DataReceived(sid, data[:MAX_PAYLOAD]),
        DataReceived(sid, data[MAX_PAYLOAD : 2 * MAX_PAYLOAD]),
        DataReceived(sid, data[2 * MAX_PAYLOAD :]),
    ]


def test_send_data_copies_mutable_buffers(pair: Pair) -> None:
    sid = pair.open()
    buf = bytearray(b"original")
    assert pair.client.send_data(sid, memoryview(buf)) == 8
    buf[:] = b"mutated!"
    assert pair.pump() == ([], [DataReceived(sid, b"original")])


# --------------------------------------------------------------------------- flow control


def test_sender_stops_at_window_and_resumes_after_acknowledge() -> None:
    p = Pair(initial_window=1000)
    p.handshake()
    sid = p.open()
    data = payload_bytes(2, 2500)
    assert p.client.send_window(sid) == 1000
    assert p.client.send_data(sid, data) == 1000
    assert p.client.send_window(sid) == 0
    assert p.client.send_data(sid, data[1000:]) == 0
    assert p.pump() == ([], [DataReceived(sid, data[:1000])])

    p.agent.acknowledge(sid, 499)
    assert p.agent.data_to_send() == b""  # below half the window: no WINDOW yet
    p.agent.acknowledge(sid, 1)
    assert p.agent.data_to_send() == frame(FrameType.WINDOW, sid, struct.pack("!I", 500))
    assert p.client.receive_data(frame(FrameType.WINDOW, sid, struct.pack("!I", 500))) == [
        WindowUpdated(sid)
    ]
    assert p.client.send_window(sid) == 500
    assert p.client.send_data(sid, data[1000:]) == 500
    p.agent.acknowledge(sid, 500)
    assert p.pump() == ([WindowUpdated(sid)], [DataReceived(sid, data[1000:1500])])
    assert p.client.send_window(sid) == 500
    p.agent.acknowledge(sid, 500)
    assert p.pump() == ([WindowUpdated(sid)], [])
    assert p.client.send_window(sid) == 1000
    with pytest.raises(ProtocolError, match="acknowledged"):
        p.agent.acknowledge(sid, 1)


def test_window_frames_are_rare_under_bulk_transfer(pair: Pair) -> None:
    sid = pair.open()
    windows = 0
    for _ in range(64):
        pair.client.send_data(sid, bytes(MAX_PAYLOAD))
        for event in pair.to_agent():
            assert isinstance(event, DataReceived)
            pair.agent.acknowledge(sid, len(event.data))
        windows += len(pair.to_client())
    # 16 MiB with a 1 MiB window granted in halves: one WINDOW per 512 KiB.
    assert windows == 32


def test_stalled_stream_does_not_block_another() -> None:
    p = Pair()
    p.handshake()
    stalled = p.open()
    busy = p.open(port=81)
    assert p.client.send_data(stalled, bytes(3 * INITIAL_WINDOW)) == INITIAL_WINDOW
    _, agent_events = p.pump()
    assert sum(len(e.data) for e in agent_events if isinstance(e, DataReceived)) == INITIAL_WINDOW
    # Nothing on `stalled` is ever acknowledged.

    data = payload_bytes(3, 10 * 1024 * 1024)
    view = memoryview(data)
    sent = 0
    received = bytearray()
    for _ in range(10_000):
        if len(received) == len(data):
            break
        if sent < len(data):
            sent += p.client.send_data(busy, view[sent : sent + 256 * 1024])
        for event in p.to_agent():
            assert isinstance(event, DataReceived)
            assert event.stream_id == busy
            received += event.data
            p.agent.acknowledge(busy, len(event.data))
        assert set(p.to_client()) <= {WindowUpdated(busy)}
    assert bytes(received) == data
    assert p.client.send_window(stalled) == 0
    assert p.client.send_data(stalled, b"more") == 0


def test_flow_control_violation_is_an_error() -> None:
    p = Pair(initial_window=1000)
    p.handshake()
    sid = p.open()
    assert p.agent.receive_data(frame(FrameType.DATA, sid, bytes(600))) == [
        DataReceived(sid, bytes(600))
    ]
    with pytest.raises(ProtocolError, match="flow control violation"):
        p.agent.receive_data(frame(FrameType.DATA, sid, bytes(401)))
    ((ftype, _, reason),) = frames(p.agent.data_to_send())
    assert ftype == FrameType.REJECT
    assert b"flow control violation" in reason


def test_bad_window_frames_are_errors(pair: Pair) -> None:
    sid = pair.open()
    udp = pair.open(Proto.UDP, port=53)
    for data in (
        frame(FrameType.WINDOW, sid, struct.pack("!I", 0)),
        frame(FrameType.WINDOW, sid, b"\x00\x01"),
        frame(FrameType.WINDOW, sid, struct.pack("!I", 0xFFFFFFFF)),
        frame(FrameType.WINDOW, udp, struct.pack("!I", 10)),
    ):
        p = copy.deepcopy(pair)
        with pytest.raises(ProtocolError, match="WINDOW"):
            p.client.receive_data(data)


# --------------------------------------------------------------------------- UDP, DNS, ping


def test_udp_datagram_boundaries(pair: Pair) -> None:
    sid = pair.open(Proto.UDP, "10.96.0.10", 53)
    assert pair.client.send_window(sid) == UDP_WINDOW
    datagrams = [b"a", b"", payload_bytes(4, 65507), b"bc", bytes(MAX_PAYLOAD)]
    for datagram in datagrams:
        assert pair.client.send_data(sid, datagram) == len(datagram)
    assert pair.client.send_window(sid) == UDP_WINDOW
    wire = pair.client.data_to_send()
    assert [len(p) for _, _, p in frames(wire)] == [len(d) for d in datagrams]
    assert pair.agent.receive_data(wire) == [DataReceived(sid, d) for d in datagrams]
    for datagram in reversed(datagrams):
        pair.agent.send_data(sid, datagram)
    assert pair.pump() == ([DataReceived(sid, d) for d in reversed(datagrams)], [])
    with pytest.raises(ValueError, match="datagram"):
        pair.client.send_data(sid, bytes(MAX_PAYLOAD + 1))
    pair.agent.acknowledge(sid, 10)  # no flow control on UDP: a no-op
    assert pair.agent.data_to_send() == b""


def test_dns_round_trip(pair: Pair) -> None:
    queries = {0: b"query-zero", 7: b"query-seven", 0xFFFFFFFF: b"query-max"}
    for query_id, payload in queries.items():
        pair.client.send_dns_query(query_id, payload)
    assert pair.client.data_to_send() == b"".join(
        frame(FrameType.DNS_QUERY, qid, p) for qid, p in queries.items()
    )
    for query_id, payload in queries.items():
        pair.client.send_dns_query(query_id, payload)
    assert pair.pump() == ([], [DnsQueryReceived(q, p) for q, p in queries.items()])
    # Answers may come back in any order.
    for query_id in (0xFFFFFFFF, 0, 7):
        pair.agent.send_dns_answer(query_id, queries[query_id].upper())
    assert pair.pump() == (
        [
            DnsAnswerReceived(0xFFFFFFFF, b"QUERY-MAX"),
            DnsAnswerReceived(0, b"QUERY-ZERO"),
            DnsAnswerReceived(7, b"QUERY-SEVEN"),
        ],
        [],
    )
    with pytest.raises(ProtocolError):
        pair.agent.send_dns_query(1, b"q")
    with pytest.raises(ProtocolError):
        pair.client.send_dns_answer(1, b"a")
    with pytest.raises(ValueError):
        pair.client.send_dns_query(2**32, b"q")


def test_ping_is_answered_automatically(pair: Pair) -> None:
    pair.client.ping(b"12345678")
    assert pair.client.data_to_send() == frame(FrameType.PING, 0, b"12345678")
    assert pair.agent.receive_data(frame(FrameType.PING, 0, b"12345678")) == [
        PingReceived(b"12345678")
    ]
    assert pair.agent.data_to_send() == frame(FrameType.PONG, 0, b"12345678")
    pair.agent.ping()
    assert pair.pump() == ([PingReceived(bytes(8))], [PongReceived(bytes(8))])
    with pytest.raises(ValueError):
        pair.client.ping(b"short")
    with pytest.raises(ProtocolError, match="PING"):
        pair.client.receive_data(frame(FrameType.PING, 0, b"1234567"))


# --------------------------------------------------------------------------- chunking


def scripted_session(chunk: int | None) -> tuple[list[Event], list[Event]]:
    """A session touching every frame type; returns all events of each side."""
    p = Pair(chunk=chunk, initial_window=300_000)
    client_events: list[Event] = []
    agent_events: list[Event] = []

    def step() -> None:
        c, a = p.pump()
        client_events.extend(c)
        agent_events.extend(a)

    p.agent.initiate()
    step()
    tcp = p.client.open_stream(Proto.TCP, "api.default.svc", 8080)
    udp = p.client.open_stream(Proto.UDP, "10.96.0.10", 53)
    failed = p.client.open_stream(Proto.TCP, "gone", 1)
    step()
    p.agent.accept_stream(tcp)
    p.agent.accept_stream(udp)
    p.agent.fail_stream(failed, Failure.NOT_FOUND, "no such host")
    step()
    p.client.send_data(tcp, payload_bytes(5, MAX_PAYLOAD + 20_000))
    p.client.send_data(udp, b"datagram-1")
    p.client.send_data(udp, b"")
    p.client.send_dns_query(42, b"dns?")
    p.client.ping(b"abcdefgh")
    step()
    p.agent.acknowledge(tcp, MAX_PAYLOAD + 20_000)
    p.agent.send_data(tcp, b"response")
    p.agent.send_dns_answer(42, b"dns!")
    p.agent.send_eof(tcp)
    p.agent.reset_stream(udp, Failure.UNREACHABLE)
    step()
    p.client.send_eof(tcp)
    step()
    client_events.extend(p.client.receive_data(b""))
    agent_events.extend(p.agent.receive_data(b""))
    return client_events, agent_events


def test_scripted_session_events() -> None:
    client_events, agent_events = scripted_session(None)
    tcp_data = payload_bytes(5, MAX_PAYLOAD + 20_000)
    assert client_events == [
        Authenticated(),
        StreamOpened(1),
        StreamOpened(3),
        StreamFailed(5, Failure.NOT_FOUND, "no such host"),
        PongReceived(b"abcdefgh"),
        WindowUpdated(1),
        DataReceived(1, b"response"),
        DnsAnswerReceived(42, b"dns!"),
        StreamEnded(1),
        StreamReset(3, Failure.UNREACHABLE),
        StreamClosed(1),
    ]
    assert agent_events == [
        Authenticated(),
        StreamRequested(1, Proto.TCP, "api.default.svc", 8080),
        StreamRequested(3, Proto.UDP, "10.96.0.10", 53),
        StreamRequested(5, Proto.TCP, "gone", 1),
        DataReceived(1, tcp_data[:MAX_PAYLOAD]),
        DataReceived(1, tcp_data[MAX_PAYLOAD:]),
        DataReceived(3, b"datagram-1"),
        DataReceived(3, b""),
        DnsQueryReceived(42, b"dns?"),
        PingReceived(b"abcdefgh"),
        StreamEnded(1),
        StreamClosed(1),
    ]


@pytest.mark.parametrize("chunk", [1, 2, 7, 9, 4096])
def test_bytes_fed_in_small_pieces_give_the_same_events(chunk: int) -> None:
    assert scripted_session(chunk) == scripted_session(None)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_split_points_do_not_matter(cuts: list[int]) -> None:
    p = Pair(initial_window=5000)
    p.handshake()
    tcp = p.open()
    udp = p.open(Proto.UDP, port=53)
    p.client.send_data(tcp, payload_bytes(6, 4000))
    p.client.send_data(udp, b"one")
    p.client.send_data(udp, b"")
    p.client.send_dns_query(3, b"query")
    p.client.ping(b"01234567")
    p.client.send_eof(tcp)
    p.client.reset_stream(udp)
    blob = p.client.data_to_send()

    twin = copy.deepcopy(p.agent)
    whole = p.agent.receive_data(blob)
    pieces: list[Event] = []
    prev = 0
    for cut in [*sorted({c % (len(blob) + 1) for c in cuts}), len(blob)]:
        pieces += twin.receive_data(blob[prev:cut])
        prev = cut
    assert pieces == whole
    assert twin.data_to_send() == p.agent.data_to_send()
    assert whole == [
        DataReceived(tcp, payload_bytes(6, 4000)),
        DataReceived(udp, b"one"),
        DataReceived(udp, b""),
        DnsQueryReceived(3, b"query"),
        PingReceived(b"01234567"),
        StreamEnded(tcp),
        StreamReset(udp, Failure.RESET),
    ]


# --------------------------------------------------------------------------- property tests


@dataclass(frozen=True)
class Op:
    """One random operation; each kind uses only the fields it needs."""

    kind: str
    side: str
    index: int
    size: int
    proto: Proto
    ready: bool
    failure: Failure
    query_id: int
    blob: bytes


# Weighted so that data flows in most examples: sends dominate, opens come next.
KINDS = ["send"] * 8 + ["open"] * 3 + ["deliver"] * 3 + ["ack"] * 2
KINDS += ["accept", "fail", "eof", "eof", "reset", "dns", "ping"]
OPERATIONS = st.builds(
    Op,
    kind=st.sampled_from(KINDS),
    side=st.sampled_from(["client", "agent"]),
    index=st.integers(min_value=0, max_value=7),
    size=st.integers(min_value=0, max_value=3000),
    proto=st.sampled_from([Proto.TCP, Proto.UDP]),
    ready=st.booleans(),
    failure=st.sampled_from(list(Failure)),
    query_id=st.integers(min_value=0, max_value=2**32 - 1),
    blob=st.binary(min_size=8, max_size=8),
)


@dataclass
class View:
    """What one side knows about a stream, from its own calls and its events."""

    udp: bool
    opened: bool = False
    eof_sent: bool = False
    eof_received: bool = False


@dataclass
class Model:
    pair: Pair
    views: dict[str, dict[int, View]] = field(default_factory=lambda: {"client": {}, "agent": {}})
    seen_by_agent: set[int] = field(default_factory=set)
    udp: set[int] = field(default_factory=set)
    reset: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    sent: dict[tuple[str, int], list[bytes]] = field(default_factory=dict)
    received: dict[tuple[str, int], list[bytes]] = field(default_factory=dict)
    unacked: dict[str, dict[int, int]] = field(default_factory=lambda: {"client": {}, "agent": {}})
    closed: dict[str, list[int]] = field(default_factory=lambda: {"client": [], "agent": []})
    queries: list[tuple[int, bytes]] = field(default_factory=list)
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    pings: dict[str, list[bytes]] = field(default_factory=lambda: {"client": [], "agent": []})
    pongs: dict[str, list[bytes]] = field(default_factory=lambda: {"client": [], "agent": []})
    counter: int = 0

    def conn(self, side: str) -> Connection:
        return self.pair.client if side == "client" else self.pair.agent

    def handle(self, side: str, events: list[Event]) -> None:
        view = self.views[side]
        peer = "agent" if side == "client" else "client"
        for event in events:
            assert isinstance(event, EVENT_TYPES)
            if isinstance(event, StreamRequested):
                assert side == "agent"
                view[event.stream_id] = View(udp=event.proto is Proto.UDP)
                self.seen_by_agent.add(event.stream_id)
            elif isinstance(event, StreamOpened):
                assert side == "client"
                assert not view[event.stream_id].opened
                view[event.stream_id].opened = True
            elif isinstance(event, StreamFailed):
                assert side == "client"
                assert not view.pop(event.stream_id).opened
                self.failed.add(event.stream_id)
            elif isinstance(event, DataReceived):
                stream = view[event.stream_id]
                # The client may send before OPENED (early data); the agent may not.
                assert (stream.opened or side == "agent") and not stream.eof_received
                self.received.setdefault((side, event.stream_id), []).append(event.data)
                if not stream.udp:
                    assert event.data
                    acks = self.unacked[side]
                    acks[event.stream_id] = acks.get(event.stream_id, 0) + len(event.data)
            elif isinstance(event, WindowUpdated):
                assert not view[event.stream_id].udp
            elif isinstance(event, StreamEnded):
                assert not view[event.stream_id].eof_received
                view[event.stream_id].eof_received = True
            elif isinstance(event, StreamClosed):
                stream = view.pop(event.stream_id)
                assert stream.eof_sent and stream.eof_received
                self.closed[side].append(event.stream_id)
            elif isinstance(event, StreamReset):
                view.pop(event.stream_id)
                self.reset.add(event.stream_id)
            elif isinstance(event, DnsQueryReceived):
                assert side == "agent"
                self.queries.append((event.query_id, event.payload))
                self.pair.agent.send_dns_answer(event.query_id, event.payload[::-1])
            elif isinstance(event, DnsAnswerReceived):
                assert side == "client"
                self.answers.append((event.query_id, event.payload))
            elif isinstance(event, PingReceived):
                self.pings[side].append(event.opaque)
            elif isinstance(event, PongReceived):
                self.pongs[side].append(event.opaque)
            else:
                raise AssertionError(f"unexpected event {event!r} on {side} (peer {peer})")

    def deliver(self, side: str) -> bool:
        """Deliver everything `side` has queued to its peer; return whether there was any."""
        peer = "agent" if side == "client" else "client"
        data = self.conn(side).data_to_send()
        self.handle(peer, self.conn(peer).receive_data(data))
        return bool(data)

    def acknowledge(self, side: str) -> None:
        for stream_id, nbytes in self.unacked[side].items():
            self.conn(side).acknowledge(stream_id, nbytes)
        self.unacked[side].clear()

    def expect_error(self, call: Any, *args: Any) -> None:
        with pytest.raises(ProtocolError):
            call(*args)

    def apply(self, op: Op, stream_ids: list[int]) -> None:
        kind = op.kind
        client, agent = self.pair.client, self.pair.agent
        if kind == "open":
            sid = client.open_stream(op.proto, "svc.example", 8000)
            stream_ids.append(sid)
            self.views["client"][sid] = View(udp=op.proto is Proto.UDP)
            if op.proto is Proto.UDP:
                self.udp.add(sid)
            if op.ready:
                self.deliver("client")
                if sid in self.views["agent"]:
                    agent.accept_stream(sid)
                    self.views["agent"][sid].opened = True
                self.deliver("agent")
            return
        if kind == "ack":
            self.acknowledge(op.side)
            return
        if kind == "deliver":
            self.deliver(op.side)
            return
        if kind == "dns":
            client.send_dns_query(op.query_id, op.blob)
            return
        if kind == "ping":
            self.conn(op.side).ping(op.blob)
            self.pings.setdefault("sent-" + op.side, []).append(op.blob)
            return
        if not stream_ids:
            return
        if kind in ("accept", "fail"):
            sid = stream_ids[op.index % len(stream_ids)]
            failure = op.failure
            view = self.views["agent"].get(sid)
            if view is None:
                if sid in self.seen_by_agent:  # gone already: a no-op
                    agent.accept_stream(sid)
                    agent.fail_stream(sid, failure)
                else:
                    self.expect_error(agent.accept_stream, sid)
                    self.expect_error(agent.fail_stream, sid, failure)
            elif view.opened:
                self.expect_error(agent.accept_stream, sid)
                self.expect_error(agent.fail_stream, sid, failure)
            elif kind == "accept":
                agent.accept_stream(sid)
                view.opened = True
            else:
                agent.fail_stream(sid, failure, "failed")
                del self.views["agent"][sid]
                self.failed.add(sid)
            return
        side = op.side
        conn = self.conn(side)
        sid = stream_ids[op.index % len(stream_ids)]
        view = self.views[side].get(sid)
        known = side == "client" or sid in self.seen_by_agent
        if kind == "reset":
            if view is not None:
                conn.reset_stream(sid)
                del self.views[side][sid]
                self.reset.add(sid)
            elif known:
                conn.reset_stream(sid)  # idempotent
            else:
                self.expect_error(conn.reset_stream, sid)
            return
        # The client may send as soon as it opened a stream (early data); the agent once it
        # accepted it.
        usable = view is not None and (view.opened or side == "client") and not view.eof_sent
        if kind == "send":
            size = op.size
            self.counter += 1
            data = payload_bytes(self.counter, size)
            if not usable:
                self.expect_error(conn.send_data, sid, data)
                return
            assert view is not None
            window = conn.send_window(sid)
            taken = conn.send_data(sid, data)
            if view.udp:
                assert window == UDP_WINDOW
                assert taken == size
            else:
                assert taken == min(size, window)
                assert conn.send_window(sid) == window - taken
            if taken or view.udp:
                self.sent.setdefault((side, sid), []).append(data[:taken])
            return
        if kind == "eof":
            if not usable:
                self.expect_error(conn.send_eof, sid)
                return
            assert view is not None
            conn.send_eof(sid)
            view.eof_sent = True
            if view.eof_received:
                # The close completed locally; the next receive_data reports it.
                self.handle(side, conn.receive_data(b""))
                assert sid not in self.views[side]
            return
        raise AssertionError(op)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.lists(OPERATIONS, min_size=3, max_size=80),
    initial_window=st.sampled_from([1, 10, 1000, 65536]),
)
def test_random_operations_round_trip(ops: list[Op], initial_window: int) -> None:
    pair = Pair(initial_window=initial_window)
    pair.handshake()
    model = Model(pair)
    stream_ids: list[int] = []
    # Start with one usable stream so that sends early in the list do something.
    model.apply(replace(ops[0], kind="open", ready=True), stream_ids)
    for op in ops:
        model.apply(op, stream_ids)
    for _ in range(10_000):
        model.acknowledge("client")
        model.acknowledge("agent")
        moved = model.deliver("client")
        if not model.deliver("agent") and not moved:
            break
    else:
        raise AssertionError("did not settle")

    for side in ("client", "agent"):
        peer = "agent" if side == "client" else "client"
        assert model.conn(side).open_streams == len(model.views[side])
        assert len(model.closed[side]) == len(set(model.closed[side]))
        for sid, view in model.views[side].items():
            window = model.conn(side).send_window(sid)
            assert (window == UDP_WINDOW) if view.udp else (0 <= window <= initial_window)
            # A stream with EOF both ways must have been closed and forgotten.
            assert not (view.eof_sent and view.eof_received)
        for sid in stream_ids:
            sent = model.sent.get((side, sid), [])
            got = model.received.get((peer, sid), [])
            if sid in model.udp:
                # Datagram boundaries survive; a reset may cut the tail off.
                assert got == sent[: len(got)]
                if sid not in model.reset | model.failed:
                    assert got == sent
            else:
                sent_bytes, got_bytes = b"".join(sent), b"".join(got)
                assert sent_bytes.startswith(got_bytes)
                if sid not in model.reset | model.failed:
                    assert got_bytes == sent_bytes
        assert model.pongs[side] == model.pings.get("sent-" + side, [])
        assert model.pings[peer] == model.pings.get("sent-" + side, [])
    assert model.answers == [(q, p[::-1]) for q, p in model.queries]


def _authenticated_pair(with_streams: bool) -> Pair:
    p = Pair(initial_window=2000)
    p.handshake()
    if with_streams:
        p.open()
        p.open(Proto.UDP, port=53)
        p.client.open_stream(Proto.TCP, "pending", 1)
        p.pump()
    return p


def _fuzz_target(stage: str) -> Connection:
    if stage == "client-fresh":
        return Connection(Role.CLIENT, KEY)
    if stage == "agent-initiated":
        agent = Connection(Role.AGENT, KEY)
        agent.initiate()
        return agent
    if stage == "agent-fresh":
        return Connection(Role.AGENT, KEY)
    p = _authenticated_pair(with_streams=stage.endswith("streams"))
    return p.client if stage.startswith("client") else p.agent


STAGES = st.sampled_from(
    [
        "client-fresh",
        "agent-fresh",
        "agent-initiated",
        "client-authenticated",
        "agent-authenticated",
        "client-streams",
        "agent-streams",
    ]
)


def _feed_fuzz(conn: Connection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except ProtocolError:
            continue
        assert all(isinstance(event, EVENT_TYPES) for event in events)
    conn.data_to_send()


@settings(max_examples=300, deadline=None)
@given(stage=STAGES, chunks=st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_arbitrary_bytes(stage: str, chunks: list[bytes]) -> None:
    _feed_fuzz(_fuzz_target(stage), chunks)


FRAME_TYPES = st.sampled_from([int(t) for t in FrameType] + [0, 5, 99, 255])
STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 0xFFFFFFFF])
FUZZ_PAYLOADS = st.one_of(
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"\x06\x00\x50\x01h",
            b"\x11\x00\x35\x09localhost",
            b"\x00\x00\x00\x01",
            b"\xff\xff\xff\xff",
            b"\x01",
            b"\x05",
            b"CMTN\x00\x01" + bytes(16),
            bytes(8),
            bytes(50),
            bytes(32),
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    stage=STAGES,
    parts=st.lists(st.tuples(FRAME_TYPES, STREAM_IDS, FUZZ_PAYLOADS), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=5),
)
def test_fuzz_well_framed_garbage(
    stage: str, parts: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    blob = b"".join(frame(t, s, p) for t, s, p in parts)
    points = [*sorted({c % (len(blob) + 1) for c in cuts}), len(blob)]
    chunks = [blob[a:b] for a, b in zip([0, *points], points, strict=False)]
    _feed_fuzz(_fuzz_target(stage), chunks)
