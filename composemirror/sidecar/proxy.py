"""The transparent proxy: where each redirected TCP connection of the app goes.

The kernel gives the original destination; the DNS book gives the name the app asked for that
address (and, for a stand-in address, the address it stands for). With name, port and protocol
the filter decides: remote connections become tunnel streams, local ones are connected directly
(a remotely answered name is resolved again locally first, as mirrord does). A remote
connection's stream is usually opened before the app's handshake completes (`synqueue` held its
SYN until the agent answered) and is taken here by its 4-tuple; one that comes unheld (the queue
was full or not read) is opened on accept, and a failure then resets it.
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
from composemirror.sidecar.dns import Answered, Book, Resolver
from composemirror.sidecar.status import Counters
from composemirror.sidecar.synqueue import FourTuple, SynQueue
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


def redirected(original: tuple[str, int], local: tuple[str, int]) -> bool:
    """Whether a connection that reached the proxy at `local` (its listening address) with
    original destination `original` was sent here by the firewall.

    The rules never redirect loopback, so a loopback original destination (the proxy's own
    127.0.0.1:15001 among them) was dialled directly: proxying it would connect to the
    destination it already reached, the proxy itself, over and over.
    """
    if original == local:
        return False
    return not ipaddress.ip_address(original[0]).is_loopback


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

    def decide(self, address: str, port: int, protocol: Protocol) -> Decision:
        """Where a new flow to `address`:`port` goes, by the name the app asked for it."""
        known = self.book.lookup(address)
        destination = known.address if known else address
        route = route_connection(
            self.outgoing,
            name=known.name if known else None,
            address=ipaddress.ip_address(destination),
            port=port,
            protocol=protocol,
            scope=self.scope,
            side=known.side if known else None,
        )
        name = known.name if known else "no name"
        log.debug("%s %s:%s (%s) -> %s %s", protocol, address, port, name, route, destination)
        return Decision(route=route, destination=destination, known=known)

    async def local_address(self, decision: Decision) -> str:
        """Where to connect locally. A remotely answered address is the cluster's: locally its
        name may mean something else, so it is resolved again (as mirrord does)."""
        known = decision.known
        if known and known.side == Route.REMOTE:
            return await self.resolver.local_address(known.name) or decision.destination
        return decision.destination


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Where one connection goes."""

    route: Route
    destination: str
    """The address it is made to: the original one, or what a stand-in address stands for."""
    known: Answered | None
    """The name the app asked for the original address, if it asked the sidecar's DNS."""


class Proxy:
    """Accepts redirected TCP connections and routes each one."""

    def __init__(self, egress: Egress, tasks: Tasks) -> None:
        self.egress = egress
        self.tasks = tasks
        self.syns: SynQueue | None = None
        """The held SYNs' queue, whose opened streams accepted connections take."""

    def accept(self) -> AppConnection:
        return AppConnection(self)

    def route(self, app: AppConnection) -> None:
        """Decide where a new connection goes; remote ones are on their way before returning."""
        assert app.transport is not None
        sock = app.transport.get_extra_info("socket")
        try:
            address, port = original_destination(sock)
            local = sock.getsockname()
        except OSError:
            reset_transport(app.transport)
            return
        if not redirected((address, port), local):
            peer = app.transport.get_extra_info("peername") or ("?", 0)
            log.warning(
                "refused %s:%s -> %s:%s: not redirected by the firewall (the proxy's own port)",
                peer[0], peer[1], address, port,
            )  # fmt: skip
            self.egress.counters.tcp_refused += 1
            reset_transport(app.transport)
            return
        source = app.transport.get_extra_info("peername")
        connection = FourTuple(source[0], source[1], address, port)
        opened = self.syns.take(connection) if self.syns else None
        if opened is not None:
            # The stream was opened while the app's SYN was held: it takes over the socket.
            transport = app.transport
            transport.set_protocol(opened)
            opened.connection_made(transport)
            opened.start()
            return
        decision = self.egress.decide(address, port, "tcp")
        if decision.route == Route.REMOTE:
            self._remote(app, decision.destination, port)
        else:
            self.tasks.spawn(self._local(app, port, decision), name=f"local {address}:{port}")

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

    async def _local(self, app: AppConnection, port: int, decision: Decision) -> None:
        assert app.transport is not None
        address = await self.egress.local_address(decision)
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
    """The app's side of a redirected connection: routed as soon as it is accepted, or, opened
    for a held SYN (`pending` set), given its socket when the proxy accepts it."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.pending: tuple[SynQueue, FourTuple] | None = None
        """The queue and connection whose held SYN waits for this stream's outcome."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.pending is None:
            self.proxy.route(self)

    def opened(self) -> None:
        self.proxy.egress.counters.tcp_remote += 1
        if self.pending is not None:
            syns, connection = self.pending
            syns.paired(connection, self)
            syns.resolved(connection, None)

    def open_failed(self, failure: Failure, message: str) -> None:
        log.info("remote connection failed: %s", message or failure.name.lower())
        self.proxy.egress.counters.tcp_failed += 1
        super().open_failed(failure, message)
        if self.pending is not None:
            syns, connection = self.pending
            syns.resolved(connection, failure, message)

    def peer_reset(self) -> None:
        super().peer_reset()
        if self.pending is not None:
            # The link to the agent went while the SYN was held: refused, not left hanging.
            syns, connection = self.pending
            syns.resolved(connection, Failure.RESET, "the link to the agent went")

    def abandon(self) -> None:
        """Reset a stream no accepted connection came for."""
        self._perform(self.relay.on_socket_lost())
