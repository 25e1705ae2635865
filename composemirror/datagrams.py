"""Datagram flows, the same at both ends of the tunnel: one UDP path, one idle expiry.

A `Flow` is one conversation of datagrams between a local socket and a far end, with what it
holds while either end opens and when it was last used; a `FlowTable` keeps a process's flows
and closes those unused for a while, as a NAT table forgets them (the only idle expiry of sidecar
and agent). A `StreamFlow`'s far end is a tunnel stream, one DATA frame per datagram: the
sidecar's remote flows and the agent's sockets are both one; the sidecar's direct flows are
plain `Flow`s whose far end is a socket. No sockets here: subclasses own them.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import deque
from collections.abc import Hashable

from composemirror.protocol import Failure
from composemirror.tunnel import Tunnel

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 60.0
"""A flow with no datagram either way for this long is closed, as a NAT table forgets it."""
BACKLOG = 64
"""Datagrams a flow keeps while it opens, each way; beyond that the oldest are dropped."""


class Flow(abc.ABC):
    """One datagram flow between a local socket and a far end: the one datagram path.

    Datagrams either way wait while their way's end is not ready yet (at most BACKLOG each way,
    the oldest dropped first) and go at once after; every datagram counts as activity for the
    idle expiry; once closed, nothing more goes anywhere. Subclasses say how a datagram leaves
    (`send_local`, `send_far`), call `local_ready` and `far_ready` when each end can take
    datagrams, and release their sockets and stream in `release`. The far end is a tunnel stream
    (`StreamFlow`) or, for the sidecar's direct flows, a socket of its own.
    """

    def __init__(self) -> None:
        self.last_active = time.monotonic()
        self.closed = False
        self.table: FlowTable | None = None
        self.key: Hashable = id(self)
        self.far_open = False
        self.local_open = False
        self.outbound: deque[bytes] = deque(maxlen=BACKLOG)
        """From the local socket, waiting for the far end."""
        self.inbound: deque[bytes] = deque(maxlen=BACKLOG)
        """From the far end, waiting for the local socket."""
        self.drops = 0

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        if self.table is not None:
            self.table.forget(self)

    # -- the path ------------------------------------------------------------------------------

    def from_local(self, data: bytes) -> None:
        """One datagram from the local socket, for the far end."""
        if self.closed:
            return
        self.touch()
        if self.far_open:
            self.send_far(data)
        else:
            self._hold(self.outbound, data)

    def from_far(self, data: bytes) -> None:
        """One datagram from the far end, for the local socket."""
        if self.closed:
            return
        self.touch()
        if self.local_open:
            self.send_local(data)
        else:
            self._hold(self.inbound, data)

    def far_ready(self) -> None:
        """The far end takes datagrams now, beginning with those held."""
        self.far_open = True
        while self.outbound and not self.closed:
            self.send_far(self.outbound.popleft())

    def local_ready(self) -> None:
        """The local socket takes datagrams now, beginning with those held."""
        self.local_open = True
        while self.inbound and not self.closed:
            self.send_local(self.inbound.popleft())

    def _hold(self, held: deque[bytes], data: bytes) -> None:
        if len(held) == held.maxlen:
            self.dropped()
        held.append(data)

    # -- what subclasses provide ---------------------------------------------------------------

    @abc.abstractmethod
    def send_local(self, data: bytes) -> None:
        """Send one datagram out of the local socket."""

    @abc.abstractmethod
    def send_far(self, data: bytes) -> None:
        """Send one datagram to the far end."""

    def dropped(self) -> None:
        """A held datagram was dropped (its way's backlog was full); counted in `drops`."""
        self.drops += 1

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of the flow's sockets and its stream."""


class FlowTable:
    """A process's flows by key, each closed after `idle_timeout` without a datagram."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self.flows: dict[Hashable, Flow] = {}

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: Hashable) -> Flow | None:
        return self.flows.get(key)

    def add(self, flow: Flow, key: Hashable | None = None) -> None:
        if key is not None:
            flow.key = key
        flow.table = self
        self.flows[flow.key] = flow

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]

    def close_idle(self, now: float) -> list[Flow]:
        """Close the flows idle at `now`; return them."""
        idle = [f for f in self.flows.values() if now - f.last_active > self.idle_timeout]
        for flow in idle:
            flow.close()
        return idle

    def close_all(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()

    async def expire(self) -> None:
        """Close idle flows, forever (a service task of the process)."""
        while True:
            await asyncio.sleep(self.idle_timeout / 4)
            for flow in self.close_idle(time.monotonic()):
                log.debug("udp flow %s idle, closed", flow.key)


class StreamFlow(Flow):
    """A flow whose far end is a tunnel stream, one DATA frame per datagram; a `tunnel.Endpoint`.

    The stream takes datagrams from `start` (the client starts at once, so they go with the
    OPEN; the agent once its socket is up). A UDP stream has no window and no half-close: EOF
    or reset from the peer ends the flow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tunnel: Tunnel | None = None
        self.stream_id = 0

    def start(self) -> None:
        """Datagrams may go into the stream, beginning with those held."""
        assert self.tunnel is not None
        self.far_ready()

    def send_far(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.alive:
            tunnel.send(self.stream_id, data)

    # -- tunnel.Endpoint -----------------------------------------------------------------------

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self.peer_reset()

    def deliver(self, data: bytes) -> None:
        self.from_far(data)

    def window_open(self) -> None:
        pass  # UDP streams have no flow control

    def peer_eof(self) -> None:
        self.peer_reset()

    def peer_reset(self) -> None:
        self.tunnel = None  # the stream is gone: nothing to reset
        self.close()

    def stream_closed(self) -> None:
        self.peer_reset()

    def tunnel_full(self) -> None:
        pass  # the tunnel buffers; a datagram source cannot be paused anyway

    def tunnel_drained(self) -> None:
        pass

    def release(self) -> None:
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.reset(self.stream_id)
