"""`agent:` settings (mirrord's names): values taken, bad ones refused with their key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from composemirror.config import AgentSettings, load
from composemirror.errors import ConfigError


def agent(block: Any) -> AgentSettings:
    config = load(
        {"target": "deployment/checkout", "services": ["web"], "agent": block},
        source="compose.yaml",
        base_dir=Path("/project"),
    )
    return config.agent


def test_defaults() -> None:
    settings = agent(None)
    assert (settings.image, settings.image_pull_policy, settings.ttl, settings.ephemeral) == (
        "python:3.12-slim",
        "IfNotPresent",
        30,
        True,
    )


@pytest.mark.parametrize(
    ("block", "field", "value"),
    [
        ({"image": "registry.local/python:3.12"}, "image", "registry.local/python:3.12"),
        (
            {"image": {"registry": "registry.local/python", "tag": "3.13"}},
            "image",
            "registry.local/python:3.13",
        ),
        ({"image_pull_policy": "Never"}, "image_pull_policy", "Never"),
        (
            {"image_pull_secrets": [{"name": "regcred"}, "other"]},
            "image_pull_secrets",
            ("regcred", "other"),
        ),
        ({"ttl": 5}, "ttl", 5),
        ({"ephemeral": False}, "ephemeral", False),
        ({"namespace": "agents"}, "namespace", "agents"),
        ({"startup_timeout": 120}, "startup_timeout", 120),
    ],
)
def test_values(block: dict[str, Any], field: str, value: Any) -> None:
    assert getattr(agent(block), field) == value


@pytest.mark.parametrize(
    ("block", "path", "message"),
    [
        ({"image": 3}, "x-composemirror.agent.image", "expected an image reference"),
        ({"image": "a b"}, "x-composemirror.agent.image", "expected an image reference"),
        ({"image": {"tag": "1"}}, "x-composemirror.agent.image.registry", "expected an image name"),
        (
            {"image_pull_policy": "always"},
            "x-composemirror.agent.image_pull_policy",
            "'always' is not a pull policy",
        ),
        (
            {"image_pull_secrets": "regcred"},
            "x-composemirror.agent.image_pull_secrets",
            "expected a list",
        ),
        (
            {"image_pull_secrets": [{"secret": "x"}]},
            "x-composemirror.agent.image_pull_secrets[0]",
            "expected a Secret name",
        ),
        ({"ttl": 0}, "x-composemirror.agent.ttl", "from 1 to 3600"),
        ({"ttl": True}, "x-composemirror.agent.ttl", "from 1 to 3600"),
        ({"port": 80}, "x-composemirror.agent.port", "from 1024 to 65535"),
        ({"namespace": "Bad_NS"}, "x-composemirror.agent.namespace", "expected a namespace name"),
        ({"imag": "x"}, "x-composemirror.agent.imag", "unknown key"),
    ],
)
def test_bad_values(block: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as failure:
        agent(block)
    assert f"compose.yaml: {path}: " in failure.value.message
    assert message in failure.value.message


def test_mirrord_keys_without_meaning_are_reported() -> None:
    config = load(
        {
            "target": "deployment/checkout",
            "services": ["web"],
            "agent": {"privileged": True, "log_level": "debug", "ttl": 5},
        },
        source="compose.yaml",
        base_dir=Path("/project"),
    )
    assert {"x-composemirror.agent.privileged", "x-composemirror.agent.log_level"} <= set(
        config.ignored
    )
