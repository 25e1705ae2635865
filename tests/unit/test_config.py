"""Tests of composemirror.config.load: the x-composemirror block, mirrord's keys, and its errors."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from composemirror.config import Config, Target, load
from composemirror.errors import ConfigError

SOURCE = "compose.yaml"
BASE = Path("/project")


def load_block(block: Any) -> Config:
    return load(block, source=SOURCE, base_dir=BASE)


def minimal(**extra: Any) -> dict[str, Any]:
    return {"target": "deployment/checkout", "services": ["web"], **extra}


# A mirrord config's `feature` block, as its docs write it, pasted in unchanged.
MIRRORD_FEATURE: dict[str, Any] = {
    "env": {
        "include": "DATABASE_*;ORDERS_URL",
        "override": {"APP_MODE": "local", "WORKERS": 4},
        "env_file": "cluster.env",
        "mapping": {".+_TIMEOUT": "1000", "LOG_.+_VERBOSITY": "debug"},
        "unset": ["DEBUG", "trace"],
        "load_from_process": False,
    },
    "fs": {"mode": "write", "read_write": ".+\\.json", "read_only": ["^/etc/.*"]},
    "hostname": True,
    "copy_target": {"scale_down": False},
    "network": {
        "incoming": {"mode": "steal", "http_filter": {"header_filter": "host: api\\..+"}},
        "outgoing": {
            "tcp": True,
            "udp": False,
            "ignore_localhost": False,
            "unix_streams": "bear.+",
            "filter": {
                "local": ["tcp://1.1.1.0/24:1337", "1.1.5.0/24", "google.com", ":53"],
            },
        },
        "dns": {"enabled": True, "filter": {"remote": ["*.svc.cluster.local", "my-service"]}},
        "ipv6": False,
    },
}


def test_full_block() -> None:
    config = load_block(
        {
            "target": {"path": "deploy/checkout/container/app", "namespace": "shop"},
            "kube_context": "staging",
            "services": ["web", "worker"],
            "hosts": {"Postgres.Shop.svc.cluster.local.": "db", "redis.shop": "cache"},
            "feature": MIRRORD_FEATURE,
            "agent": {"ttl": 30},
            "operator": False,
        }
    )
    assert config.source == SOURCE
    assert config.target == Target(kind="deployment", name="checkout", container="app")
    assert str(config.target) == "deployment/checkout/container/app"
    assert config.namespace == "shop"
    assert config.context == "staging"
    assert config.services == ("web", "worker")
    assert dict(config.hosts) == {"postgres.shop.svc.cluster.local": "db", "redis.shop": "cache"}

    env = config.env
    assert env.enabled
    assert env.include == ("DATABASE_*", "ORDERS_URL")
    assert env.exclude == ()
    assert dict(env.override) == {"APP_MODE": "local", "WORKERS": "4"}
    assert env.env_file == BASE / "cluster.env"
    assert dict(env.mapping) == {".+_TIMEOUT": "1000", "LOG_.+_VERBOSITY": "debug"}
    assert env.unset == ("DEBUG", "trace")

    network = config.network
    assert (network.tcp, network.udp, network.dns_enabled) == (True, False, True)
    assert network.outgoing is not None and network.outgoing.mode == "local"
    assert [r.text for r in network.outgoing.rules] == [
        "tcp://1.1.1.0/24:1337",
        "1.1.5.0/24",
        "google.com",
        ":53",
    ]
    assert network.dns is not None and network.dns.mode == "remote"
    assert [r.text for r in network.dns.rules] == ["*.svc.cluster.local", "my-service"]

    assert config.agent.ttl == 30
    assert set(config.ignored) == {
        "x-composemirror.operator",
        "x-composemirror.feature.fs",
        "x-composemirror.feature.hostname",
        "x-composemirror.feature.copy_target",
        "x-composemirror.feature.env.load_from_process",
        "x-composemirror.feature.network.incoming",
        "x-composemirror.feature.network.ipv6",
        "x-composemirror.feature.network.outgoing.ignore_localhost",
        "x-composemirror.feature.network.outgoing.unix_streams",
    }


def test_loading_does_not_modify_the_block() -> None:
    block = minimal(feature=copy.deepcopy(MIRRORD_FEATURE))
    before = copy.deepcopy(block)
    load_block(block)
    assert block == before


def test_minimal_block_defaults() -> None:
    config = load_block(minimal())
    assert config.namespace is None and config.context is None
    assert dict(config.hosts) == {}
    assert config.env.enabled and config.env.env_file is None
    assert config.network.tcp and config.network.udp and config.network.dns_enabled
    assert config.network.outgoing is None and config.network.dns is None
    assert config.ignored == ()


def test_config_is_immutable() -> None:
    config = load_block(minimal(hosts={"a.example": "db"}))
    with pytest.raises(AttributeError):
        config.services = ("other",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.hosts["b.example"] = "db"  # type: ignore[index]


@pytest.mark.parametrize(
    ("target", "expected", "text"),
    [
        ("deployment/checkout", Target(kind="deployment", name="checkout"), "deployment/checkout"),
        ("deploy/x", Target(kind="deployment", name="x"), "deployment/x"),
        ("Deploy/x", Target(kind="deployment", name="x"), "deployment/x"),
        ("pod/x/container/c", Target(kind="pod", name="x", container="c"), "pod/x/container/c"),
        ("statefulset/db-0", Target(kind="statefulset", name="db-0"), "statefulset/db-0"),
        ("rollout/r", Target(kind="rollout", name="r"), "rollout/r"),
        ("cronjob/nightly", Target(kind="cronjob", name="nightly"), "cronjob/nightly"),
        ("targetless", Target(kind="targetless"), "targetless"),
        ("docker://name", Target(kind="docker", name="name"), "docker://name"),
        (
            "docker://3f2a9c_b.1-x",
            Target(kind="docker", name="3f2a9c_b.1-x"),
            "docker://3f2a9c_b.1-x",
        ),
        ({"path": "deploy/x"}, Target(kind="deployment", name="x"), "deployment/x"),
        (
            {"path": {"deployment": "x", "container": "c"}},
            Target(kind="deployment", name="x", container="c"),
            "deployment/x/container/c",
        ),
        ({"path": {"pod": "x", "container": None}}, Target(kind="pod", name="x"), "pod/x"),
        ({"path": {"stateful_set": "db"}}, Target(kind="statefulset", name="db"), "statefulset/db"),
        (
            {"path": {"cron_job": "nightly"}},
            Target(kind="cronjob", name="nightly"),
            "cronjob/nightly",
        ),
        ({"namespace": "shop"}, Target(kind="targetless"), "targetless"),
    ],
)
def test_target_forms(target: Any, expected: Target, text: str) -> None:
    config = load_block(minimal(target=target))
    assert config.target == expected
    assert str(config.target) == text


@pytest.mark.parametrize(
    ("block", "namespace"),
    [
        (minimal(namespace="shop"), "shop"),
        (minimal(target={"path": "pod/x", "namespace": "shop"}), "shop"),
        (minimal(target={"path": "pod/x", "namespace": "shop"}, namespace="shop"), "shop"),
        (minimal(), None),
    ],
)
def test_namespace(block: dict[str, Any], namespace: str | None) -> None:
    assert load_block(block).namespace == namespace


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        (["web"], ("web",)),
        ("web", ("web",)),
        ("web; worker", ("web", "worker")),
        (["web", "worker"], ("web", "worker")),
    ],
)
def test_services_as_list_or_string(services: Any, expected: tuple[str, ...]) -> None:
    assert load_block(minimal(services=services)).services == expected


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"include": "A;B_*; C?"}, "include", ("A", "B_*", "C?")),
        ({"include": ["A", "B_*"]}, "include", ("A", "B_*")),
        ({"exclude": "SECRET_*;TOKEN"}, "exclude", ("SECRET_*", "TOKEN")),
        ({"exclude": ["SECRET_*"]}, "exclude", ("SECRET_*",)),
        ({"unset": "A;b"}, "unset", ("A", "b")),
        ({"env_file": "cluster.env"}, "env_file", BASE / "cluster.env"),
        ({"env_file": "../shared/cluster.env"}, "env_file", BASE / "../shared/cluster.env"),
        ({"env_file": "/etc/cluster.env"}, "env_file", Path("/etc/cluster.env")),
    ],
)
def test_env_settings(env: dict[str, Any], field: str, expected: Any) -> None:
    settings = load_block(minimal(feature={"env": env})).env
    assert getattr(settings, field) == expected


@pytest.mark.parametrize("enabled", [True, False])
def test_env_as_bool(enabled: bool) -> None:
    assert load_block(minimal(feature={"env": enabled})).env.enabled is enabled


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        (True, (True, True, True)),
        (False, (False, False, False)),
        ({"outgoing": False}, (False, False, True)),
        ({"outgoing": True}, (True, True, True)),
        ({"outgoing": {"udp": False}}, (True, False, True)),
        ({"outgoing": {"tcp": False}}, (False, True, True)),
        ({"dns": False}, (True, True, False)),
        ({"dns": {"enabled": False}}, (True, True, False)),
        ({"dns": {}}, (True, True, True)),
    ],
)
def test_network_switches(network: Any, expected: tuple[bool, bool, bool]) -> None:
    settings = load_block(minimal(feature={"network": network})).network
    assert (settings.tcp, settings.udp, settings.dns_enabled) == expected


def test_filter_entries_as_single_string() -> None:
    network = load_block(
        minimal(
            feature={
                "network": {
                    "outgoing": {"filter": {"remote": "orders.shop:8080; 10.96.0.0/12"}},
                    "dns": {"filter": {"local": "*.local.test"}},
                }
            }
        )
    ).network
    assert network.outgoing is not None and network.outgoing.mode == "remote"
    assert [r.text for r in network.outgoing.rules] == ["orders.shop:8080", "10.96.0.0/12"]
    assert network.dns is not None and [r.name for r in network.dns.rules] == ["local.test"]


# ---------------------------------------------------------------------------------------------
# Errors: each one is a ConfigError (exit 2) starting with the source and naming the key path.
# ---------------------------------------------------------------------------------------------


def feature(**features: Any) -> dict[str, Any]:
    return minimal(feature=features)


def outgoing_filter(value: Any) -> dict[str, Any]:
    return feature(network={"outgoing": {"filter": value}})


ERRORS = [
    # the block itself
    ("not a block", "x-composemirror", "expected a mapping"),
    (None, "x-composemirror.target", "missing"),
    # target
    ({"services": ["web"]}, "x-composemirror.target", "missing"),
    (minimal(target=None), "x-composemirror.target", "missing"),
    (minimal(target="checkout"), "x-composemirror.target", "'checkout' is not a target"),
    (minimal(target="deployment/"), "x-composemirror.target", "is not a target"),
    (minimal(target="daemonset/x"), "x-composemirror.target", "is not a target"),
    (
        minimal(target="pod/x/cont/c"),
        "x-composemirror.target",
        "expected KIND/NAME/container/CONTAINER",
    ),
    (
        minimal(target="pod/x/container/"),
        "x-composemirror.target",
        "expected KIND/NAME/container/CONTAINER",
    ),
    (minimal(target="pod/a/b"), "x-composemirror.target", "is not a target"),
    (minimal(target="docker://"), "x-composemirror.target", "expected docker://CONTAINER"),
    (minimal(target="docker://a b"), "x-composemirror.target", "expected docker://CONTAINER"),
    (minimal(target=5), "x-composemirror.target", "expected a string, got a number"),
    (minimal(target={"path": 5}), "x-composemirror.target.path", "expected a string"),
    (minimal(target={"path": {}}), "x-composemirror.target.path", "name exactly one workload"),
    (
        minimal(target={"path": {"deployment": "a", "pod": "b"}}),
        "x-composemirror.target.path",
        "name exactly one workload",
    ),
    (
        minimal(target={"path": {"deployment": None}}),
        "x-composemirror.target.path.deployment",
        "expected a name",
    ),
    (
        minimal(target={"path": {"deployment": ["x"]}}),
        "x-composemirror.target.path.deployment",
        "expected a name",
    ),
    (
        minimal(target={"path": {"pod": "x", "container": 3}}),
        "x-composemirror.target.path.container",
        "expected a name",
    ),
    (
        minimal(target={"path": {"deploymnt": "x"}}),
        "x-composemirror.target.path.deploymnt",
        "unknown key",
    ),
    (minimal(target={"pth": "pod/x"}), "x-composemirror.target.pth", "unknown key"),
    (
        minimal(target={"path": "pod/x", "namespace": "a"}, namespace="b"),
        "x-composemirror.target.namespace",
        "conflicts with x-composemirror.namespace",
    ),
    (minimal(namespace=""), "x-composemirror.namespace", "expected a namespace name"),
    (minimal(namespace=["shop"]), "x-composemirror.namespace", "expected a namespace name"),
    (
        minimal(target={"path": "pod/x", "namespace": 5}),
        "x-composemirror.target.namespace",
        "expected a namespace name",
    ),
    (minimal(kube_context=1), "x-composemirror.kube_context", "expected a string"),
    # services
    ({"target": "targetless"}, "x-composemirror.services", "missing"),
    (minimal(services=[]), "x-composemirror.services", "missing"),
    (minimal(services=""), "x-composemirror.services", "missing"),
    (minimal(services=["web", "web"]), "x-composemirror.services", "lists a service twice"),
    (minimal(services="web;web"), "x-composemirror.services", "lists a service twice"),
    (minimal(services=["web", 2]), "x-composemirror.services[1]", "expected a string"),
    (
        minimal(services={"web": True}),
        "x-composemirror.services",
        "expected a string or a list of strings, got a mapping",
    ),
    # hosts
    (minimal(hosts=["db"]), "x-composemirror.hosts", "expected a mapping, got a list"),
    (
        minimal(hosts={"*.shop.svc": "db"}),
        "x-composemirror.hosts.*.shop.svc",
        "expected a plain host name",
    ),
    (
        minimal(hosts={"db.shop:5432": "db"}),
        "x-composemirror.hosts.db.shop:5432",
        "expected a plain host name",
    ),
    (
        minimal(hosts={"10.0.0.1": "db"}),
        "x-composemirror.hosts.10.0.0.1",
        "expected a plain host name",
    ),
    (
        minimal(hosts={"tcp://db.shop": "db"}),
        "x-composemirror.hosts.tcp://db.shop",
        "expected a plain host name",
    ),
    (
        minimal(hosts={"bad name": "db"}),
        "x-composemirror.hosts.bad name",
        "is not a valid host name",
    ),
    (minimal(hosts={"db.shop": None}), "x-composemirror.hosts.db.shop", "expected a string"),
    (minimal(hosts={"db.shop": ["db"]}), "x-composemirror.hosts.db.shop", "expected a string"),
    # feature
    (minimal(feature=["env"]), "x-composemirror.feature", "expected a mapping, got a list"),
    # env
    (feature(env="yes"), "x-composemirror.feature.env", "expected a mapping, got a string"),
    (
        feature(env={"include": "A", "exclude": "B"}),
        "x-composemirror.feature.env",
        "`include` and `exclude` cannot be used together",
    ),
    (
        feature(env={"include": ["A", 1]}),
        "x-composemirror.feature.env.include[1]",
        "expected a string",
    ),
    (
        feature(env={"exclude": 5}),
        "x-composemirror.feature.env.exclude",
        "expected a string or a list of strings",
    ),
    (
        feature(env={"override": {"A": ["x"]}}),
        "x-composemirror.feature.env.override.A",
        "expected a string, got a list",
    ),
    (
        feature(env={"override": {"A": True}}),
        "x-composemirror.feature.env.override.A",
        "expected a string, got a boolean",
    ),
    (
        feature(env={"override": "A=1"}),
        "x-composemirror.feature.env.override",
        "expected a mapping",
    ),
    (
        feature(env={"mapping": {"(": "x"}}),
        "x-composemirror.feature.env.mapping",
        "'(' is not a regex",
    ),
    (
        feature(env={"mapping": {"A": None}}),
        "x-composemirror.feature.env.mapping.A",
        "expected a string",
    ),
    (feature(env={"env_file": 5}), "x-composemirror.feature.env.env_file", "expected a path"),
    (feature(env={"unset": [None]}), "x-composemirror.feature.env.unset[0]", "expected a string"),
    # network
    (feature(network=5), "x-composemirror.feature.network", "expected a mapping"),
    (
        feature(network={"outgoing": "yes"}),
        "x-composemirror.feature.network.outgoing",
        "expected a mapping",
    ),
    (
        feature(network={"outgoing": {"tcp": "yes"}}),
        "x-composemirror.feature.network.outgoing.tcp",
        "expected true or false",
    ),
    (
        feature(network={"outgoing": {"udp": 0}}),
        "x-composemirror.feature.network.outgoing.udp",
        "expected true or false",
    ),
    (feature(network={"dns": "no"}), "x-composemirror.feature.network.dns", "expected a mapping"),
    (
        feature(network={"dns": {"enabled": 1}}),
        "x-composemirror.feature.network.dns.enabled",
        "expected true or false",
    ),
    # filters
    (
        outgoing_filter({"local": ["a"], "remote": ["b"]}),
        "x-composemirror.feature.network.outgoing.filter",
        "give exactly one of `local` or `remote`",
    ),
    (
        outgoing_filter({}),
        "x-composemirror.feature.network.outgoing.filter",
        "give exactly one of `local` or `remote`",
    ),
    (
        outgoing_filter(["a"]),
        "x-composemirror.feature.network.outgoing.filter",
        "expected a mapping",
    ),
    (
        outgoing_filter({"local": []}),
        "x-composemirror.feature.network.outgoing.filter.local",
        "is empty",
    ),
    (
        outgoing_filter({"remote": None}),
        "x-composemirror.feature.network.outgoing.filter.remote",
        "is empty",
    ),
    (
        outgoing_filter({"local": ["db", "tcp://google.com/24:7777"]}),
        "x-composemirror.feature.network.outgoing.filter.local[1]",
        "a subnet needs an IP address",
    ),
    (
        outgoing_filter({"remote": ["meow://x"]}),
        "x-composemirror.feature.network.outgoing.filter.remote[0]",
        "unknown protocol",
    ),
    (
        outgoing_filter({"local": "db; ::1"}),
        "x-composemirror.feature.network.outgoing.filter.local[1]",
        "IPv6 is not intercepted",
    ),
    (
        outgoing_filter({"local": ["db", ""]}),
        "x-composemirror.feature.network.outgoing.filter.local[1]",
        "an empty entry (an unset ${VARIABLE}?) would match everything",
    ),
    (
        outgoing_filter({"local": ["db", 5432]}),
        "x-composemirror.feature.network.outgoing.filter.local[1]",
        "expected a string",
    ),
    (
        feature(network={"dns": {"filter": {"local": ["tcp://db"]}}}),
        "x-composemirror.feature.network.dns.filter.local[0]",
        "takes no protocol prefix",
    ),
    (
        feature(network={"dns": {"filter": {"remote": ["ok.example", ""]}}}),
        "x-composemirror.feature.network.dns.filter.remote[1]",
        "matches nothing",
    ),
]


@pytest.mark.parametrize(
    ("entry", "hint"),
    [
        ("1.1.1.0/24:53", "list `1.1.1.0/24:53` in feature.network.outgoing.filter instead"),
        ("db:5432", "write `db`"),
        (":53", "list `any://:53` in feature.network.outgoing.filter instead"),
        ("tcp://db", "write `db`"),
    ],
)
def test_a_dns_filter_entry_that_can_never_match_is_refused_with_a_valid_hint(
    entry: str, hint: str
) -> None:
    """A query has a name, no address and no port (issue 10): such an entry is an error, and the
    hint is an entry that is itself valid where it says."""
    with pytest.raises(ConfigError) as caught:
        load_block(feature(network={"dns": {"filter": {"local": ["ok.example", entry]}}}))
    error = caught.value
    assert error.exit_code == 2
    assert error.message.startswith(
        f"{SOURCE}: x-composemirror.feature.network.dns.filter.local[1]"
    )
    assert error.hint == hint


@pytest.mark.parametrize(
    ("outgoing", "message", "hint"),
    [
        (
            {"udp": False, "filter": {"remote": ["db", "udp://:53"]}},
            "'udp://:53' can never match: `outgoing.udp` is false",
            "set x-composemirror.feature.network.outgoing.udp: true, or remove the entry",
        ),
        (
            {"tcp": False, "filter": {"local": ["db", "tcp://db:5432"]}},
            "'tcp://db:5432' can never match: `outgoing.tcp` is false",
            "set x-composemirror.feature.network.outgoing.tcp: true, or remove the entry",
        ),
        (
            {"filter": {"local": ["db", "[fd00::]/8:443"]}},
            "'[fd00::]/8:443' can never match: composemirror intercepts IPv4 only",
            "remove the entry",
        ),
    ],
)
def test_an_outgoing_entry_that_can_never_match_is_refused(
    outgoing: dict[str, Any], message: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(feature(network={"outgoing": outgoing}))
    error = caught.value
    assert error.exit_code == 2
    path = "x-composemirror.feature.network.outgoing.filter"
    assert error.message.startswith(f"{SOURCE}: {path}.")
    assert f"[1]: {message}" in error.message
    assert error.hint == hint


@pytest.mark.parametrize(
    "outgoing",
    [
        {"udp": False, "filter": {"local": ["tcp://db:5432", ":53", "[::]:53"]}},
        {"filter": {"remote": ["udp://:53", "tcp://db:5432"]}},
    ],
)
def test_outgoing_entries_that_can_match_are_kept(outgoing: dict[str, Any]) -> None:
    assert load_block(feature(network={"outgoing": outgoing})).network.outgoing is not None


def test_the_usual_hint_of_a_dns_filter_names_only_names() -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(feature(network={"dns": {"filter": {"local": ["bad name"]}}}))
    assert caught.value.hint == "entries are names: `db.example` or `*.internal`"


@pytest.mark.parametrize(
    ("block", "path", "message"), ERRORS, ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(ERRORS)]
)
def test_errors_name_source_and_key_path(block: Any, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(block)
    error = caught.value
    assert error.exit_code == 2
    assert error.message.startswith(f"{SOURCE}: {path}: "), error.message
    assert message in error.message


UNKNOWN_KEYS = [
    (minimal(servces=["web"]), "x-composemirror.servces", "did you mean `services`?"),
    (minimal(taget="pod/x"), "x-composemirror.taget", "did you mean `target`?"),
    (feature(netwrok={}), "x-composemirror.feature.netwrok", "did you mean `network`?"),
    (
        feature(env={"overide": {}}),
        "x-composemirror.feature.env.overide",
        "did you mean `override`?",
    ),
    (
        feature(network={"outgoing": {"filtr": {"local": ["a"]}}}),
        "x-composemirror.feature.network.outgoing.filtr",
        "did you mean `filter`?",
    ),
    (
        outgoing_filter({"locals": ["a"]}),
        "x-composemirror.feature.network.outgoing.filter.locals",
        "did you mean `local`?",
    ),
    (
        feature(network={"dns": {"enable": True}}),
        "x-composemirror.feature.network.dns.enable",
        "did you mean `enabled`?",
    ),
    (feature(zzz=1), "x-composemirror.feature.zzz", "known keys: env, network"),
]


@pytest.mark.parametrize(
    ("block", "path", "hint"), UNKNOWN_KEYS, ids=[p for _, p, _ in UNKNOWN_KEYS]
)
def test_unknown_keys_say_what_was_meant(block: Any, path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(block)
    error = caught.value
    assert error.exit_code == 2
    assert error.message == f"{SOURCE}: {path}: unknown key"
    assert error.hint is not None and error.hint.startswith(hint)
    assert re.search(re.escape(hint), str(error))


def test_the_target_hint_names_every_kind_the_cluster_takes() -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(minimal(target="daemonset/x"))
    hint = str(caught.value.hint)
    for kind in ("pod", "deployment", "statefulset", "replicaset", "job", "cronjob"):
        assert f"{kind}/NAME" in hint
        load_block(minimal(target=f"{kind}/x"))  # and each is taken


def test_errors_carry_hints_on_what_to_do() -> None:
    with pytest.raises(ConfigError) as caught:
        load_block({"target": "deployment/checkout"})
    assert caught.value.hint == "e.g. `services: [web]`"
    with pytest.raises(ConfigError) as caught:
        load_block(outgoing_filter({"local": ["meow://"]}))
    assert caught.value.hint is not None and "tcp://host:5432" in caught.value.hint


@pytest.mark.parametrize("value", [0, 301, "5", True])
def test_the_handshake_timeout_is_a_few_seconds(value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        load_block(
            {"target": "targetless", "services": ["web"], "agent": {"handshake_timeout": value}}
        )
    assert "x-composemirror.agent.handshake_timeout: expected a whole number from 1 to 300" in str(
        caught.value
    )
    ok = load_block(
        {"target": "targetless", "services": ["web"], "agent": {"handshake_timeout": 2}}
    )
    assert ok.agent.handshake_timeout == 2


@pytest.mark.parametrize("entry", ["fd00::/64", "fd00::1", "tcp://fd00::1"])
def test_a_bare_ipv6_entry_is_refused_with_a_hint_that_holds(entry: str) -> None:
    """The hint once said to write the entry in brackets, which is then refused too (IPv6 is
    not intercepted): it must say so instead."""
    with pytest.raises(ConfigError) as caught:
        load_block(feature(network={"outgoing": {"filter": {"local": [entry]}}}))
    assert caught.value.exit_code == 2
    assert "IPv6 is not intercepted" in caught.value.message
    assert caught.value.hint is not None and "[" not in caught.value.hint
    assert "remove the entry" in caught.value.hint


@pytest.mark.parametrize(
    ("network", "entry"),
    [
        (
            {"outgoing": {"filter": {"remote": ["tcp://postgres.shop.svc.cluster.local:5432"]}}},
            "x-composemirror.feature.network.outgoing.filter.remote[0]",
        ),
        (
            {"outgoing": {"filter": {"remote": ["api.test", "*.svc.cluster.local"]}}},
            "x-composemirror.feature.network.outgoing.filter.remote[1]",
        ),
    ],
)
def test_a_hosts_name_that_a_remote_filter_sends_to_the_cluster_is_refused(
    network: dict[str, Any], entry: str
) -> None:
    block = feature(network=network)
    block["hosts"] = {"postgres.shop.svc.cluster.local": "db"}
    with pytest.raises(ConfigError) as caught:
        load_block(block)
    error = caught.value
    assert error.exit_code == 2
    assert error.message.startswith(
        f"{SOURCE}: x-composemirror.hosts.postgres.shop.svc.cluster.local: sends "
    )
    assert entry in error.message
    assert error.hint is not None and "remove the `hosts` line" in error.hint


@pytest.mark.parametrize(
    "network",
    [
        {"outgoing": {"filter": {"local": ["tcp://postgres.shop.svc.cluster.local:5432"]}}},
        {"dns": {"filter": {"remote": ["*.svc.cluster.local"]}}},  # `hosts` decides the answer
    ],
)
def test_a_hosts_name_under_other_filters_naming_it_is_fine(network: dict[str, Any]) -> None:
    block = feature(network=network)
    block["hosts"] = {"postgres.shop.svc.cluster.local": "db"}
    assert load_block(block).hosts == {"postgres.shop.svc.cluster.local": "db"}
