"""Datagram flows, the same at both ends of the tunnel: one UDP path, one idle expiry.

A `Flow` is one conversation of datagrams with what it holds while it opens and when it was last
used; a `FlowTable` keeps a process's flows and closes those unused for a while, as a NAT table
forgets them (the only idle expiry of sidecar and agent). A `StreamFlow` carries a flow over a
tunnel stream, one DATA frame per datagram: the sidecar's remote flows and the agent's sockets
are both one. No sockets here: subclasses own them.
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
    """One datagram flow. `close()` ends it once; subclasses release their sockets."""

    def __init__(self) -> None:
        self.last_active = time.monotonic()
        self.closed = False
        self.table: FlowTable | None = None
        self.key: Hashable = id(self)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        if self.table is not None:
            self.table.forget(self)

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
    """A flow carried by a tunnel stream; a `tunnel.Endpoint`.

    Datagrams to the stream wait until `start` (the client starts at once, so they go with the
    OPEN; the agent once its socket is up); datagrams from the stream wait until `local_ready`.
    A UDP stream has no window and no half-close: EOF or reset from the peer ends the flow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.started = False
        self.ready = False
        self.outbound: deque[bytes] = deque(maxlen=BACKLOG)
        self.inbound: deque[bytes] = deque(maxlen=BACKLOG)

    @abc.abstractmethod
    def send_local(self, data: bytes) -> None:
        """Send one datagram from the stream to the local side."""

    def dropped(self) -> None:
        """A held datagram was dropped (the backlog was full)."""

    def to_stream(self, data: bytes) -> None:
        """One datagram from the local side."""
        if self.closed:
            return
        self.touch()
        tunnel = self.tunnel
        if not self.started or tunnel is None:
            if len(self.outbound) == self.outbound.maxlen:
                self.dropped()
            self.outbound.append(data)
        elif tunnel.alive:
            tunnel.send(self.stream_id, data)

    def start(self) -> None:
        """Datagrams may go into the stream, beginning with those held."""
        tunnel = self.tunnel
        assert tunnel is not None
        self.started = True
        while self.outbound:
            tunnel.send(self.stream_id, self.outbound.popleft())

    def local_ready(self) -> None:
        """The local side can take datagrams, beginning with those held."""
        self.ready = True
        while self.inbound and not self.closed:
            self.send_local(self.inbound.popleft())

    # -- tunnel.Endpoint -----------------------------------------------------------------------

    def attach(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id

    def opened(self) -> None:
        pass

    def open_failed(self, failure: Failure, message: str) -> None:
        self.peer_reset()

    def deliver(self, data: bytes) -> None:
        if self.closed:
            return
        self.touch()
        if self.ready:
            self.send_local(data)
        else:
            self.inbound.append(data)

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
