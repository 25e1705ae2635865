"""The agent: serves tunnels from sidecars inside the target's network namespace.

Each authenticated tunnel may ask for outgoing TCP and UDP connections, which open here (so they
are the target's connections, with its routes and addresses), and for DNS answers, which come
from the target's resolver. Stdlib plus dnslib; no Docker, no Kubernetes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any, cast

from composemirror.agent.resolver import Resolver
from composemirror.bridge import Bridge, reset_transport
from composemirror.datagrams import FlowTable, StreamFlow
from composemirror.link import LinkAddress
from composemirror.protocol import (
    Connection,
    DnsQueryReceived,
    Failure,
    Proto,
    Role,
    StreamRequested,
)
from composemirror.tasks import Tasks
from composemirror.tunnel import Tunnel

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a new connection has to authenticate before the agent drops it."""


class Datagrams(StreamFlow, asyncio.DatagramProtocol):
    """The agent's UDP socket for one stream: the target's end of a datagram flow."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.closed:  # the stream went while the socket was being made
            transport.close()
            return
        self.local_ready()  # datagrams the peer sent while this socket was being made

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.from_local(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp stream %s: %s", self.stream_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def send_local(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    def release(self) -> None:
        super().release()
        if self.transport is not None:
            self.transport.close()


class Agent:
    """Opens what sidecars ask for. One instance serves every tunnel."""

    def __init__(
        self,
        key: bytes,
        resolver: Resolver,
        tasks: Tasks,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        """`handshake_timeout`: seconds a connection may stay unauthenticated (it holds only
        a small buffer meanwhile)."""
        self.key = key
        self.resolver = resolver
        self.tasks = tasks
        self.handshake_timeout = handshake_timeout
        self.flows = FlowTable()
        self.tunnels = 0
        tasks.service(self.flows.expire(), name="udp flow expiry")

    def new_tunnel(self) -> Tunnel:
        self.tunnels += 1
        return Tunnel(
            Connection(Role.AGENT, self.key), self, handshake_timeout=self.handshake_timeout
        )

    async def serve(self, listen: LinkAddress) -> asyncio.Server:
        """Listen where the link address says."""
        server = await listen.listen(self.new_tunnel, backlog=512)
        log.info("agent listening on %s", listen)
        return server

    def stream_requested(self, tunnel: Tunnel, event: StreamRequested) -> None:
        endpoint: Bridge | Datagrams
        endpoint = Bridge() if event.proto == Proto.TCP else Datagrams()
        # Registered now, before connecting: early data in the same read waits in it.
        endpoint.attach(tunnel, event.stream_id)
        tunnel.endpoints[event.stream_id] = endpoint
        self.tasks.spawn(
            self._open(tunnel, event, endpoint), name=f"open {event.host}:{event.port}"
        )

    def dns_query(self, tunnel: Tunnel, event: DnsQueryReceived) -> None:
        self.tasks.spawn(self._answer(tunnel, event), name=f"dns query {event.query_id}")

    async def _open(
        self, tunnel: Tunnel, event: StreamRequested, endpoint: Bridge | Datagrams
    ) -> None:
        loop = asyncio.get_running_loop()
        stream_id = event.stream_id
        try:
            if isinstance(endpoint, Bridge):
                bridge = endpoint
                await asyncio.wait_for(
                    loop.create_connection(lambda: bridge, event.host, event.port),
                    CONNECT_TIMEOUT,
                )
            else:
                datagrams = endpoint
                self.flows.add(datagrams)
                await loop.create_datagram_endpoint(
                    lambda: datagrams, remote_addr=(event.host, event.port)
                )
        except Exception as e:  # every way a connect can fail is reported to the client
            tunnel.endpoints.pop(stream_id, None)
            if isinstance(endpoint, Datagrams):
                endpoint.tunnel = None  # the stream fails below; there is nothing to reset
                endpoint.close()
            failure, message = _failure(e)
            log.debug("open %s:%s failed: %s", event.host, event.port, message)
            if tunnel.alive:
                tunnel.conn.fail_stream(stream_id, failure, message)
                tunnel.flush()
            return
        if isinstance(endpoint, Bridge) and (endpoint.finished or not tunnel.alive):
            # The client reset the stream, or the tunnel went, while we connected.
            if endpoint.transport is not None:
                reset_transport(endpoint.transport)
            return
        if not tunnel.alive:
            return
        tunnel.conn.accept_stream(stream_id)
        tunnel.flush()
        endpoint.start()

    async def _answer(self, tunnel: Tunnel, event: DnsQueryReceived) -> None:
        answer = await self.resolver.resolve(event.payload)
        if tunnel.alive:
            tunnel.conn.send_dns_answer(event.query_id, answer)
            tunnel.flush()


def _failure(error: BaseException) -> tuple[Failure, str]:
    if isinstance(error, TimeoutError):
        return Failure.TIMEOUT, "connect timed out"
    if isinstance(error, socket.gaierror):
        return Failure.NOT_FOUND, str(error)
    if isinstance(error, ConnectionRefusedError):
        return Failure.REFUSED, "connection refused"
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Failure.UNREACHABLE, os.strerror(error.errno)
    return Failure.OTHER, str(error)
