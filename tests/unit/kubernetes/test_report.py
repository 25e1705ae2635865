"""The agent's ready line and the sealed environment report."""

from __future__ import annotations

import base64

import pytest

from composemirror.podagent import (
    EnvReport,
    Ready,
    SealError,
    parse_ready,
    ready_line,
    seal,
    unseal,
)

KEY = b"k" * 32
REPORT = EnvReport(source="process", env={"DATABASE_URL": "postgres://u:pw@db/x", "É": "ü"})


def test_round_trip_and_secrecy() -> None:
    token = seal(KEY, REPORT)
    assert unseal(KEY, token) == REPORT
    blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"postgres" not in blob and b"DATABASE_URL" not in blob
    assert seal(KEY, REPORT) != token  # a fresh nonce each time


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: t[:-4],  # cut
        lambda t: t[:30] + ("A" if t[30] != "A" else "B") + t[31:],  # one character changed
        lambda t: "",
    ],
)
def test_tampering_is_refused(damage: object) -> None:
    token = seal(KEY, REPORT)
    with pytest.raises(SealError):
        unseal(KEY, damage(token))  # type: ignore[operator]


def test_other_key_is_refused() -> None:
    with pytest.raises(SealError, match="not sealed with this session's key"):
        unseal(b"x" * 32, seal(KEY, REPORT))


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (
            ready_line(version="0.1.0", port=47017, sealed="abc"),
            Ready(version="0.1.0", port=47017, env="abc"),
        ),
        ("agent INFO agent listening on tcp:127.0.0.1:47017", None),
        ("composemirror-agent ready version=0.1.0", None),
        ("composemirror-agent ready version=0.1.0 port=x env=a", None),
    ],
)
def test_parse_ready(line: str, parsed: Ready | None) -> None:
    assert parse_ready(line) == parsed
