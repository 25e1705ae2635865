"""What the CLI and an agent in a Kubernetes pod agree on: its settings' variables, its ready line
and the environment that line carries, sealed. Neutral: both sides import it.

The line goes to the pod's log, which anyone allowed `pods/log` can read, so the target's
environment in it is encrypted and authenticated with the session's tunnel key: a keystream of
HMAC-SHA256 in counter mode (a PRF in CTR mode) and an HMAC-SHA256 tag over nonce and ciphertext
(encrypt-then-MAC), keys derived from the tunnel key by HMAC. Stdlib only; pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

READY_PREFIX = "composemirror-agent ready"
ENV_KEY = "COMPOSEMIRROR_AGENT_KEY"
"""The tunnel key (from the session's Secret, by `secretKeyRef`)."""
ENV_PORT = "COMPOSEMIRROR_AGENT_PORT"
"""The TCP port the agent listens on, on 127.0.0.1 inside the pod."""
ENV_TTL = "COMPOSEMIRROR_AGENT_TTL"
"""Seconds with no link connected, after the last one, after which the agent exits."""
ENV_FIRST_LINK_TIMEOUT = "COMPOSEMIRROR_AGENT_FIRST_LINK_TIMEOUT"
"""Seconds the agent waits for its first link (default `FIRST_LINK_TIMEOUT`)."""
FIRST_LINK_TIMEOUT = 600.0
"""Seconds the agent waits for its first link before it exits: after the agent is ready, `up`
may still build images, and compose pull or build the app's and recreate the stack, before a
sidecar dials it (`agent.ttl` applies once one has)."""
ENV_HANDSHAKE_TIMEOUT = "COMPOSEMIRROR_AGENT_HANDSHAKE_TIMEOUT"
"""Seconds a connection has to authenticate; set only when not the agent's default."""
ENV_TARGETED = "COMPOSEMIRROR_AGENT_TARGETED"
"""Set when the agent shares the target's process namespace (an ephemeral container)."""
SPEC_ENV_PREFIX = "CMENV_"
"""Prefix of the target's env/envFrom copied into the agent's spec for the kubelet to resolve."""
NONCE_SIZE = 16
TAG_SIZE = 32
EnvSource = Literal["process", "spec", "none"]


class SealError(ValueError):
    """A sealed report that this key did not seal, or that was altered or cut."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """The agent's ready line, parsed."""

    version: str
    """composemirror's version in the agent."""
    port: int
    """TCP port on 127.0.0.1 inside the pod."""
    env: str
    """The sealed environment report (see `seal`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvReport:
    """What the agent found: the target process's environment, or its own copy of the spec's."""

    source: EnvSource
    """`process`: /proc/PID/environ of the target; `spec`: the kubelet-resolved copy of the
    target container's env/envFrom; `none`: nothing to import (targetless)."""
    env: Mapping[str, str]


def ready_line(*, version: str, port: int, sealed: str) -> str:
    """`composemirror-agent ready version=V port=P env=TOKEN` (one line, no secrets in clear)."""
    return f"{READY_PREFIX} version={version} port={port} env={sealed}"


def parse_ready(line: str) -> Ready | None:
    """The ready line's fields, or None when `line` is not a ready line."""
    if not line.startswith(READY_PREFIX + " "):
        return None
    fields = dict(word.partition("=")[::2] for word in line[len(READY_PREFIX) :].split())
    try:
        return Ready(version=fields["version"], port=int(fields["port"]), env=fields["env"])
    except (KeyError, ValueError):
        return None


def seal(key: bytes, report: EnvReport, *, nonce: bytes | None = None) -> str:
    """`report` encrypted and authenticated with `key`, as URL-safe base64 without padding."""
    plain = zlib.compress(
        json.dumps(
            {"source": report.source, "env": dict(report.env)}, separators=(",", ":")
        ).encode()
    )
    nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
    cipher = _xor(plain, _keystream(_derive(key, b"enc"), nonce, len(plain)))
    tag = hmac.new(_derive(key, b"mac"), nonce + cipher, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(nonce + cipher + tag).rstrip(b"=").decode()


def unseal(key: bytes, token: str) -> EnvReport:
    """The report `seal` made with `key`. Raises SealError when it is not authentic."""
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError as e:
        raise SealError("the environment report is not base64") from e
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise SealError("the environment report is cut short")
    nonce, cipher, tag = blob[:NONCE_SIZE], blob[NONCE_SIZE:-TAG_SIZE], blob[-TAG_SIZE:]
    expected = hmac.new(_derive(key, b"mac"), nonce + cipher, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expected):
        raise SealError("the environment report was not sealed with this session's key")
    data = json.loads(
        zlib.decompress(_xor(cipher, _keystream(_derive(key, b"enc"), nonce, len(cipher))))
    )
    source = data["source"]
    if source not in ("process", "spec", "none"):
        raise SealError(f"unknown environment source {source!r}")
    return EnvReport(source=source, env={str(k): str(v) for k, v in data["env"].items()})


def _derive(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, b"composemirror env report " + purpose, hashlib.sha256).digest()


def _keystream(key: bytes, nonce: bytes, size: int) -> bytes:
    blocks = (
        hmac.new(key, nonce + i.to_bytes(8, "big"), hashlib.sha256).digest()
        for i in range(-(-size // 32))
    )
    return b"".join(blocks)[:size]


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(data), "big")
