"""The app's held handshakes: new TCP SYNs queued to the sidecar (NFQUEUE) until the remote
side has answered, so the app's `connect()` ends as the target's would.

Pure parts: the nfnetlink_queue messages (bind, packet, verdict; the layout is the kernel's
`linux/netfilter/nfnetlink_queue.h`), the 4-tuple of a queued SYN, the verdict that shows a
remote outcome to the app, and the book of held SYNs. `SynQueue` is the asyncio adapter over
one netlink socket; it must not decide routes itself (`proxy.Egress` does).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from composemirror.errors import SidecarError, TunnelClosed
from composemirror.filters import Route
from composemirror.protocol import Failure, Proto

if TYPE_CHECKING:
    from composemirror.sidecar.proxy import AppConnection, Egress

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NF_DROP = 0
NF_ACCEPT = 1

COPY_RANGE = 120
"""Bytes of each queued packet copied to the sidecar: an IPv4 header with options (60) and a
TCP header with options (60), all a SYN's 4-tuple needs."""
KERNEL_QUEUE_LENGTH = 1024
"""SYNs the kernel holds for the sidecar; beyond, they pass unheld (fail open, see
`Plan.syn_queue`)."""
MAX_HELD = 1024
"""SYNs the sidecar holds at once (waiting for the agent); beyond, they pass unheld."""
PAIRING_TIMEOUT = 10.0
"""Seconds an opened stream waits for the app's accepted connection before it is reset."""


class Verdict(enum.Enum):
    """What a held SYN becomes: what the app's `connect()` then sees."""

    PASS = "pass"
    """Accepted: the firewall redirects it to the proxy, whose handshake completes it."""
    REFUSE = "refuse"
    """A TCP reset: `ECONNREFUSED`, as a closed port answers."""
    HOST_UNREACHABLE = "host-unreachable"
    """ICMP host unreachable: `EHOSTUNREACH` ("No route to host")."""
    NET_UNREACHABLE = "net-unreachable"
    """ICMP network unreachable: `ENETUNREACH`."""
    DROP = "drop"
    """No answer: the app's kernel sends the SYN again, or its own timeout ends the wait."""


def verdict_for(failure: Failure, message: str) -> Verdict:
    """The verdict that shows the app what the agent's `connect()` met (`Failure` and the
    agent's message, which for `UNREACHABLE` is `os.strerror` of its errno)."""
    if failure == Failure.TIMEOUT:
        return Verdict.DROP
    if failure == Failure.UNREACHABLE:
        if message == os.strerror(errno.ENETUNREACH):
            return Verdict.NET_UNREACHABLE
        return Verdict.HOST_UNREACHABLE
    return Verdict.REFUSE


@dataclass(frozen=True, slots=True)
class FourTuple:
    """One TCP connection of the app, as its SYN names it: (source, destination)."""

    source: str
    source_port: int
    destination: str
    destination_port: int


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """A packet the kernel queued: its id (for the verdict) and its first bytes."""

    packet_id: int
    payload: bytes


def parse_syn(payload: bytes) -> FourTuple | None:
    """The 4-tuple of an IPv4 TCP SYN (without ACK), else None (any other packet, or one cut
    short)."""
    if len(payload) < 20 or payload[0] >> 4 != 4 or payload[9] != socket.IPPROTO_TCP:
        return None
    header = (payload[0] & 0x0F) * 4
    if header < 20 or len(payload) < header + 14:
        return None
    source_port, destination_port = struct.unpack_from("!HH", payload, header)
    flags = payload[header + 13]
    if flags & 0x12 != 0x02:  # SYN set, ACK clear
        return None
    return FourTuple(
        str(ipaddress.IPv4Address(payload[12:16])),
        source_port,
        str(ipaddress.IPv4Address(payload[16:20])),
        destination_port,
    )


# -- nfnetlink_queue messages ------------------------------------------------------------------


def _attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attributes
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0)
    return header + body


def bind_message(queue: int, maxlen: int = KERNEL_QUEUE_LENGTH) -> bytes:
    """The config message that binds `queue` to the socket, copying `COPY_RANGE` bytes of each
    packet, at most `maxlen` packets held, and the kernel accepting (not dropping) a packet
    that finds the queue full (`NFQA_CFG_F_FAIL_OPEN`); it asks for an acknowledgement.

    One message, not a bind and then the rest: the kernel applies its attributes together,
    so a SYN queued right after the bind (a restarted sidecar's rules are already there) is
    not met by a queue that copies nothing and drops it.
    """
    return _message(
        NFQNL_MSG_CONFIG,
        queue,
        _attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
        + _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
        + _attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
        + _attribute(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        + _attribute(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)),
        NLM_F_REQUEST | NLM_F_ACK,
    )


def verdict_message(queue: int, packet_id: int, accept: bool, mark: int | None = None) -> bytes:
    """The verdict on one queued packet: accepted (with `mark` set on it, when given) or
    dropped."""
    attributes = _attribute(
        NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT if accept else NF_DROP, packet_id)
    )
    if mark is not None:
        attributes += _attribute(NFQA_MARK, struct.pack("!I", mark))
    return _message(NFQNL_MSG_VERDICT, queue, attributes)


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def parse_messages(data: bytes) -> tuple[list[QueuedPacket], list[int]]:
    """One netlink datagram: the packets it queues and the error codes of its acknowledgements
    (0 for success, else a negative errno)."""
    packets: list[QueuedPacket] = []
    errors: list[int] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if kind == NLMSG_ERROR and length >= 20:
            errors.append(struct.unpack_from("=i", data, offset + 16)[0])
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id, payload = None, b""
            for attribute, value in _attributes(data, offset + 20, offset + length):
                if attribute == NFQA_PACKET_HDR and len(value) >= 4:
                    packet_id = struct.unpack_from("!I", value)[0]
                elif attribute == NFQA_PAYLOAD:
                    payload = value
            if packet_id is not None:
                packets.append(QueuedPacket(packet_id, payload))
        offset += (length + 3) & ~3
    return packets, errors


# -- the book of held SYNs ---------------------------------------------------------------------


class Holds:
    """The SYNs held while the agent opens their streams, by 4-tuple, at most `limit`.

    The app's kernel sends a SYN again (after 1 s, 3 s, ...) while the first is held; the
    repeat is the same connection and must not open a second stream.
    """

    def __init__(self, limit: int = MAX_HELD) -> None:
        self.limit = limit
        self.held: dict[FourTuple, int] = {}

    def hold(self, connection: FourTuple, packet_id: int) -> str:
        """`new` (hold it and open its stream), `repeat` (drop it: the first is held) or
        `full` (let it pass unheld)."""
        if connection in self.held:
            return "repeat"
        if len(self.held) >= self.limit:
            return "full"
        self.held[connection] = packet_id
        return "new"

    def release(self, connection: FourTuple) -> int | None:
        """The id of the held SYN of `connection` (for its verdict), forgotten."""
        return self.held.pop(connection, None)


# -- the asyncio adapter -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Marks:
    """Firewall marks that the rules turn into an answer to the app (see `firewall.Plan`)."""

    refuse: int
    host_unreachable: int
    net_unreachable: int

    def of(self, verdict: Verdict) -> int | None:
        """The mark of a verdict that is answered by a REJECT rule, else None."""
        return {
            Verdict.REFUSE: self.refuse,
            Verdict.HOST_UNREACHABLE: self.host_unreachable,
            Verdict.NET_UNREACHABLE: self.net_unreachable,
        }.get(verdict)


class SynQueue:
    """Reads the SYNs the firewall queues, opens the remote ones' streams through the agent and
    gives each its verdict once the agent has answered; the proxy takes the opened stream of an
    accepted connection with `take`.

    `egress` decides each SYN's route (`Egress.decide`) and holds the tunnel; `endpoint()`
    makes a stream's endpoint (a `proxy.AppConnection` with no socket yet). The queue's
    verdicts are the only place where a SYN is held, answered or dropped: the app sees the
    agent's outcome at most once per SYN, and a SYN never waits for a verdict that will not
    come (an unanswered stream ends in `resolved` through the endpoint's callbacks).
    """

    def __init__(
        self,
        queue: int,
        marks: Marks,
        egress: Egress,
        endpoint: Callable[[], AppConnection],
        holds: Holds | None = None,
    ) -> None:
        self.queue = queue
        self.marks = marks
        self.egress = egress
        self.endpoint = endpoint
        self.holds = holds or Holds()
        self.opened: dict[FourTuple, tuple[AppConnection, asyncio.TimerHandle]] = {}
        """Streams opened for accepted SYNs, until the proxy takes them."""
        self.sock: socket.socket | None = None
        self.counts = {"held": 0, "passed": 0, "unheld": 0, "repeats": 0}
        """SYNs held, passed at once (local), passed unheld (over the bound), dropped as
        repeats; and, by verdict value, those answered for the agent (refuse, drop, ...)."""
        self.counts.update({verdict.value: 0 for verdict in Verdict if verdict != Verdict.PASS})

    def open(self) -> None:
        """Bind the queue; raises SidecarError when the kernel refuses (no NET_ADMIN, no
        nfnetlink_queue)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        early: list[QueuedPacket] = []
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.settimeout(5.0)
            sock.bind((0, 0))
            sock.send(bind_message(self.queue))
            while True:
                # SYNs may come before the acknowledgement: they wait for the reader.
                packets, errors = parse_messages(sock.recv(65536))
                early += packets
                if errors:
                    break
            if errors[0] != 0:
                raise OSError(-errors[0], os.strerror(-errors[0]))
        except OSError as e:
            sock.close()
            raise SidecarError(
                f"cannot bind netfilter queue {self.queue}: {e} (the sidecar needs the "
                "NET_ADMIN capability and the kernel's nfnetlink_queue)"
            ) from e
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        for packet in early:
            self._arrived(packet)

    def close(self) -> None:
        """Stop reading; the rules' `--queue-bypass` lets new SYNs pass unheld."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def take(self, connection: FourTuple) -> AppConnection | None:
        """The stream opened for `connection`'s SYN, if any; it is the proxy's from then on."""
        entry = self.opened.pop(connection, None)
        if entry is None:
            return None
        entry[1].cancel()
        return entry[0]

    def report(self) -> dict[str, int]:
        """Counters for the status file."""
        return {**self.counts, "holding": len(self.holds.held), "unpaired": len(self.opened)}

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                # ENOBUFS: the kernel could not queue to us; those SYNs passed (fail open).
                if e.errno != errno.ENOBUFS:
                    log.warning("netfilter queue: %s", e)
                    return
                continue
            packets, _ = parse_messages(data)
            for packet in packets:
                self._arrived(packet)

    def _verdict(self, packet_id: int, verdict: Verdict) -> None:
        if self.sock is None:
            return
        if verdict == Verdict.PASS:
            message = verdict_message(self.queue, packet_id, True)
        elif verdict == Verdict.DROP:
            message = verdict_message(self.queue, packet_id, False)
        else:
            message = verdict_message(self.queue, packet_id, True, self.marks.of(verdict))
        try:
            self.sock.send(message)
        except OSError as e:
            log.warning("netfilter queue verdict: %s", e)

    def _arrived(self, packet: QueuedPacket) -> None:
        connection = parse_syn(packet.payload)
        if connection is None:
            self._verdict(packet.packet_id, Verdict.PASS)
            return
        decision = self.egress.decide(connection.destination, connection.destination_port, "tcp")
        if decision.route != Route.REMOTE:
            self.counts["passed"] += 1
            self._verdict(packet.packet_id, Verdict.PASS)  # local: the proxy connects it
            return
        state = self.holds.hold(connection, packet.packet_id)
        if state == "repeat":
            self.counts["repeats"] += 1
            self._verdict(packet.packet_id, Verdict.DROP)
            return
        if state == "new" and connection in self.opened:
            # A repeat of a SYN already let through: its stream waits for the proxy.
            self.holds.release(connection)
            state = "full"
        if state == "full":
            self.counts["unheld"] += 1
            self._verdict(packet.packet_id, Verdict.PASS)  # the proxy opens it on accept
            return
        self.counts["held"] += 1
        endpoint = self.endpoint()
        endpoint.pending = (self, connection)
        try:
            tunnel = self.egress.tunnels.current()
            tunnel.open(Proto.TCP, decision.destination, connection.destination_port, endpoint)
        except TunnelClosed as e:
            log.info(
                "remote %s:%s failed: %s", decision.destination, connection.destination_port, e
            )
            self.egress.counters.tcp_failed += 1
            self.resolved(connection, Failure.REFUSED, str(e))

    def resolved(self, connection: FourTuple, failure: Failure | None, message: str = "") -> None:
        """The agent's answer for `connection`'s stream: opened (`failure` None) or not."""
        packet_id = self.holds.release(connection)
        if packet_id is None:
            return
        if failure is None:
            self._verdict(packet_id, Verdict.PASS)
            return
        verdict = verdict_for(failure, message)
        self.counts[verdict.value] += 1
        self._verdict(packet_id, verdict)

    def paired(self, connection: FourTuple, endpoint: AppConnection) -> None:
        """Keep an opened stream for the proxy; reset it if the app's connection never comes."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(PAIRING_TIMEOUT, self._unpaired, connection)
        self.opened[connection] = (endpoint, timer)

    def _unpaired(self, connection: FourTuple) -> None:
        entry = self.opened.pop(connection, None)
        if entry is not None:
            log.info("no connection came for the stream to %s", connection)
            entry[0].abandon()
