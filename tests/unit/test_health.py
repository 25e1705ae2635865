"""Health as facts: a sidecar's readiness, a container's namespace, a sidecar's rules report, and
the engine's timestamps they are judged by."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from composemirror import namespaces, ops
from composemirror.engine import Container, _container, parse_timestamp
from composemirror.sidecar import status


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_sidecar_is_ready_once_linked_and_stays_so_through_a_short_drop() -> None:
    clock = Clock()
    link, rules = ["connecting"], ["in place"]
    health = status.Health(
        link_state=lambda: link[0], rules_state=lambda: rules[0], grace=10, clock=clock
    )
    assert not health.healthy()  # rules in place, but never linked yet
    link[0] = "connected"
    assert health.healthy()
    link[0], clock.now = "disconnected", 10.0
    assert health.healthy()  # a reconnect does not flap
    clock.now = 10.5
    assert not health.healthy()
    link[0] = "connected"
    assert health.healthy()
    rules[0] = "failed"
    assert not health.healthy()


def test_the_report_holds_link_rules_and_counters_apart() -> None:
    report = status.report(status.Counters(dns_remote=2), {"agent": "connected"}, {"restored": 1})
    assert report["agent"] == "connected"
    assert report["rules"] == {"restored": 1}
    assert report["counters"]["dns_remote"] == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T04:08:00.705861366Z", datetime(2026, 12, 1, 4, 8, 0, 705861, tzinfo=UTC)),
        ("2026-12-01T04:08:00.7058613Z", datetime(2026, 12, 1, 4, 8, 0, 705861, tzinfo=UTC)),
        ("2026-12-01T04:08:00Z", datetime(2026, 12, 1, 4, 8, 0, tzinfo=UTC)),
        ("2026-12-01T05:08:00.5+01:00", datetime(2026, 12, 1, 4, 8, 0, 500000, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
    ],
)
def test_engine_timestamps(text: str, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


def test_go_trims_fractions_so_they_do_not_compare_as_text() -> None:
    earlier, later = "2026-12-01T04:08:00.70586Z", "2026-12-01T04:08:00.705861Z"
    assert (earlier < later) is False  # as text, the wrong way round
    assert parse_timestamp(earlier) < parse_timestamp(later)  # type: ignore[operator]


def test_an_inspected_container_carries_its_network_mode_and_start() -> None:
    found = _container(
        {
            "Id": "abc",
            "Name": "/shop-web-1",
            "Config": {"Labels": {}, "Env": [], "Image": "web"},
            "State": {"Status": "running", "StartedAt": "2026-12-01T04:08:00Z"},
            "HostConfig": {"NetworkMode": "container:def"},
        }
    )
    assert found.network_mode == "container:def"
    assert found.started_at == datetime(2026, 12, 1, 4, 8, tzinfo=UTC)
    assert namespaces.joined_id(found) == "def"


def at(second: int) -> datetime:
    return datetime(2026, 12, 1, 4, 0, second, tzinfo=UTC)


def container(
    name: str, *, id: str, mode: str = "", started: int = 0, state: str = "running"
) -> Container:
    return Container(
        id=id,
        name=name,
        labels={},
        state=state,
        health=None,
        env={},
        image="i",
        network_mode=mode,
        started_at=at(started),
    )


SIDECAR = container("web-mirror", id="s1", started=1)


@pytest.mark.parametrize(
    ("joined", "owner", "expected"),
    [
        (container("web", id="a", mode="container:s1", started=2), SIDECAR, None),
        (
            container("web", id="a", mode="container:s1", started=2),
            container("web-mirror", id="s1", started=3),
            "web-mirror restarted at 04:00:03 UTC, after web joined it",
        ),
        (
            container("web", id="a", mode="container:old", started=2),
            SIDECAR,
            "web joined an earlier web-mirror (recreated since)",
        ),
        (
            container("web", id="a", mode="container:s1", started=2),
            container("web-mirror", id="s1", started=1, state="exited"),
            "web-mirror is exited: web has no network",
        ),
        (
            container("web", id="a", mode="container:s1", started=2),
            None,
            "web joined web-mirror, which no longer exists",
        ),
        (container("web", id="a", mode="container:s1", state="exited"), None, None),
    ],
    ids=["same", "owner-restarted", "owner-recreated", "owner-stopped", "owner-gone", "stopped"],
)
def test_a_stale_join(joined: Container, owner: Container | None, expected: str | None) -> None:
    reason = namespaces.stale_join(joined, owner, owner_name="web-mirror")
    assert (reason is None) == (expected is None)
    if expected is not None:
        assert reason is not None and reason.startswith(expected)


def row(rules: object, state: str = "running") -> ops.ServiceStatus:
    return ops.ServiceStatus(
        service="web-mirror",
        container="shop-web-mirror-1",
        role="sidecar",
        state=state,
        health="healthy",
        link={"agent": "connected", "rules": rules},
    )


@pytest.mark.parametrize(
    ("rules", "ok", "detail"),
    [
        ({"state": "in place", "checked": 995, "restored": 0}, True, "in place"),
        (
            {"state": "in place", "checked": 995, "restored": 2, "restored_at": 0, "drift": "x"},
            False,
            "restored 2 time(s), last at 00:00:00 UTC",
        ),
        ({"state": "failed", "checked": 995, "error": "denied"}, False, "failed: denied"),
        ({"state": "in place", "checked": 900, "restored": 0}, False, "last checked 100 s ago"),
        (None, False, "no report from the sidecar"),
    ],
    ids=["in-place", "restored", "failed", "not-checking", "no-report"],
)
def test_the_rules_check(rules: object, ok: bool, detail: str) -> None:
    check = ops.rules_check(row(rules), now=1000)
    assert check.name == "interception rules of web-mirror"
    assert check.ok is ok and check.detail.startswith(detail), check
    if "restored" in detail:
        assert check.hint is not None and "NET_ADMIN from web" in check.hint
