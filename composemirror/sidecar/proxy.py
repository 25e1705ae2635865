"""The transparent proxy: where each redirected TCP connection of the app goes.

The kernel gives the original destination; the DNS book gives the name the sidecar answered for
that address. With name, port and protocol the filter decides: remote connections become tunnel
streams, local ones are connected directly (a remotely answered name is resolved again locally
first, as mirrord does). A refused or failed remote connection resets the app's connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from composemirror.bridge import Bridge, Splicer, reset_transport
from composemirror.errors import TunnelClosed
from composemirror.filters import Filter, Protocol, Route, Scope, route_connection
from composemirror.protocol import Failure, Proto
from composemirror.relay import Splice
from composemirror.sidecar.dns import Book, Resolver
from composemirror.sidecar.status import Counters
from composemirror.sidecar.tunnel import TunnelClient
from composemirror.tasks import Tasks

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
CONNECT_TIMEOUT = 10.0


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address an app connected to before the REDIRECT rule sent it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port


@dataclass(frozen=True, slots=True, kw_only=True)
class Egress:
    """What both proxies (TCP here, UDP in `udp`) decide with and send through."""

    tunnels: TunnelClient
    book: Book
    resolver: Resolver
    counters: Counters
    scope: Scope
    outgoing: Filter | None
    mark: int
    """Set on the sidecar's own sockets, which the firewall lets through untouched."""

    def decide(
        self, address: str, port: int, protocol: Protocol
    ) -> tuple[Route, tuple[str, Route] | None]:
        """Where a new flow goes, and the name (and side) its address was answered for."""
        known = self.book.lookup(address)
        name = known[0] if known else None
        decision = route_connection(
            self.outgoing,
            name=name,
            address=ipaddress.ip_address(address),
            port=port,
            protocol=protocol,
            scope=self.scope,
        )
        log.debug("%s %s:%s (%s) -> %s", protocol, address, port, name or "no name", decision)
        return decision, known

    async def local_address(self, address: str, known: tuple[str, Route] | None) -> str:
        """Where to connect locally. A remotely answered address is the cluster's: locally its
        name may mean something else, so it is resolved again (as mirrord does)."""
        if known and known[1] == Route.REMOTE:
            return await self.resolver.local_address(known[0]) or address
        return address


class Proxy:
    """Accepts redirected TCP connections and routes each one."""

    def __init__(self, egress: Egress, tasks: Tasks) -> None:
        self.egress = egress
        self.tasks = tasks

    def accept(self) -> AppConnection:
        return AppConnection(self)

    def route(self, app: AppConnection) -> None:
        """Decide where a new connection goes; remote ones are on their way before returning."""
        assert app.transport is not None
        try:
            address, port = original_destination(app.transport.get_extra_info("socket"))
        except OSError:
            reset_transport(app.transport)
            return
        decision, known = self.egress.decide(address, port, "tcp")
        if decision == Route.REMOTE:
            self._remote(app, address, port)
        else:
            self.tasks.spawn(self._local(app, address, port, known), name=f"local {address}:{port}")

    def _remote(self, app: AppConnection, address: str, port: int) -> None:
        assert app.transport is not None
        try:
            self.egress.tunnels.current().open(Proto.TCP, address, port, app)
        except TunnelClosed as e:
            log.info("remote %s:%s failed: %s", address, port, e)
            self.egress.counters.tcp_failed += 1
            reset_transport(app.transport)
            return
        app.start()  # the app's first bytes go with the request (early data)

    async def _local(
        self, app: AppConnection, address: str, port: int, known: tuple[str, Route] | None
    ) -> None:
        assert app.transport is not None
        address = await self.egress.local_address(address, known)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.egress.mark)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("local %s:%s failed: %s", address, port, e)
            sock.close()
            self.egress.counters.tcp_failed += 1
            reset_transport(app.transport)
            return
        if app.finished or app.transport.is_closing():
            sock.close()  # the app gave up meanwhile
            return
        self.egress.counters.tcp_local += 1
        splicer = Splicer()
        await loop.create_connection(lambda: splicer.end(Splice.FAR), sock=sock)
        # What the app sent while we connected waits in its relay; it goes first.
        held, eof = app.relay.unsent()
        splicer.join(app.transport, held, eof)


class AppConnection(Bridge):
    """The app's side of a redirected connection: routed as soon as it is accepted."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy.route(self)

    def opened(self) -> None:
        self.proxy.egress.counters.tcp_remote += 1

    def open_failed(self, failure: Failure, message: str) -> None:
        log.info("remote connection failed: %s", message or failure.name.lower())
        self.proxy.egress.counters.tcp_failed += 1
        super().open_failed(failure, message)
