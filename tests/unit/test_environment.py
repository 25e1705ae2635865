"""Tests of composemirror.environment: which remote variables the app gets, and which value wins."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import pytest

from composemirror.config import EnvSettings
from composemirror.environment import merge, select_remote

REMOTE = {
    "DATABASE_URL": "postgresql://shop@postgres.shop.svc.cluster.local/shop",
    "ORDERS_URL": "http://orders.shop.svc.cluster.local:8080",
    "LOG_LEVEL": "info",
    "PATH": "/usr/local/bin:/usr/bin",
    "HOME": "/root",
    "HOSTNAME": "checkout-7d9f8-abcde",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "JAVA_TOOL_OPTIONS": "-Xmx512m",
}
IMPORTED_BY_DEFAULT = {"DATABASE_URL", "ORDERS_URL", "LOG_LEVEL"}


def env(**kwargs: object) -> EnvSettings:
    for key in ("override", "mapping"):
        if key in kwargs:
            kwargs[key] = MappingProxyType(kwargs[key])  # type: ignore[arg-type]
    return EnvSettings(**kwargs)  # type: ignore[arg-type]


def test_default_excludes_drop_the_pods_own_variables() -> None:
    assert set(select_remote(REMOTE, env())) == IMPORTED_BY_DEFAULT


def test_selected_values_are_the_remote_ones() -> None:
    assert select_remote(REMOTE, env()) == {k: REMOTE[k] for k in IMPORTED_BY_DEFAULT}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (env(include=("DATABASE_URL",)), {"DATABASE_URL"}),
        (env(include=("*_URL",)), {"DATABASE_URL", "ORDERS_URL"}),
        (env(include=("LOG_LEVE?",)), {"LOG_LEVEL"}),
        (env(include=("LOG_LEV?",)), set()),  # `?` is exactly one character
        (env(include=("*",)), IMPORTED_BY_DEFAULT),  # the default excludes still apply
        (env(include=("database_url",)), set()),  # names are case-sensitive, as in mirrord
        (env(exclude=("*_URL",)), {"LOG_LEVEL"}),
        (env(exclude=("ORDERS_UR?", "LOG_*")), {"DATABASE_URL"}),
        (env(exclude=("*",)), set()),
        (env(enabled=False), set()),
        (env(enabled=False, include=("*",)), set()),
    ],
)
def test_select_remote_globs(settings: EnvSettings, expected: set[str]) -> None:
    assert set(select_remote(REMOTE, settings)) == expected


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "HOME",
        "HOSTNAME",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_PORT_443_TCP",
        "PYTHONPATH",
        "JAVA_HOME",
        "TMPDIR",
        "RUST_LOG",
    ],
)
def test_default_excludes(name: str) -> None:
    assert select_remote({name: "x", "KEEP": "y"}, env()) == {"KEEP": "y"}


def merged(
    settings: EnvSettings,
    *,
    remote: Mapping[str, str] | None = None,
    env_file: Mapping[str, str] | None = None,
    compose: Mapping[str, str | None] | None = None,
) -> dict[str, str | None]:
    return merge(remote or {}, settings, env_file=env_file or {}, compose=compose or {})


def test_precedence_each_layer_wins_over_the_ones_below() -> None:
    # X is set in every layer, each other name in one fewer; each ends with its top layer's value.
    remote = {
        "X": "remote",
        "E": "remote",
        "M_VAR": "remote",
        "C": "remote",
        "O": "remote",
        "R": "remote",
    }
    env_file = {
        "X": "env_file",
        "E": "env_file",
        "M_VAR": "env_file",
        "C": "env_file",
        "O": "env_file",
    }
    compose: dict[str, str | None] = {"X": "compose", "C": "compose", "O": "compose"}
    settings = env(
        mapping={"^M_": "mapping", "^X$": "mapping", "^C$": "mapping"},
        override={"X": "override", "O": "override"},
    )
    assert merged(settings, remote=remote, env_file=env_file, compose=compose) == {
        "R": "remote",
        "E": "env_file",
        "M_VAR": "mapping",
        "C": "compose",
        "O": "override",
        "X": "override",
    }


def test_mapping_is_a_regex_search_on_names_and_spares_compose_values() -> None:
    settings = env(mapping={"_TIMEOUT$": "1000"})
    result = merged(
        settings,
        remote={"READ_TIMEOUT": "30", "TIMEOUT_MODE": "strict"},
        env_file={"WRITE_TIMEOUT": "60"},
        compose={"LOCAL_TIMEOUT": "5"},
    )
    assert result == {
        "READ_TIMEOUT": "1000",
        "TIMEOUT_MODE": "strict",
        "WRITE_TIMEOUT": "1000",
        "LOCAL_TIMEOUT": "5",
    }


def test_mapping_does_not_create_variables() -> None:
    assert merged(env(mapping={"NEW": "x"}), remote={"OLD": "y"}) == {"OLD": "y"}


def test_unset_is_last_and_case_insensitive() -> None:
    settings = env(unset=("debug", "Token"), override={"DEBUG": "1", "KEEP": "1"})
    result = merged(
        settings,
        remote={"TOKEN": "secret", "token": "secret2", "OTHER": "x"},
        compose={"Debug": "true"},
    )
    assert result == {"KEEP": "1", "OTHER": "x"}


def test_compose_none_values_are_kept() -> None:
    # `environment: {FROM_SHELL: null}` means "take it from the shell"; composemirror keeps that.
    result = merged(
        env(), remote={"FROM_SHELL": "remote"}, compose={"FROM_SHELL": None, "OTHER": None}
    )
    assert result == {"FROM_SHELL": None, "OTHER": None}


def test_override_wins_over_a_compose_none() -> None:
    assert merged(env(override={"A": "set"}), compose={"A": None}) == {"A": "set"}


def test_excluded_remote_values_do_not_leak_through_any_layer() -> None:
    result = merged(
        env(exclude=("SECRET_*",)), remote={"SECRET_KEY": "k", "PATH": "/x"}, compose={"APP": "1"}
    )
    assert result == {"APP": "1"}


def test_disabled_env_still_merges_local_layers() -> None:
    settings = env(enabled=False, override={"O": "1"})
    result = merged(settings, remote={"R": "1"}, compose={"C": "1"})
    assert result == {"C": "1", "O": "1"}


def test_merge_output_is_sorted_and_inputs_untouched() -> None:
    remote = {"B": "1", "A": "1"}
    compose: dict[str, str | None] = {"D": "1", "C": None}
    result = merged(env(), remote=remote, compose=compose)
    assert list(result) == ["A", "B", "C", "D"]
    assert remote == {"B": "1", "A": "1"} and compose == {"D": "1", "C": None}
