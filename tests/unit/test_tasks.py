"""The task helper: a scope's tasks end with it, a connection's failure stays its own, a
service's failure ends the scope."""

from __future__ import annotations

import asyncio
import logging

import pytest

from composemirror import tasks


def test_what_still_runs_when_the_scope_ends_is_cancelled() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    async def scenario() -> None:
        async with tasks.scope() as spawner:
            spawner.spawn(forever(), name="forever")
            spawner.service(forever(), name="service")
            await asyncio.sleep(0)
        assert cancelled.is_set()

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_a_failed_connection_task_is_logged_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        raise ValueError("one connection's bug")

    async def scenario() -> str:
        async with tasks.scope() as spawner:
            spawner.spawn(fail(), name="doomed")
            survivor = spawner.spawn(asyncio.sleep(0.01), name="survivor")
            await survivor
            return "survived"

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(asyncio.wait_for(scenario(), 5)) == "survived"
    assert "task doomed failed" in caplog.text and "one connection's bug" in caplog.text


def test_a_failed_service_ends_the_scope_with_its_error() -> None:
    async def fail() -> None:
        raise OSError("the status file's disk is gone")

    async def scenario() -> None:
        async with tasks.scope() as spawner:
            spawner.service(fail(), name="status file")
            await asyncio.sleep(3600)

    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(asyncio.wait_for(scenario(), 5))
    assert caught.group_contains(OSError, match="disk is gone")


def test_a_kept_helper_that_fails_is_logged_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = 0

    async def helper() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise OSError(24, "Too many open files")

    async def scenario() -> None:
        async with tasks.scope() as spawner:
            kept = spawner.keep(helper, name="status file", delay=0.01)
            await kept

    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(scenario(), 5))
    assert runs == 3
    assert caplog.text.count("status file failed; restarting it in 0.01 s") == 2
