"""The sidecar's link to the agent: how long it waits between attempts to reconnect."""

from __future__ import annotations

import warnings
from typing import Any, cast

import pytest

from composemirror.sidecar.tunnel import reconnect_wait


@pytest.mark.parametrize(("attempt", "least"), [(1, 0.05), (2, 0.1), (3, 0.2), (6, 1.6), (9, 2.0)])
def test_the_wait_doubles_from_50_ms_with_up_to_a_second_of_jitter_and_stays_under_2_s(
    attempt: int, least: float
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tenacity deprecates `initial`: no warning may remain
        wait = reconnect_wait()
    state = cast(Any, type("State", (), {"attempt_number": attempt})())
    waits = [wait(state) for _ in range(200)]
    assert all(least <= w <= min(least + 1.0, 2.0) for w in waits)
