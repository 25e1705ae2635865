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
import time
from collections.abc import Coroutine
from typing import Any

from composemirror.agent.resolver import Resolver
from composemirror.link import LinkAddress
from composemirror.mux import Bridge, DatagramBridge, Tunnel, reset_transport
from composemirror.protocol import (
    Connection,
    DnsQueryReceived,
    Failure,
    Proto,
    Role,
    StreamRequested,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
UDP_IDLE_TIMEOUT = 60.0


class Agent:
    """Opens what sidecars ask for. One instance serves every tunnel."""

    def __init__(self, key: bytes, resolver: Resolver) -> None:
        self.key = key
        self.resolver = resolver
        self.tasks: set[asyncio.Task[None]] = set()
        self.tunnels = 0

    def new_tunnel(self) -> Tunnel:
        self.tunnels += 1
        return Tunnel(Connection(Role.AGENT, self.key), self)

    async def serve(self, listen: LinkAddress) -> asyncio.Server:
        """Listen where the link address says."""
        server = await listen.listen(self.new_tunnel, backlog=512)
        log.info("agent listening on %s", listen)
        return server

    def stream_requested(self, tunnel: Tunnel, event: StreamRequested) -> None:
        endpoint: Bridge | DatagramBridge
        endpoint = Bridge() if event.proto == Proto.TCP else DatagramBridge()
        # Registered now, before connecting: early data in the same read waits in it.
        endpoint.attach(tunnel, event.stream_id)
        tunnel.endpoints[event.stream_id] = endpoint
        self._spawn(self._open(tunnel, event, endpoint))

    def dns_query(self, tunnel: Tunnel, event: DnsQueryReceived) -> None:
        self._spawn(self._answer(tunnel, event))

    async def _open(
        self, tunnel: Tunnel, event: StreamRequested, endpoint: Bridge | DatagramBridge
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
                await loop.create_datagram_endpoint(lambda: datagrams,
                                                    remote_addr=(event.host, event.port))
        except Exception as e:  # every way a connect can fail is reported to the client
            tunnel.endpoints.pop(stream_id, None)
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
        if isinstance(endpoint, DatagramBridge):
            self._spawn(_expire(endpoint))

    async def _answer(self, tunnel: Tunnel, event: DnsQueryReceived) -> None:
        answer = await self.resolver.resolve(event.payload)
        if tunnel.alive:
            tunnel.conn.send_dns_answer(event.query_id, answer)
            tunnel.flush()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def _expire(datagrams: DatagramBridge) -> None:
    """Close a UDP flow nobody used for a while, as a NAT table forgets it."""
    while datagrams.transport is not None and not datagrams.transport.is_closing():
        await asyncio.sleep(UDP_IDLE_TIMEOUT / 4)
        if time.monotonic() - datagrams.last_active > UDP_IDLE_TIMEOUT:
            datagrams.transport.close()


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
