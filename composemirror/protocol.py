"""Sans-IO wire protocol of the sidecar-agent tunnel: framing, handshake, streams, flow control.

Owns the byte format of the one long-lived connection, the mutual HMAC handshake, the per-stream
state machines and TCP flow-control accounting, for both the CLIENT (sidecar) and AGENT ends.
It must not do I/O: no sockets, no asyncio, no threads, no clocks. Callers feed received bytes to
`Connection.receive_data`, act on the returned events, and write out `Connection.data_to_send`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "INITIAL_WINDOW",
    "KEY_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "UDP_WINDOW",
    "Authenticated",
    "Connection",
    "DataReceived",
    "DnsAnswerReceived",
    "DnsQueryReceived",
    "Event",
    "Failure",
    "FrameType",
    "LocalProtocolError",
    "PingReceived",
    "PongReceived",
    "Proto",
    "ProtocolError",
    "Rejected",
    "RemoteProtocolError",
    "Role",
    "StreamClosed",
    "StreamEnded",
    "StreamFailed",
    "StreamOpened",
    "StreamRequested",
    "StreamReset",
    "WindowUpdated",
    "key_from_text",
    "key_to_text",
    "new_key",
]

# Frame header: type (u8), stream id (u32), payload length (u32).
HEADER: Final = struct.Struct("!BII")
HEADER_SIZE: Final = HEADER.size
MAX_PAYLOAD: Final = 256 * 1024
INITIAL_WINDOW: Final = 1024 * 1024
PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"CMTN"
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 16
MAC_SIZE: Final = 32
# What send_window() reports for UDP streams, which have no flow control.
UDP_WINDOW: Final = 0xFFFFFFFF

_MAX_U32: Final = 0xFFFFFFFF
# Keeps credit arithmetic far from the u32 limit of the WINDOW field.
_MAX_INITIAL_WINDOW: Final = 0x7FFFFFFF
_PING_SIZE: Final = 8
_DEFAULT_PING: Final = b"\x00" * _PING_SIZE

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_OPEN_HEAD: Final = struct.Struct("!BHB")
_HELLO: Final = struct.Struct(f"!4sH{NONCE_SIZE}s")
_AUTH: Final = struct.Struct(f"!H{NONCE_SIZE}s{MAC_SIZE}s")


class ProtocolError(Exception):
    """Base of the tunnel protocol's errors; catch it to end a connection for either reason.

    ProtocolError
    ├── LocalProtocolError     this end's caller misused the Connection (a bug here)
    └── RemoteProtocolError    the peer sent something invalid, failed authentication or
                               is not a composemirror peer; a REJECT naming it is queued
    """


class LocalProtocolError(ProtocolError):
    """The caller used the Connection wrongly: wrong role, wrong state, unknown stream."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection is failed and every later call raises."""


class Role(enum.Enum):
    """Which end of the connection a `Connection` plays."""

    CLIENT = "client"
    AGENT = "agent"


class Proto(enum.IntEnum):
    """Transport of a tunnelled stream (IP protocol numbers)."""

    TCP = 6
    UDP = 17


class Failure(enum.IntEnum):
    """Why a stream could not be opened or was aborted."""

    REFUSED = 1
    TIMEOUT = 2
    UNREACHABLE = 3
    NOT_FOUND = 4
    RESET = 5
    OTHER = 6


class FrameType(enum.IntEnum):
    """Frame type byte of the header."""

    HELLO = 1
    AUTH = 2
    WELCOME = 3
    REJECT = 4
    OPEN = 16
    OPENED = 17
    OPEN_FAILED = 18
    DATA = 32
    WINDOW = 33
    EOF = 34
    RESET = 35
    DNS_QUERY = 48
    DNS_ANSWER = 49
    PING = 64
    PONG = 65


# Plain ints for the per-frame dispatch: enum attribute access is measurably slower.
_T_HELLO: Final = 1
_T_AUTH: Final = 2
_T_WELCOME: Final = 3
_T_REJECT: Final = 4
_T_OPEN: Final = 16
_T_OPENED: Final = 17
_T_OPEN_FAILED: Final = 18
_T_DATA: Final = 32
_T_WINDOW: Final = 33
_T_EOF: Final = 34
_T_RESET: Final = 35
_T_DNS_QUERY: Final = 48
_T_DNS_ANSWER: Final = 49
_T_PING: Final = 64
_T_PONG: Final = 65

_FRAME_NAMES: Final = {int(t): t.name for t in FrameType}
_FAILURES: Final = {int(f): f for f in Failure}
_PROTOS: Final = {int(p): p for p in Proto}
# Printable ASCII without space: enough for hostnames, IPv4 and IPv6 literals (with zone ids),
# and it keeps NULs and control characters away from the agent's resolver.
_HOST_BYTES: Final = bytes(range(0x21, 0x7F))


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The peer proved it holds the shared key; streams may now be used."""


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """(Agent) the client asks for a connection to host:port; answer with accept or fail."""

    stream_id: int
    proto: Proto
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """(Client) the agent connected the stream; data may flow."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """(Client) the agent could not open the stream; it is forgotten."""

    stream_id: int
    failure: Failure
    message: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream (for UDP: exactly one datagram). TCP data must be acknowledged."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more send credit on a TCP stream: retry pending send_data."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent EOF: it will send no more data on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream in both directions; it is forgotten."""

    stream_id: int
    failure: Failure


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both directions sent EOF; the stream is forgotten."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DnsQueryReceived:
    """(Agent) a raw DNS query to resolve; answer with send_dns_answer(query_id, ...)."""

    query_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class DnsAnswerReceived:
    """(Client) the raw DNS answer for a query id."""

    query_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the PONG is already queued."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered one of our pings."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """The peer refused or ended the connection; nothing more will be received."""

    reason: str


Event: TypeAlias = (
    Authenticated
    | StreamRequested
    | StreamOpened
    | StreamFailed
    | DataReceived
    | WindowUpdated
    | StreamEnded
    | StreamReset
    | StreamClosed
    | DnsQueryReceived
    | DnsAnswerReceived
    | PingReceived
    | PongReceived
    | Rejected
)


def new_key() -> bytes:
    """Return a fresh random shared key of KEY_SIZE bytes."""
    return secrets.token_bytes(KEY_SIZE)


def key_to_text(key: bytes) -> str:
    """Return the key as lowercase hex, for environment variables and secrets."""
    return key.hex()


def key_from_text(text: str) -> bytes:
    """Parse a hex key (surrounding whitespace ignored); raise ValueError if it is not one."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ValueError("tunnel key must be hexadecimal text") from exc
    if not key:
        raise ValueError("tunnel key is empty")
    return key


class _State(enum.Enum):
    IDLE = enum.auto()  # agent: before initiate(); client: waiting for HELLO
    AWAIT_AUTH = enum.auto()  # agent sent HELLO
    AWAIT_WELCOME = enum.auto()  # client sent AUTH
    OPEN = enum.auto()
    CLOSED = enum.auto()  # REJECT sent or received, or a ProtocolError


@dataclass(slots=True)
class _Stream:
    udp: bool
    opened: bool
    send_credit: int
    recv_credit: int
    unacked: int = 0  # received, not yet acknowledged by the application
    pending_grant: int = 0  # acknowledged, not yet granted back in a WINDOW frame
    local_eof: bool = False
    remote_eof: bool = False


def _check_host(host: str) -> bytes:
    try:
        raw = host.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"host {host!r} is not ASCII (use IDNA/punycode)") from exc
    if not 1 <= len(raw) <= 255 or raw.translate(None, _HOST_BYTES):
        raise ValueError(f"invalid host {host!r}")
    return raw


class Connection:
    """One end of a tunnel connection: bytes in via receive_data, events out, bytes to send."""

    def __init__(self, role: Role, key: bytes, *, initial_window: int = INITIAL_WINDOW) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, not {role!r}")
        if not key:
            raise ValueError("tunnel key is empty")
        if not 1 <= initial_window <= _MAX_INITIAL_WINDOW:
            raise ValueError(f"initial_window must be in 1..{_MAX_INITIAL_WINDOW}")
        self._role = role
        self._is_client = role is Role.CLIENT
        self._key = bytes(key)
        self._initial_window = initial_window
        # Granting in big batches keeps WINDOW frames rare under bulk transfer.
        self._grant_threshold = max(1, initial_window // 2)
        self._state = _State.IDLE
        self._authenticated = False
        self._failure: str | None = None
        self._failure_type: type[ProtocolError] = RemoteProtocolError
        self._server_nonce = b""
        self._client_nonce = b""
        self._inbuf = bytearray()
        self._out: list[bytes | memoryview] = []
        # Events caused by local calls (StreamClosed after send_eof), handed out by the next
        # receive_data because only receive_data returns events.
        self._pending: list[Event] = []
        self._streams: dict[int, _Stream] = {}
        # Highest stream id opened so far. The client allocates odd ids in increasing order, so
        # an odd id at or below it that is not live was closed: late frames for it are ignored.
        self._last_stream_id = 0

    # ----------------------------------------------------------------- properties

    @property
    def role(self) -> Role:
        """The role given to the constructor."""
        return self._role

    @property
    def authenticated(self) -> bool:
        """True once the handshake completed (stays True after the connection closes)."""
        return self._authenticated

    @property
    def closed(self) -> bool:
        """True after a REJECT was sent or received or a ProtocolError was raised."""
        return self._state is _State.CLOSED

    @property
    def open_streams(self) -> int:
        """Number of live streams, including ones still being opened."""
        return len(self._streams)

    # ----------------------------------------------------------------- bytes in / out

    def initiate(self) -> None:
        """AGENT: queue HELLO, the first frame. CLIENT: no-op (it waits for HELLO)."""
        if self._is_client:
            return
        if self._state is not _State.IDLE:
            raise LocalProtocolError("initiate() must be called once, before anything else")
        self._server_nonce = secrets.token_bytes(NONCE_SIZE)
        self._queue(_T_HELLO, 0, _HELLO.pack(MAGIC, PROTOCOL_VERSION, self._server_nonce))
        self._state = _State.AWAIT_AUTH

    def data_to_send(self) -> bytes:
        """Return all bytes queued since the last call (b"" if none)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; return the resulting events (partial frames are buffered).

        Also returns events caused by earlier local calls (StreamClosed after send_eof), so
        `receive_data(b"")` collects those. On a ProtocolError a REJECT carrying the reason is
        queued (flush data_to_send() before closing) and every later call raises again.
        After a REJECT was sent or received, incoming bytes are discarded.
        """
        events = self._pending
        self._pending = []
        if self._failure is not None:
            raise self._failure_type(self._failure)
        if self._state is _State.CLOSED or not data:
            return events
        try:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if self._inbuf:
                # Complete the frame begun in an earlier read, copying only its missing bytes;
                # the frames after it are parsed straight from the caller's buffer.
                taken = self._complete_frame(view, events)
                if taken is None or self.closed:  # a REJECT: what follows is discarded
                    return events
                view = view[taken:]
            used = self._parse(view, events)
            if used < len(view):
                self._inbuf += view[used:]  # a partial frame: only the tail is copied
        except ProtocolError as exc:
            self._fail(str(exc))
            self._failure_type = type(exc)
            raise
        return events

    # ----------------------------------------------------------------- client API

    def open_stream(self, proto: Proto, host: str, port: int) -> int:
        """CLIENT: queue OPEN for host:port and return the new stream id.

        Data and EOF may follow at once, before StreamOpened ("early data", which saves a round
        trip): the agent holds them until its connection is up, and drops them if the open
        fails (StreamFailed). Raises ValueError for an invalid host or port.
        """
        self._require_open("open_stream")
        if not self._is_client:
            raise LocalProtocolError("only the client opens streams")
        proto = Proto(proto)
        raw = _check_host(host)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"invalid port {port}")
        stream_id = self._last_stream_id + 2 if self._last_stream_id else 1
        if stream_id > _MAX_U32:
            raise LocalProtocolError("stream ids exhausted; reconnect")
        self._last_stream_id = stream_id
        udp = proto is Proto.UDP
        self._streams[stream_id] = _Stream(
            udp=udp,
            opened=False,
            send_credit=UDP_WINDOW if udp else self._initial_window,
            recv_credit=self._initial_window,
        )
        self._queue(_T_OPEN, stream_id, _OPEN_HEAD.pack(proto, port, len(raw)) + raw)
        return stream_id

    def send_dns_query(self, query_id: int, payload: bytes) -> None:
        """CLIENT: queue a raw DNS query; the answer arrives as DnsAnswerReceived(query_id)."""
        self._require_open("send_dns_query")
        if not self._is_client:
            raise LocalProtocolError("only the client sends DNS queries")
        self._queue_dns(_T_DNS_QUERY, query_id, payload)

    # ----------------------------------------------------------------- agent API

    def accept_stream(self, stream_id: int) -> None:
        """AGENT: the connection for a StreamRequested is up; queue OPENED.

        A no-op if the client already reset the stream (its RESET can overtake our connect).
        """
        self._require_open("accept_stream")
        if self._is_client:
            raise LocalProtocolError("only the agent accepts streams")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._require_stale(stream_id, "accept_stream")
            return
        if stream.opened:
            raise LocalProtocolError(f"stream {stream_id} was already accepted")
        stream.opened = True
        self._queue(_T_OPENED, stream_id)

    def fail_stream(self, stream_id: int, failure: Failure, message: str = "") -> None:
        """AGENT: the connection for a StreamRequested failed; queue OPEN_FAILED, forget it.

        A no-op if the client already reset the stream. Use reset_stream after accept_stream.
        """
        self._require_open("fail_stream")
        if self._is_client:
            raise LocalProtocolError("only the agent fails streams")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._require_stale(stream_id, "fail_stream")
            return
        if stream.opened:
            raise LocalProtocolError(f"stream {stream_id} was accepted; use reset_stream")
        del self._streams[stream_id]
        text = message.encode("utf-8")[: MAX_PAYLOAD - 1]
        self._queue(_T_OPEN_FAILED, stream_id, bytes((Failure(failure),)) + text)

    def send_dns_answer(self, query_id: int, payload: bytes) -> None:
        """AGENT: queue the raw DNS answer to the query with this id."""
        self._require_open("send_dns_answer")
        if self._is_client:
            raise LocalProtocolError("only the agent sends DNS answers")
        self._queue_dns(_T_DNS_ANSWER, query_id, payload)

    # ----------------------------------------------------------------- both ends

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue data on an open stream; return how many bytes were accepted.

        TCP: at most the current send credit is taken (possibly 0); keep the rest and retry
        after WindowUpdated. UDP: `data` is one datagram, always taken whole; ValueError if it
        exceeds MAX_PAYLOAD. ProtocolError if the stream is not open, after EOF or reset.
        """
        stream = self._sendable(stream_id, "send_data")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        out = self._out
        # Referencing immutable bytes avoids a copy; a mutable buffer must be copied because
        # the caller may reuse it before data_to_send() runs.
        immutable = isinstance(view.obj, bytes)
        if stream.udp:
            if size > MAX_PAYLOAD:
                raise ValueError(f"datagram of {size} bytes exceeds {MAX_PAYLOAD}")
            out.append(HEADER.pack(_T_DATA, stream_id, size))
            if size:
                out.append(view if immutable else bytes(view))
            return size
        size = min(size, stream.send_credit)
        if size <= 0:
            return 0
        stream.send_credit -= size
        pack = HEADER.pack
        for start in range(0, size, MAX_PAYLOAD):
            chunk = view[start : min(start + MAX_PAYLOAD, size)]
            out.append(pack(_T_DATA, stream_id, len(chunk)))
            out.append(chunk if immutable else bytes(chunk))
        return size

    def send_window(self, stream_id: int) -> int:
        """Current send credit of a stream in bytes (UDP streams: UDP_WINDOW)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"send_window: stream {stream_id} is not open")
        return stream.send_credit

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """Report that nbytes of received TCP data reached the application.

        Queues a WINDOW frame once half the initial window is acknowledged. A no-op for UDP,
        for streams already closed or reset, and on a closed connection.
        """
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        stream = self._streams.get(stream_id)
        if stream is None or stream.udp or self._state is not _State.OPEN:
            return
        if nbytes > stream.unacked:
            raise LocalProtocolError(
                f"acknowledged {nbytes} bytes on stream {stream_id}, "
                f"only {stream.unacked} are unacknowledged"
            )
        stream.unacked -= nbytes
        grant = stream.pending_grant + nbytes
        # No credit needed once the peer has finished sending.
        if grant >= self._grant_threshold and not stream.remote_eof:
            stream.recv_credit += grant
            stream.pending_grant = 0
            self._queue(_T_WINDOW, stream_id, _U32.pack(grant))
        else:
            stream.pending_grant = grant

    def send_eof(self, stream_id: int) -> None:
        """Queue EOF: no more data from us on this stream (TCP half-close).

        If the peer already sent EOF the stream is closed and forgotten; the StreamClosed event
        comes from the next receive_data call (receive_data(b"") returns it at once).
        """
        stream = self._sendable(stream_id, "send_eof")
        stream.local_eof = True
        self._queue(_T_EOF, stream_id)
        if stream.remote_eof:
            del self._streams[stream_id]
            self._pending.append(StreamClosed(stream_id))

    def reset_stream(self, stream_id: int, failure: Failure = Failure.RESET) -> None:
        """Abort a stream in both directions and forget it.

        Idempotent: a no-op for a stream already closed or reset (by either end) and on a
        closed connection, since cleanup paths race with the peer.
        """
        if self._state is _State.CLOSED:
            return
        self._require_open("reset_stream")
        if self._streams.pop(stream_id, None) is None:
            self._require_stale(stream_id, "reset_stream")
            return
        self._queue(_T_RESET, stream_id, bytes((Failure(failure),)))

    def ping(self, opaque: bytes = _DEFAULT_PING) -> None:
        """Queue a PING with an 8-byte opaque payload; the peer echoes it in a PONG."""
        if len(opaque) != _PING_SIZE:
            raise ValueError(f"ping payload must be {_PING_SIZE} bytes")
        self._require_open("ping")
        self._queue(_T_PING, 0, bytes(opaque))

    def reject(self, reason: str) -> None:
        """Queue REJECT with a reason and close the connection (no-op if already closed)."""
        if self._state is _State.CLOSED:
            return
        self._queue(_T_REJECT, 0, reason.encode("utf-8")[:MAX_PAYLOAD])
        self._close()

    # ----------------------------------------------------------------- internals: sending

    def _queue(self, ftype: int, stream_id: int, payload: bytes = b"") -> None:
        self._out.append(HEADER.pack(ftype, stream_id, len(payload)) + payload)

    def _queue_dns(self, ftype: int, query_id: int, payload: bytes) -> None:
        if not 0 <= query_id <= _MAX_U32:
            raise ValueError(f"query id {query_id} is not a u32")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"DNS message of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        self._queue(ftype, query_id, bytes(payload))

    def _require_open(self, what: str) -> None:
        if self._state is not _State.OPEN:
            if self._state is _State.CLOSED:
                raise LocalProtocolError(f"{what}: the connection is closed")
            raise LocalProtocolError(f"{what}: the handshake is not complete")

    def _is_stale(self, stream_id: int) -> bool:
        return bool(stream_id & 1) and 0 < stream_id <= self._last_stream_id

    def _require_stale(self, stream_id: int, what: str) -> None:
        if not self._is_stale(stream_id):
            raise LocalProtocolError(f"{what}: stream {stream_id} was never opened")

    def _sendable(self, stream_id: int, what: str) -> _Stream:
        self._require_open(what)
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._is_stale(stream_id):
                raise LocalProtocolError(f"{what}: stream {stream_id} is closed or reset")
            raise LocalProtocolError(f"{what}: stream {stream_id} was never opened")
        if not stream.opened and not self._is_client:
            raise LocalProtocolError(f"{what}: stream {stream_id} is not open yet")
        if stream.local_eof:
            raise LocalProtocolError(f"{what}: EOF already sent on stream {stream_id}")
        return stream

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._streams.clear()

    def _fail(self, reason: str) -> None:
        if self._state is not _State.CLOSED:
            # Tell the peer why, so both logs carry the same reason.
            self._queue(_T_REJECT, 0, reason.encode("utf-8")[:MAX_PAYLOAD])
        self._close()
        self._failure = reason
        # Rebind rather than clear: a payload view in the traceback may still pin the old one.
        self._inbuf = bytearray()

    def _mac(self, label: bytes, first: bytes, second: bytes) -> bytes:
        return hmac.digest(self._key, label + first + second, hashlib.sha256)

    # ----------------------------------------------------------------- internals: receiving

    def _complete_frame(self, view: memoryview, events: list[Event]) -> int | None:
        """Add to the buffered partial frame what it misses from `view`; once whole, handle it.

        Returns how many bytes of `view` it took, or None when all of them went into a frame
        still incomplete.
        """
        buf = self._inbuf
        have = len(buf)
        if have < HEADER_SIZE:
            needed = HEADER_SIZE - have
            buf += view[:needed]
            if len(buf) < HEADER_SIZE:
                return None
            taken = needed
        else:
            taken = 0
        length = HEADER.unpack_from(buf)[2]
        missing = HEADER_SIZE + length - len(buf)
        if length <= MAX_PAYLOAD and missing > 0:
            buf += view[taken : taken + missing]
            taken += min(missing, len(view) - taken)
            if len(buf) < HEADER_SIZE + length:
                return None
        with memoryview(buf) as frame:
            self._parse(frame, events)  # exactly one frame (or the error of its header)
        del buf[:]
        return taken

    def _parse(self, view: memoryview, events: list[Event]) -> int:
        """Handle every complete frame in view; return the number of bytes consumed."""
        pos = 0
        end = len(view)
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            ftype, stream_id, length = unpack(view, pos)
            if length > MAX_PAYLOAD:
                # Checked before the payload arrives so a bad length cannot make us buffer.
                raise RemoteProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            state = self._state
            if state is _State.OPEN:
                self._on_frame(ftype, stream_id, view[start:stop], events)
            elif state is _State.CLOSED:
                return end
            else:
                self._on_handshake_frame(ftype, stream_id, view[start:stop], events)
            pos = stop
        if self._state is _State.CLOSED:
            return end  # discard whatever follows a REJECT
        return pos

    def _on_frame(
        self, ftype: int, stream_id: int, payload: memoryview, events: list[Event]
    ) -> None:
        # Ordered by expected frequency.
        if ftype == _T_DATA:
            self._on_data(stream_id, payload, events)
        elif ftype == _T_WINDOW:
            self._on_window(stream_id, payload, events)
        elif ftype == _T_EOF:
            self._on_eof(stream_id, payload, events)
        elif ftype == _T_RESET:
            self._on_reset(stream_id, payload, events)
        elif ftype == _T_OPEN and not self._is_client:
            self._on_open(stream_id, payload, events)
        elif ftype == _T_OPENED and self._is_client:
            self._on_opened(stream_id, payload, events)
        elif ftype == _T_OPEN_FAILED and self._is_client:
            self._on_open_failed(stream_id, payload, events)
        elif ftype == _T_DNS_QUERY and not self._is_client:
            events.append(DnsQueryReceived(stream_id, bytes(payload)))
        elif ftype == _T_DNS_ANSWER and self._is_client:
            events.append(DnsAnswerReceived(stream_id, bytes(payload)))
        elif ftype == _T_PING:
            opaque = self._control_payload("PING", stream_id, payload)
            self._queue(_T_PONG, 0, opaque)
            events.append(PingReceived(opaque))
        elif ftype == _T_PONG:
            events.append(PongReceived(self._control_payload("PONG", stream_id, payload)))
        elif ftype == _T_REJECT:
            self._on_reject(stream_id, payload, events)
        elif ftype in _FRAME_NAMES:
            raise RemoteProtocolError(
                f"unexpected {_FRAME_NAMES[ftype]} frame for a {self._role.value}"
            )
        else:
            raise RemoteProtocolError(f"unknown frame type {ftype}")

    @staticmethod
    def _control_payload(name: str, stream_id: int, payload: memoryview) -> bytes:
        if stream_id != 0:
            raise RemoteProtocolError(f"{name} frame on stream {stream_id}, expected 0")
        if len(payload) != _PING_SIZE:
            raise RemoteProtocolError(f"{name} payload must be {_PING_SIZE} bytes")
        return bytes(payload)

    def _known_stream(self, stream_id: int, name: str) -> _Stream | None:
        """Return the live stream, None for a stale one (ignore the frame), else raise."""
        stream = self._streams.get(stream_id)
        if stream is None and not self._is_stale(stream_id):
            raise RemoteProtocolError(
                f"{name} frame for stream {stream_id}, which was never opened"
            )
        return stream

    def _on_data(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            # Late DATA after a reset or close is a normal race; a never-opened id is not.
            self._known_stream(stream_id, "DATA")
            return
        if not stream.opened and self._is_client:
            # The agent may not send before OPENED; the client may (early data).
            raise RemoteProtocolError(f"DATA on stream {stream_id} before it was opened")
        if stream.remote_eof:
            raise RemoteProtocolError(f"DATA on stream {stream_id} after EOF")
        if stream.udp:
            events.append(DataReceived(stream_id, bytes(payload)))
            return
        size = len(payload)
        if size > stream.recv_credit:
            raise RemoteProtocolError(
                f"flow control violation on stream {stream_id}: "
                f"{size} bytes received with {stream.recv_credit} bytes of credit"
            )
        if size:
            stream.recv_credit -= size
            stream.unacked += size
            events.append(DataReceived(stream_id, bytes(payload)))

    def _on_window(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != _U32.size:
            raise RemoteProtocolError("WINDOW payload must be 4 bytes")
        stream = self._known_stream(stream_id, "WINDOW")
        if stream is None:
            return
        if stream.udp:
            raise RemoteProtocolError(f"WINDOW on UDP stream {stream_id}")
        (increment,) = _U32.unpack(payload)
        if increment == 0:
            raise RemoteProtocolError(f"WINDOW of 0 on stream {stream_id}")
        credit = stream.send_credit + increment
        if credit > _MAX_U32:
            raise RemoteProtocolError(f"WINDOW overflows the send credit of stream {stream_id}")
        stream.send_credit = credit
        if not stream.local_eof:
            events.append(WindowUpdated(stream_id))

    def _on_eof(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if payload:
            raise RemoteProtocolError("EOF payload must be empty")
        stream = self._known_stream(stream_id, "EOF")
        if stream is None:
            return
        if not stream.opened and self._is_client:
            raise RemoteProtocolError(f"EOF on stream {stream_id} before it was opened")
        if stream.remote_eof:
            raise RemoteProtocolError(f"second EOF on stream {stream_id}")
        stream.remote_eof = True
        events.append(StreamEnded(stream_id))
        if stream.local_eof:
            del self._streams[stream_id]
            events.append(StreamClosed(stream_id))

    def _on_reset(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 1:
            raise RemoteProtocolError("RESET payload must be 1 byte")
        if self._known_stream(stream_id, "RESET") is None:
            return  # both ends reset at once, or the stream closed meanwhile
        del self._streams[stream_id]
        events.append(StreamReset(stream_id, _FAILURES.get(payload[0], Failure.OTHER)))

    def _on_open(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if not stream_id & 1 or stream_id <= self._last_stream_id:
            raise RemoteProtocolError(f"OPEN reuses or skips back to stream id {stream_id}")
        if len(payload) < _OPEN_HEAD.size:
            raise RemoteProtocolError("OPEN payload too short")
        proto_num, port, host_len = _OPEN_HEAD.unpack_from(payload)
        proto = _PROTOS.get(proto_num)
        if proto is None:
            raise RemoteProtocolError(f"OPEN with unknown protocol {proto_num}")
        raw = bytes(payload[_OPEN_HEAD.size :])
        if len(raw) != host_len or not raw or raw.translate(None, _HOST_BYTES):
            raise RemoteProtocolError(f"OPEN with a malformed host on stream {stream_id}")
        udp = proto is Proto.UDP
        self._last_stream_id = stream_id
        self._streams[stream_id] = _Stream(
            udp=udp,
            opened=False,
            send_credit=UDP_WINDOW if udp else self._initial_window,
            recv_credit=self._initial_window,
        )
        events.append(StreamRequested(stream_id, proto, raw.decode("ascii"), port))

    def _on_opened(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if payload:
            raise RemoteProtocolError("OPENED payload must be empty")
        stream = self._known_stream(stream_id, "OPENED")
        if stream is None:
            return  # we reset it while the agent was connecting
        if stream.opened:
            raise RemoteProtocolError(f"second OPENED for stream {stream_id}")
        stream.opened = True
        events.append(StreamOpened(stream_id))

    def _on_open_failed(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if not payload:
            raise RemoteProtocolError("OPEN_FAILED payload must carry a code")
        stream = self._known_stream(stream_id, "OPEN_FAILED")
        if stream is None:
            return
        if stream.opened:
            raise RemoteProtocolError(f"OPEN_FAILED for stream {stream_id}, which was opened")
        del self._streams[stream_id]
        failure = _FAILURES.get(payload[0], Failure.OTHER)
        message = bytes(payload[1:]).decode("utf-8", "replace")
        events.append(StreamFailed(stream_id, failure, message))

    def _on_reject(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if stream_id != 0:
            raise RemoteProtocolError(f"REJECT frame on stream {stream_id}, expected 0")
        self._close()
        events.append(Rejected(bytes(payload).decode("utf-8", "replace")))

    # ----------------------------------------------------------------- internals: handshake

    def _on_handshake_frame(
        self, ftype: int, stream_id: int, payload: memoryview, events: list[Event]
    ) -> None:
        if ftype == _T_REJECT:
            self._on_reject(stream_id, payload, events)
            return
        name = _FRAME_NAMES.get(ftype, f"unknown type {ftype}")
        if stream_id != 0:
            raise RemoteProtocolError(f"{name} frame on stream {stream_id} during the handshake")
        state = self._state
        if state is _State.IDLE and self._is_client and ftype == _T_HELLO:
            self._on_hello(payload)
        elif state is _State.AWAIT_AUTH and ftype == _T_AUTH:
            self._on_auth(payload, events)
        elif state is _State.AWAIT_WELCOME and ftype == _T_WELCOME:
            self._on_welcome(payload, events)
        elif state is _State.IDLE and not self._is_client:
            raise LocalProtocolError("agent received data before initiate()")
        else:
            raise RemoteProtocolError(f"unexpected {name} frame during the handshake")

    def _on_hello(self, payload: memoryview) -> None:
        if len(payload) < len(MAGIC) + _U16.size or bytes(payload[: len(MAGIC)]) != MAGIC:
            raise RemoteProtocolError("peer is not a composemirror agent (bad HELLO)")
        # The version is checked before the length so a future HELLO layout still gets
        # the friendly mismatch message.
        (version,) = _U16.unpack_from(payload, len(MAGIC))
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"unsupported version {version}, client speaks {PROTOCOL_VERSION}"
            )
        if len(payload) != _HELLO.size:
            raise RemoteProtocolError("malformed HELLO")
        self._server_nonce = bytes(payload[len(MAGIC) + _U16.size :])
        self._client_nonce = secrets.token_bytes(NONCE_SIZE)
        mac = self._mac(b"client", self._server_nonce, self._client_nonce)
        self._queue(_T_AUTH, 0, _AUTH.pack(PROTOCOL_VERSION, self._client_nonce, mac))
        self._state = _State.AWAIT_WELCOME

    def _on_auth(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) < _U16.size:
            raise RemoteProtocolError("malformed AUTH")
        (version,) = _U16.unpack_from(payload)
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"unsupported version {version}, agent speaks {PROTOCOL_VERSION}"
            )
        if len(payload) != _AUTH.size:
            raise RemoteProtocolError("malformed AUTH")
        _, client_nonce, mac = _AUTH.unpack(payload)
        expected = self._mac(b"client", self._server_nonce, client_nonce)
        if not hmac.compare_digest(mac, expected):
            raise RemoteProtocolError("authentication failed")
        self._client_nonce = client_nonce
        self._queue(_T_WELCOME, 0, self._mac(b"agent", client_nonce, self._server_nonce))
        self._state = _State.OPEN
        self._authenticated = True
        events.append(Authenticated())

    def _on_welcome(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != MAC_SIZE:
            raise RemoteProtocolError("malformed WELCOME")
        expected = self._mac(b"agent", self._client_nonce, self._server_nonce)
        if not hmac.compare_digest(bytes(payload), expected):
            raise RemoteProtocolError("authentication failed")
        self._state = _State.OPEN
        self._authenticated = True
        events.append(Authenticated())
