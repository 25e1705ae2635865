"""The sidecar's local connections on loopback: the app's socket, held by a `Bridge` while its
route is decided, then spliced to the local server's socket by a `Splicer` (as `proxy` does)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable

from composemirror.bridge import Bridge, Splicer
from composemirror.relay import Splice

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def spliced(handler: Handler, app_sends: Callable[[socket.socket], None]) -> socket.socket:
    """An app connection whose first bytes (`app_sends`) arrive before the splice exists; the
    app's socket, spliced to a server running `handler`."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    accepted: asyncio.Future[Bridge] = loop.create_future()

    def accept() -> Bridge:
        bridge = Bridge()
        accepted.set_result(bridge)
        return bridge

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    app = socket.create_connection(listener.sockets[0].getsockname()[:2])
    held = await accepted
    app_sends(app)
    await asyncio.sleep(0.1)  # read by the held connection (paused: the route is being decided)
    splicer = Splicer()
    await loop.create_connection(
        lambda: splicer.end(Splice.FAR), *server.sockets[0].getsockname()[:2]
    )
    assert held.transport is not None
    splicer.join(held.transport, *held.relay.unsent())
    listener.close()
    server.close()
    if app.fileno() != -1:  # the app may have closed it already
        app.setblocking(False)
    return app


async def receive_all(app: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(app, 1 << 16), 10):
        received += chunk
    return bytes(received)


async def digest_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    digest = hashlib.sha256()
    while chunk := await reader.read(1 << 16):
        digest.update(chunk)
    writer.write(digest.hexdigest().encode())
    await writer.drain()
    writer.close()


def test_early_bytes_and_eof_reach_the_server_and_its_answer_after_them_comes_back() -> None:
    payload = os.urandom(2 * 1024 * 1024 + 5)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        app = await spliced(digest_then_close, lambda app: app.sendall(b"early "))
        try:
            # Larger than the sockets' buffers: the splice's backpressure is exercised too.
            await loop.sock_sendall(app, payload)
            app.shutdown(socket.SHUT_WR)
            answer = await receive_all(app)
        finally:
            app.close()
        assert answer == hashlib.sha256(b"early " + payload).hexdigest().encode()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_an_eof_sent_before_the_splice_still_lets_the_server_answer() -> None:
    async def scenario() -> None:
        def ask_and_finish(app: socket.socket) -> None:
            app.sendall(b"question")
            app.shutdown(socket.SHUT_WR)

        app = await spliced(digest_then_close, ask_and_finish)
        try:
            answer = await receive_all(app)
        finally:
            app.close()
        assert answer == hashlib.sha256(b"question").hexdigest().encode()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_server_reset_resets_the_apps_connection() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    async def scenario() -> None:
        app = await spliced(reset, lambda app: app.sendall(b"x"))
        try:
            try:
                await receive_all(app)
            except ConnectionResetError:
                return
            raise AssertionError("the app's connection ended without a reset")
        finally:
            app.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_an_app_reset_before_the_splice_resets_the_servers_connection() -> None:
    async def scenario() -> None:
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def wait_for_the_end(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            try:
                await reader.read()
            except ConnectionResetError:
                ended.set_result("reset")
            else:
                ended.set_result("closed")
            writer.close()

        def reset(app: socket.socket) -> None:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            app.close()

        await spliced(wait_for_the_end, reset)
        assert await asyncio.wait_for(ended, 10) == "reset"

    asyncio.run(asyncio.wait_for(scenario(), 60))
