"""Fixtures of the end-to-end tests against the real cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.shop import Shop, remove_shop, shop_on_cluster


@pytest.fixture(scope="session")
def shop() -> Iterator[Shop]:
    """The sandbox's shop applied to the real cluster once for the test run (its namespace
    deleted at the end if this run created it)."""
    found, created = shop_on_cluster()
    try:
        yield found
    finally:
        remove_shop(created)
