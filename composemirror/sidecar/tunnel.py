"""The sidecar's end of the tunnel: one long-lived, authenticated connection to the agent.

It connects (unix socket or TCP), proves the key, keeps the link alive with pings, and
reconnects with bounded backoff when the link drops. While it is down, `current()` raises at once,
so remote connections and lookups fail fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from composemirror.errors import TunnelClosed
from composemirror.link import LinkAddress
from composemirror.protocol import Connection, Role
from composemirror.tunnel import Tunnel

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
PING_INTERVAL = 5.0
SILENCE_LIMIT = 20.0
"""A link that has not been heard from for this long is dropped and reconnected."""


def reconnect_wait() -> wait_exponential_jitter:
    """The wait before each new attempt to reach the agent, in seconds: 0.05 s doubling with
    every failed attempt, plus up to 1 s of jitter (tenacity's default), at most 2 s."""
    return wait_exponential_jitter(multiplier=0.05, max=2.0)


class TunnelClient:
    """Keeps one tunnel to the agent up; hands it out while it is."""

    def __init__(self, address: LinkAddress, key: bytes, mark: int | None = None) -> None:
        self.address = address
        self.key = key
        self.mark = mark
        self.tunnel: Tunnel | None = None
        self.state = "connecting"
        self.error: str | None = None
        self.connects = 0

    def current(self) -> Tunnel:
        """The connected tunnel; raises TunnelClosed while there is none."""
        tunnel = self.tunnel
        if tunnel is None or not tunnel.alive:
            raise TunnelClosed(f"agent not connected ({self.error or self.state})")
        return tunnel

    def report(self) -> dict[str, Any]:
        return {
            "agent": self.state,
            "error": self.error,
            "connects": self.connects,
            "streams": len(self.tunnel.endpoints) if self.tunnel else 0,
        }

    async def run(self) -> None:
        """Connect, serve until the link drops, reconnect; forever."""
        while True:
            tunnel = await self._connect()
            self.tunnel, self.state, self.error = tunnel, "connected", None
            self.connects += 1
            log.info("connected to the agent at %s", self.address)
            reason = await self._keep_alive(tunnel)
            self.tunnel, self.state, self.error = None, "disconnected", reason
            log.warning("agent link down: %s", reason)

    async def _connect(self) -> Tunnel:
        retrying = AsyncRetrying(
            wait=reconnect_wait(),
            retry=retry_if_exception_type((OSError, TimeoutError, TunnelClosed)),
            before_sleep=self._note_failure,
        )
        async for attempt in retrying:
            with attempt:
                return await asyncio.wait_for(self._open(), CONNECT_TIMEOUT)
        raise AssertionError("unreachable: the retry loop never stops")

    async def _open(self) -> Tunnel:
        conn = Connection(Role.CLIENT, self.key)
        _, tunnel = await self.address.dial(lambda: Tunnel(conn), mark=self.mark)
        try:
            await tunnel.authenticated
        except BaseException:
            # Failed, or timed out by the caller: this connection is not kept, so close it.
            tunnel.close("the handshake did not complete")
            raise
        return tunnel

    def _note_failure(self, retry_state: Any) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        self.state, self.error = "connecting", str(error) or type(error).__name__
        log.debug("agent not reachable at %s: %s", self.address, self.error)

    async def _keep_alive(self, tunnel: Tunnel) -> str:
        """Ping the agent until the link ends; return why it ended."""
        while tunnel.alive:
            with contextlib.suppress(TimeoutError):
                # Shielded: the timeout must not cancel the tunnel's own future.
                return await asyncio.wait_for(asyncio.shield(tunnel.done), PING_INTERVAL)
            if time.monotonic() - tunnel.last_heard > SILENCE_LIMIT:
                tunnel.close(f"no answer from the agent for {SILENCE_LIMIT:.0f} s")
            elif tunnel.alive:
                tunnel.conn.ping()
                tunnel.flush()
        return tunnel.done.result()
