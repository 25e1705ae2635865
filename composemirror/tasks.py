"""The one way the sidecar and the agent start background tasks: under a TaskGroup that owns them.

A process opens one `scope()` for its lifetime and hands the `Tasks` it yields to what needs to
spawn. When the scope's body ends, the TaskGroup cancels what still runs, so nothing is cancelled
by hand and nothing outlives the process's loop. Bare `asyncio.create_task` is banned by ruff
(TID251) everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
"""Seconds before a failed helper (`Tasks.keep`) is started again."""


class _ScopeOver(Exception):
    """Raised at the end of a scope's body so that its TaskGroup cancels the children."""


class Tasks:
    """Spawns tasks into one TaskGroup."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def spawn(self, coroutine: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """A task serving one connection or request: if it fails, the failure is logged and
        the others go on."""
        return self._group.create_task(_logged(coroutine, name), name=name)

    def service(self, coroutine: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """A task the process lives by: if it fails, the scope ends and the failure leaves the
        process. For a helper that must not take the process down, see `keep`."""
        return self._group.create_task(coroutine, name=name)

    def keep(
        self,
        start: Callable[[], Coroutine[Any, Any, None]],
        *,
        name: str,
        delay: float = RESTART_DELAY,
    ) -> asyncio.Task[None]:
        """A helper that runs as long as the process (the agent link, the status file):
        `start()` makes its coroutine; if it fails, the failure is logged and it is started
        again after `delay` seconds, so a helper's error never ends the process."""
        return self._group.create_task(_kept(start, name, delay), name=name)


@contextlib.asynccontextmanager
async def scope() -> AsyncIterator[Tasks]:
    """A TaskGroup for the body's duration; what still runs when the body ends is cancelled.

    Errors leave as an ExceptionGroup, as from any TaskGroup: catch them with `except*`.
    """
    try:
        async with asyncio.TaskGroup() as group:
            yield Tasks(group)
            raise _ScopeOver
    except* _ScopeOver:
        pass


async def _kept(start: Callable[[], Coroutine[Any, Any, None]], name: str, delay: float) -> None:
    while True:
        try:
            await start()
            return
        except Exception:
            log.exception("%s failed; restarting it in %g s", name, delay)
        await asyncio.sleep(delay)


async def _logged(coroutine: Coroutine[Any, Any, None], name: str) -> None:
    try:
        await coroutine
    except Exception:
        log.exception("task %s failed", name)
