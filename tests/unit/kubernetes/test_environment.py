"""The target's environment: copied into the agent's spec, and resolved from API objects."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from composemirror.backends.kubernetes.environment import (
    copy_env,
    parse_quantity,
    referenced,
    resolve_env,
)
from tests.unit.kubernetes.fake import FakeCluster


def checkout() -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    cluster = FakeCluster()
    pod = cluster.get("pods", "checkout-7d9f8b6c5-x2x4q", "shop")
    return (
        pod,
        {"checkout-config": cluster.get("configmaps", "checkout-config", "shop")},
        {"checkout-secrets": cluster.get("secrets", "checkout-secrets", "shop")},
    )


def test_resolves_what_the_kubelet_would() -> None:
    pod, configmaps, secrets = checkout()
    resolved = resolve_env(pod, "checkout", configmaps=configmaps, secrets=secrets)
    assert resolved.env == {
        # envFrom first (prefix applied), then env in order
        "CFG_database_url": "postgres://app@postgres.shop.svc.cluster.local:5432/shop",
        "CFG_orders_url": "http://orders.shop.svc.cluster.local:8080/orders",
        "db_password": "s3cret",
        "API_TOKEN": "tok-123",
        "APP_MODE": "production",
        "DATABASE_URL": "postgres://app@postgres.shop.svc.cluster.local:5432/shop",
        "DB_PASSWORD": "s3cret",
        "POD_NAME": "checkout-7d9f8b6c5-x2x4q",
        "POD_IP": "10.244.0.11",
        "TEAM": "payments",
        "MEMORY_LIMIT_MI": "256",
        "CPU_REQUEST": "250",
        "GREETING": "hello checkout-7d9f8b6c5-x2x4q, $(literal)",
    }
    assert resolved.unresolved == []  # OPTIONAL_FLAG is optional: left out silently


def test_missing_objects_are_reported_not_guessed() -> None:
    pod, _, _ = checkout()
    resolved = resolve_env(pod, "checkout", configmaps={}, secrets={})
    assert "DATABASE_URL" not in resolved.env
    assert set(resolved.unresolved) == {
        "envFrom ConfigMap checkout-config: not found",
        "envFrom Secret checkout-secrets: not found",
        "DATABASE_URL: ConfigMap checkout-config not found",
        "DB_PASSWORD: Secret checkout-secrets not found",
    }


def test_references() -> None:
    pod, _, _ = checkout()
    container = pod["spec"]["containers"][0]
    assert referenced(container) == ({"checkout-config", "absent"}, {"checkout-secrets"})


def test_copy_renames_and_points_resources_at_the_target() -> None:
    pod, _, _ = checkout()
    container = pod["spec"]["containers"][0]
    env, env_from = copy_env(container)
    by_name = {e["name"]: e for e in env}
    assert list(by_name) == [f"CMENV_{e['name']}" for e in container["env"]]
    assert by_name["CMENV_MEMORY_LIMIT_MI"]["valueFrom"]["resourceFieldRef"] == {
        "resource": "limits.memory",
        "divisor": "1Mi",
        "containerName": "checkout",
    }
    assert by_name["CMENV_DB_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "checkout-secrets", "key": "db_password"}
    }
    # a reference to an earlier variable follows the rename; the $$ escape stays
    assert by_name["CMENV_GREETING"]["value"] == "hello $(CMENV_POD_NAME), $$(literal)"
    assert env_from == [
        {"configMapRef": {"name": "checkout-config"}, "prefix": "CMENV_CFG_"},
        {"secretRef": {"name": "checkout-secrets"}, "prefix": "CMENV_"},
    ]
    assert "CMENV_" not in str(container)  # the target's own spec is untouched


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", Fraction(1)),
        ("250m", Fraction(1, 4)),
        ("1Gi", Fraction(2**30)),
        ("128Mi", Fraction(128 * 2**20)),
        ("1k", Fraction(1000)),
        ("1e3", Fraction(1000)),
        ("1.5", Fraction(3, 2)),
        ("100n", Fraction(1, 10**7)),
    ],
)
def test_quantity(text: str, value: Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Mi", "1Q", "one"])
def test_bad_quantity(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("resources", "ref", "expected"),
    [
        ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu"}, "1"),  # ceil, as the kubelet
        ({"limits": {"cpu": "500m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "500"),
        ({"requests": {"memory": "64Mi"}}, {"resource": "requests.memory"}, str(64 * 2**20)),
        ({"limits": {"memory": "1Gi"}}, {"resource": "requests.memory", "divisor": "1Mi"}, "0"),
    ],
)
def test_resource_field(resources: dict[str, object], ref: dict[str, str], expected: str) -> None:
    pod = {
        "metadata": {},
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "resources": resources,
                    "env": [{"name": "X", "valueFrom": {"resourceFieldRef": ref}}],
                }
            ]
        },
    }
    assert resolve_env(pod, "a", configmaps={}, secrets={}).env == {"X": expected}


def test_unlimited_resource_is_not_guessed() -> None:
    pod = {
        "metadata": {},
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "resources": {"requests": {"cpu": "1"}},
                    "env": [
                        {"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
                    ],
                }
            ]
        },
    }
    resolved = resolve_env(pod, "a", configmaps={}, secrets={})
    assert resolved.env == {}
    assert "node's allocatable" in resolved.unresolved[0]
