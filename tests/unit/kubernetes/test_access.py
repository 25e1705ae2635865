"""The permissions composemirror uses, and the Role rules it asks for."""

from __future__ import annotations

import yaml

from composemirror.backends.kubernetes.access import (
    PERMISSIONS,
    Permission,
    render_rules,
    role_manifest,
)


def test_role_grants_every_permission() -> None:
    role = role_manifest("shop")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]  # type: ignore[attr-defined]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {(p.group, p.resource_path, p.verb) for p in PERMISSIONS} == granted
    assert all(verb not in {"*", "escalate", "bind", "impersonate"} for _, _, verb in granted)


def test_render_missing_rules() -> None:
    text = render_rules(
        [
            Permission("patch", "pods", "ephemeralcontainers"),
            Permission("create", "jobs", group="batch"),
            Permission("delete", "jobs", group="batch"),
        ],
        "shop",
    )
    assert text.startswith("# Role rules needed in namespace shop\n")
    assert yaml.safe_load(text) == [
        {"apiGroups": [""], "resources": ["pods/ephemeralcontainers"], "verbs": ["patch"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete"]},
    ]
