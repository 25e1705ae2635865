"""Tests of composemirror.compose.rewrite: golden files, properties, and the models it refuses.

Each `golden/NAME.input.json` is what `docker compose config --format json` printed for a project
with an `x-composemirror` block; `golden/NAME.rendered.json` is the reviewed rewrite of it.
`COMPOSEMIRROR_UPDATE_GOLDEN=1 pytest tests/unit/test_compose.py` regenerates the expected files;
review every change before keeping it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemirror import compose
from composemirror.backends import ContainerPlacement, ForwardedPlacement, Resolver
from composemirror.config import BLOCK, Config, load
from composemirror.errors import ConfigError
from composemirror.link import AGENT_LINK, ENV_VAR, LinkAddress, SidecarSettings

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name.removesuffix(".input.json") for p in GOLDEN.glob("*.input.json"))
UPDATE = os.environ.get("COMPOSEMIRROR_UPDATE_GOLDEN") == "1"

REMOTE_ENV = {
    "DATABASE_URL": "postgresql://shop:shop-secret@postgres.shop.svc.cluster.local:5432/shop",
    "ORDERS_URL": "http://orders.shop.svc.cluster.local:8080/orders",
    "PAYMENTS_URL": "http://payments.shop.svc.cluster.local:8080",
    "SECRET_TOKEN": "s3cr$t",
    "LOG_LEVEL": "info",
    "DEBUG": "0",
    "TMP1": "/tmp/one",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
    "HOME": "/root",
    "HOSTNAME": "checkout-7d9f8-abcde",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
}
ENV_FILE = {"QUEUE_USER": "worker", "LOG_LEVEL": "warning"}
PLAN = compose.Plan(
    version="0.1.0",
    sidecar_image="composemirror/sidecar:test",
    agent_image="composemirror/agent:test",
    placement=ContainerPlacement(network_mode="container:target"),
    remote_env=REMOTE_ENV,
)

FORWARDED = ForwardedPlacement(
    link=LinkAddress.parse("tcp:host.docker.internal:41000"),
    extra_hosts={"host.docker.internal": "host-gateway"},
)
"""The agent in a cluster, reached through a forwarder on the host (cases named `forwarded-*`)."""


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def load_case(name: str) -> tuple[dict[str, Any], Config, compose.Plan]:
    """The input model, its x-composemirror config, and the plan (env_file values if it has one)."""
    model = read_json(GOLDEN / f"{name}.input.json")
    # As ops does: the model's block holds `$$` for `$`; the config holds raw values.
    config = load(
        compose.unescape(model[BLOCK]), source=f"{BLOCK} in {name}", base_dir=Path("/project")
    )
    plan = replace(PLAN, env_file=ENV_FILE) if config.env.env_file else PLAN
    if name.startswith("forwarded-"):
        plan = replace(plan, placement=FORWARDED)
    return model, config, plan


def render(text: Any) -> str:
    return json.dumps(text, indent=2) + "\n"


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    model, config, plan = load_case(name)
    rendered = compose.rewrite(model, config, plan)
    expected_path = GOLDEN / f"{name}.rendered.json"
    if UPDATE:
        expected_path.write_text(render(rendered))
    assert expected_path.exists(), f"{expected_path.name}: run with COMPOSEMIRROR_UPDATE_GOLDEN=1"
    # Compared as objects (a tuple where a list belongs would differ) and as the text ops writes.
    assert rendered == read_json(expected_path)
    assert render(rendered) == expected_path.read_text()


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 4
    for name in CASES:
        assert (GOLDEN / f"{name}.rendered.json").exists(), name


@pytest.mark.parametrize("name", CASES)
def test_input_is_not_mutated(name: str) -> None:
    model, config, plan = load_case(name)
    before = copy.deepcopy(model)
    rendered = compose.rewrite(model, config, plan)
    assert model == before
    # and the output shares nothing mutable with the input
    rendered["services"].clear()
    assert model == before


@pytest.mark.parametrize("name", CASES)
def test_rewrite_is_deterministic(name: str) -> None:
    model, config, plan = load_case(name)
    first = compose.rewrite(model, config, plan)
    second = compose.rewrite(copy.deepcopy(model), config, plan)
    assert first == second
    assert render(first) == render(second)


@pytest.mark.parametrize("name", CASES)
def test_rendered_model_survives_the_yaml_writer(name: str) -> None:
    # ops writes the model with yaml.safe_dump: no tuples, mapping proxies or other Python types.
    model, config, plan = load_case(name)
    rendered = compose.rewrite(model, config, plan)
    assert yaml.safe_load(yaml.safe_dump(rendered, sort_keys=False)) == rendered


@pytest.mark.parametrize("name", CASES)
def test_rendered_model_invariants(name: str) -> None:
    """The rules of DESIGN.md, checked on every case independently of the golden text."""
    model, config, plan = load_case(name)
    rendered = compose.rewrite(model, config, plan)
    services = rendered["services"]
    project = model["name"]
    assert BLOCK not in rendered
    for app_name in config.services:
        original = model["services"][app_name]
        app, sidecar = services[app_name], services[f"{app_name}-mirror"]
        assert app["network_mode"] == f"service:{app_name}-mirror"
        assert not set(compose.MOVED_KEYS) & set(app)
        for key in compose.MOVED_KEYS:
            if key == "extra_hosts" and isinstance(plan.placement, ForwardedPlacement):
                assert set(original.get(key) or ()) <= set(sidecar[key])
            elif key != "networks" and key in original:
                assert sidecar[key] == original[key], key
        for network, settings in (original.get("networks") or {"default": None}).items():
            aliases = sidecar["networks"][network]["aliases"]
            assert app_name in aliases
            assert set((settings or {}).get("aliases") or ()) <= set(aliases)
            for key, value in (settings or {}).items():
                if key != "aliases":
                    assert sidecar["networks"][network][key] == value
        assert app["depends_on"][f"{app_name}-mirror"] == {
            "condition": "service_healthy",
            "restart": True,
            "required": True,
        }
        assert sidecar["labels"] == {
            compose.LABEL_PROJECT: project,
            compose.LABEL_ROLE: "sidecar",
            compose.LABEL_VERSION: "0.1.0",
            compose.LABEL_SERVICE: app_name,
            compose.LABEL_KEY: "${COMPOSEMIRROR_TUNNEL_KEY_DIGEST:-}",
        }
        assert app["labels"][compose.LABEL_ROLE] == "app"
        settings_json = SidecarSettings.from_json(sidecar["environment"][ENV_VAR])
        assert settings_json.service == app_name
        assert app_name in settings_json.names
    for name_, service in services.items():
        assert "profiles" not in service, name_
        mode = service.get("network_mode") or ""
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") not in config.services, name_
        for link in service.get("links") or ():
            assert link.partition(":")[0] not in config.services, name_
    if isinstance(plan.placement, ContainerPlacement):
        agent = services[compose.AGENT_SERVICE]
        assert agent["network_mode"] == "container:target"
        assert agent["labels"][compose.LABEL_ROLE] == "agent"
        volume = rendered["volumes"][compose.LINK_VOLUME]
        assert volume["labels"][compose.LABEL_PROJECT] == project
    else:
        assert compose.AGENT_SERVICE not in services
        assert compose.LINK_VOLUME not in (rendered.get("volumes") or {})
    for app_name in config.services:
        sidecar = services[f"{app_name}-mirror"]
        settings = SidecarSettings.from_json(sidecar["environment"][ENV_VAR])
        assert settings.link == compose.link_of(plan.placement)
        local_agent = isinstance(plan.placement, ContainerPlacement)
        assert ("volumes" in sidecar) == (
            local_agent or bool(getattr(plan.placement, "mounts", {}))
        )
        assert (compose.AGENT_SERVICE in (sidecar.get("depends_on") or {})) == local_agent
    assert rendered["secrets"][compose.KEY_SECRET] == {"environment": compose.KEY_ENV}


def test_there_is_a_golden_case_per_placement_kind() -> None:
    kinds = {type(load_case(name)[2].placement) for name in CASES}
    assert kinds == {ContainerPlacement, ForwardedPlacement}


def test_forwarded_placement_adds_no_agent_and_reaches_the_forwarder() -> None:
    model = model_of(
        web=service(extra_hosts=["legacy.example=192.0.2.1", "host.docker.internal=10.0.0.1"])
    )
    rendered = compose.rewrite(model, config_of(), replace(PLAN, placement=FORWARDED))
    sidecar = rendered["services"]["web-mirror"]
    assert compose.AGENT_SERVICE not in rendered["services"]
    assert "volumes" not in rendered
    assert "depends_on" not in sidecar
    # the placement's name wins over the app's own entry for it
    assert sidecar["extra_hosts"] == [
        "legacy.example=192.0.2.1",
        "host.docker.internal=host-gateway",
    ]
    settings = SidecarSettings.from_json(sidecar["environment"][ENV_VAR])
    assert str(settings.link) == "tcp:host.docker.internal:41000"
    assert "host.docker.internal" in settings.names


def test_a_forwarder_on_a_unix_socket_is_mounted_into_the_sidecars_only() -> None:
    placement = ForwardedPlacement(
        link=LinkAddress.parse("unix:/run/composemirror/forward/agent.sock"),
        mounts={"/project/.composemirror/forward": "/run/composemirror/forward"},
    )
    model = model_of(web=service(), db=service())
    services = compose.rewrite(model, config_of(), replace(PLAN, placement=placement))["services"]
    assert services["web-mirror"]["volumes"] == [
        {
            "type": "bind",
            "source": "/project/.composemirror/forward",
            "target": "/run/composemirror/forward",
        }
    ]
    assert "volumes" not in services["web"] and "volumes" not in services["db"]
    assert "extra_hosts" not in services["web-mirror"]
    settings = SidecarSettings.from_json(services["web-mirror"]["environment"][ENV_VAR])
    assert str(settings.link) == "unix:/run/composemirror/forward/agent.sock"


def test_forwarded_placement_with_extra_hosts_as_a_mapping() -> None:
    # newer compose versions print extra_hosts as a mapping of name to addresses
    model = model_of(web=service(extra_hosts={"legacy.example": ["192.0.2.1"]}))
    sidecar = compose.rewrite(model, config_of(), replace(PLAN, placement=FORWARDED))["services"][
        "web-mirror"
    ]
    assert sidecar["extra_hosts"] == {
        "legacy.example": ["192.0.2.1"],
        "host.docker.internal": ["host-gateway"],
    }


def test_container_placement_links_by_the_shared_socket() -> None:
    rendered = compose.rewrite(model_of(web=service()), config_of(), PLAN)
    agent = rendered["services"][compose.AGENT_SERVICE]
    assert agent["command"] == ["python3", "-m", "composemirror.agent", "--listen", str(AGENT_LINK)]
    assert agent["volumes"] == rendered["services"]["web-mirror"]["volumes"]


# ---------------------------------------------------------------------------------------------
# Behaviour on hand-made models
# ---------------------------------------------------------------------------------------------


def service(**keys: Any) -> dict[str, Any]:
    return {"image": "example/app", "networks": {"default": None}, **keys}


def model_of(**services: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "proj",
        "networks": {"default": {"name": "proj_default", "ipam": {}}},
        "services": services,
    }


def config_of(**block: Any) -> Config:
    return load(
        {"target": "targetless", "services": ["web"], **block},
        source="compose.yaml",
        base_dir=Path("/project"),
    )


def test_dollar_in_remote_and_env_file_values_is_escaped() -> None:
    model = model_of(web=service(environment={"LOCAL": "x$$y"}), db=service())
    plan = replace(
        PLAN, remote_env={"PASSWORD": "pa$word", "PRICE": "$5"}, env_file={"FROM_FILE": "a$b"}
    )
    env = compose.rewrite(model, config_of(), plan)["services"]["web"]["environment"]
    assert env == {"PASSWORD": "pa$$word", "PRICE": "$$5", "FROM_FILE": "a$$b", "LOCAL": "x$$y"}


def test_environment_precedence_in_the_app() -> None:
    model = model_of(web=service(environment={"LOG_LEVEL": "debug", "SHELL_VALUE": None}))
    config = config_of(feature={"env": {"override": {"ORDERS_URL": "http://localhost:9"}}})
    env = compose.rewrite(model, config, PLAN)["services"]["web"]["environment"]
    assert env["LOG_LEVEL"] == "debug"
    assert env["SHELL_VALUE"] is None
    assert env["ORDERS_URL"] == "http://localhost:9"
    assert env["DATABASE_URL"] == REMOTE_ENV["DATABASE_URL"]
    assert not {"PATH", "HOME", "HOSTNAME", "KUBERNETES_SERVICE_HOST"} & set(env)


def test_app_without_networks_gets_a_sidecar_on_the_default_network() -> None:
    model = model_of(web={"image": "example/app"})
    sidecar = compose.rewrite(model, config_of(), PLAN)["services"]["web-mirror"]
    # its compose container name too: other services may address the app by it
    assert sidecar["networks"] == {"default": {"aliases": ["proj-web-1", "web"]}}


def test_container_name_is_kept_on_the_app_and_aliased_on_the_sidecar() -> None:
    model = model_of(web=service(container_name="shop-web"))
    services = compose.rewrite(model, config_of(), PLAN)["services"]
    assert services["web"]["container_name"] == "shop-web"
    assert services["web-mirror"]["networks"]["default"]["aliases"] == ["shop-web", "web"]
    assert "container_name" not in services["web-mirror"]


def test_app_dependencies_are_kept_beside_the_sidecar() -> None:
    model = model_of(
        web=service(depends_on={"db": {"condition": "service_healthy", "required": True}}),
        db=service(),
    )
    depends = compose.rewrite(model, config_of(), PLAN)["services"]["web"]["depends_on"]
    assert depends == {
        "db": {"condition": "service_healthy", "required": True},
        "web-mirror": {"condition": "service_healthy", "restart": True, "required": True},
    }


def test_sidecar_settings_carry_the_filters_and_project_names() -> None:
    model = model_of(web=service(), db=service(networks={"default": {"aliases": ["pg"]}}))
    config = config_of(
        hosts={"postgres.shop": "db"},
        feature={
            "network": {
                "outgoing": {"udp": False, "filter": {"local": ["*.internal"]}},
                "dns": {"filter": {"remote": ["*.svc.cluster.local"]}},
            }
        },
    )
    sidecar = compose.rewrite(model, config, PLAN)["services"]["web-mirror"]
    settings = SidecarSettings.from_json(sidecar["environment"][ENV_VAR])
    assert settings.service == "web"
    assert set(settings.names) == {
        "web",
        "db",
        "pg",
        "postgres.shop",
        "web-mirror",
        "composemirror-agent",
        "proj-web-1",
        "proj-db-1",
    }
    assert dict(settings.hosts) == {"postgres.shop": "db"}
    assert (settings.tcp, settings.udp) == (True, False)
    assert settings.outgoing is not None and settings.outgoing.entries == ("*.internal",)
    assert settings.outgoing.mode == "local"
    assert settings.dns is not None and settings.dns.mode == "remote"


@pytest.mark.parametrize(
    ("ports_web", "ports_api"),
    [
        ([{"published": "8080", "target": 80}], [{"published": "8080", "target": 81}]),
        (
            [{"published": "8080", "target": 80, "host_ip": "0.0.0.0"}],
            [{"published": "8080", "target": 81, "host_ip": "127.0.0.1"}],
        ),
        (
            [{"published": "8080", "target": 80, "host_ip": "127.0.0.1"}],
            [{"published": "8080", "target": 81}],
        ),
        (
            [{"published": "8080", "target": 80, "host_ip": "::"}],
            [{"published": "8080", "target": 81, "host_ip": "127.0.0.1"}],
        ),
        (
            [{"published": "8080", "target": 80, "host_ip": "127.0.0.1"}],
            [{"published": "8080", "target": 81, "host_ip": "127.0.0.1"}],
        ),
        ([{"published": "8000-8010", "target": 80}], [{"published": "8005", "target": 81}]),
        (
            [{"published": "53", "target": 53, "protocol": "udp"}],
            [{"published": "53", "target": 53, "protocol": "udp"}],
        ),
    ],
)
def test_two_mirrored_services_publishing_one_host_port(
    ports_web: list[dict[str, Any]], ports_api: list[dict[str, Any]]
) -> None:
    model = model_of(web=service(ports=ports_web), api=service(ports=ports_api))
    with pytest.raises(ConfigError) as caught:
        compose.rewrite(model, config_of(services=["web", "api"]), PLAN)
    assert caught.value.exit_code == 2
    assert "'web' and 'api' both publish host port" in caught.value.message


@pytest.mark.parametrize(
    ("ports_web", "ports_api"),
    [
        (
            [{"published": "8080", "target": 80, "host_ip": "127.0.0.1"}],
            [{"published": "8080", "target": 81, "host_ip": "127.0.0.2"}],
        ),
        (
            [{"published": "53", "target": 53, "protocol": "udp"}],
            [{"published": "53", "target": 53, "protocol": "tcp"}],
        ),
        ([{"published": "8000-8004", "target": 80}], [{"published": "8005", "target": 81}]),
        ([{"target": 80}], [{"target": 80}]),  # unpublished: the engine picks the host ports
    ],
)
def test_distinct_host_ports_are_accepted(
    ports_web: list[dict[str, Any]], ports_api: list[dict[str, Any]]
) -> None:
    model = model_of(web=service(ports=ports_web), api=service(ports=ports_api))
    rendered = compose.rewrite(model, config_of(services=["web", "api"]), PLAN)
    assert rendered["services"]["web-mirror"]["ports"] == ports_web
    assert rendered["services"]["api-mirror"]["ports"] == ports_api


@pytest.mark.parametrize("other_ip", ["", "0.0.0.0", "127.0.0.1"])
def test_a_port_shared_with_an_unmirrored_service_is_refused(other_ip: str) -> None:
    # compose would only find it half-way through `up`, with containers already created
    model = model_of(
        web=service(ports=[{"published": "8080", "target": 80}]),
        other=service(ports=[{"published": "8080", "target": 81, "host_ip": other_ip}]),
    )
    error = rewrite_error(model, config_of())
    assert "'web' and 'other' both publish host port 8080/tcp" in error.message


def test_unmirrored_services_on_distinct_addresses_or_protocols_do_not_clash() -> None:
    model = model_of(
        web=service(ports=[{"published": "8080", "target": 80, "host_ip": "127.0.0.1"}]),
        other=service(ports=[{"published": "8080", "target": 80, "host_ip": "127.0.0.2"}]),
        dns=service(ports=[{"published": "8080", "target": 80, "protocol": "udp"}]),
    )
    assert "web-mirror" in compose.rewrite(model, config_of(), PLAN)["services"]


def test_two_unmirrored_services_clashing_are_composes_business() -> None:
    model = model_of(
        web=service(),
        a=service(ports=[{"published": "8080", "target": 80}]),
        b=service(ports=[{"published": "8080", "target": 80}]),
    )
    assert "web-mirror" in compose.rewrite(model, config_of(), PLAN)["services"]


def test_external_links_move_to_the_sidecar_and_their_names_stay_local() -> None:
    # Docker refuses links on a container that joins another's network namespace
    model = model_of(web=service(external_links=["legacy-db:db.legacy"]))
    rendered = compose.rewrite(model, config_of(), PLAN)["services"]
    assert "external_links" not in rendered["web"]
    assert rendered["web-mirror"]["external_links"] == ["legacy-db:db.legacy"]
    assert "db.legacy" in compose.project_names(model["services"], config_of())


def test_services_sharing_the_apps_namespace_are_announced() -> None:
    model = model_of(
        web=service(), debug={"image": "busybox", "network_mode": "service:web"}, db=service()
    )
    (notice,) = compose.notices(model, config_of())
    assert notice.startswith("'debug' shares the network namespace of 'web'")
    assert "'web-mirror'" in notice
    assert compose.notices(model_of(web=service()), config_of()) == ()


def rewrite_error(model: dict[str, Any], config: Config) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        compose.rewrite(model, config, PLAN)
    assert caught.value.exit_code == 2
    return caught.value


def test_unknown_mirrored_service_suggests_a_close_name() -> None:
    error = rewrite_error(model_of(web=service(), db=service()), config_of(services=["db", "wbe"]))
    assert error.message == (
        "compose.yaml: x-composemirror.services[1]: 'wbe' is not a service of this project"
    )
    assert error.hint == "did you mean 'web'?"


def test_unknown_mirrored_service_lists_the_services_when_nothing_is_close() -> None:
    error = rewrite_error(model_of(web=service(), db=service()), config_of(services=["zzz"]))
    assert error.hint == "services of this project: db, web"


@pytest.mark.parametrize("mode", ["host", "none", "service:db", "container:abc"])
def test_mirrored_service_with_network_mode_is_refused(mode: str) -> None:
    web = {"image": "example/app", "network_mode": mode}
    error = rewrite_error(model_of(web=web, db=service()), config_of())
    assert f"'web' has `network_mode: {mode}`" in error.message
    if mode == "service:db":
        assert error.hint is not None and error.hint.startswith("mirror 'db' instead")
    else:
        assert error.hint is not None and "x-composemirror.services" in error.hint


@pytest.mark.parametrize("keys", [{"deploy": {"replicas": 2}}, {"scale": 3}])
def test_mirrored_service_with_replicas_is_refused(keys: dict[str, Any]) -> None:
    error = rewrite_error(model_of(web=service(**keys)), config_of())
    assert "'web' runs" in error.message and "replicas" in error.message


@pytest.mark.parametrize("keys", [{"deploy": {"replicas": 1}}, {"scale": 1}, {"deploy": {}}])
def test_mirrored_service_with_one_replica_is_fine(keys: dict[str, Any]) -> None:
    assert (
        "web-mirror"
        in compose.rewrite(model_of(web=service(**keys)), config_of(), PLAN)["services"]
    )


def test_a_mirrored_service_on_an_ipv6_network_is_refused() -> None:
    """Issue 10 fault 10: the sidecar intercepts IPv4 only; IPv6 would bypass it unnoticed."""
    model = model_of(web=service(networks={"v6": None}), db=service(networks={"v6": None}))
    model["networks"]["v6"] = {"name": "proj_v6", "enable_ipv6": True}
    error = rewrite_error(model, config_of())
    assert "'web' is on network 'v6', which has `enable_ipv6: true`" in error.message
    assert error.hint is not None and "remove `enable_ipv6` from network 'v6'" in error.hint
    # An unmirrored service may use it.
    model["services"]["web"] = service()
    assert "web-mirror" in compose.rewrite(model, config_of(), PLAN)["services"]


def test_hosts_naming_a_missing_service() -> None:
    error = rewrite_error(
        model_of(web=service(), db=service()), config_of(hosts={"postgres.shop": "dbb"})
    )
    assert error.message == (
        "compose.yaml: x-composemirror.hosts.postgres.shop: 'dbb' is not a service of this project"
    )
    assert error.hint == "did you mean 'db'?"


def test_hosts_target_sharing_no_network_with_a_mirrored_service() -> None:
    model = model_of(web=service(networks={"front": None}), db=service(networks={"back": None}))
    error = rewrite_error(model, config_of(hosts={"postgres.shop": "db"}))
    assert error.message == (
        "compose.yaml: x-composemirror.hosts.postgres.shop: 'db' shares no "
        "network with 'web', so 'web' cannot reach it"
    )
    assert error.hint == "put 'db' and 'web' on a common network"


@pytest.mark.parametrize("taken", ["web-mirror", "composemirror-agent"])
def test_a_user_service_with_one_of_composemirrors_names(taken: str) -> None:
    error = rewrite_error(model_of(web=service(), **{taken: service()}), config_of())
    assert f"already has a service named {taken!r}" in error.message
    assert error.hint == "rename that service"


def test_an_unmirrored_service_named_like_a_sidecar_of_nothing_is_fine() -> None:
    model = model_of(web=service(), **{"db-mirror": service()})
    assert "db-mirror" in compose.rewrite(model, config_of(), PLAN)["services"]


def test_published_ports() -> None:
    svc = {
        "ports": [
            {"target": 80, "published": "8080", "protocol": "tcp"},
            {"target": 53, "published": "5353", "protocol": "udp", "host_ip": "127.0.0.1"},
            {"target": 90, "published": "9000-9001", "host_ip": "0.0.0.0"},
            {"target": 70},
        ]
    }
    assert list(compose.published_ports(svc)) == [
        ("", 8080, "tcp"),
        ("127.0.0.1", 5353, "udp"),
        ("", 9000, "tcp"),
        ("", 9001, "tcp"),
    ]


def test_project_names() -> None:
    services = {
        "web": {"container_name": "Shop-Web", "networks": {"default": {"aliases": ["www."]}}},
        "db": {
            "links": ["cache:redis"],
            "extra_hosts": ["legacy.example=192.0.2.1", "old.example:192.0.2.2"],
        },
        "cache": {"networks": {"default": None}},
    }
    config = config_of(hosts={"Postgres.Shop": "db"})
    assert compose.project_names(services, config, "proj") == {
        "web",
        "db",
        "cache",
        "shop-web",
        "proj-db-1",
        "proj-cache-1",
        "www",
        "redis",
        "legacy.example",
        "old.example",
        "postgres.shop",
        "web-mirror",
        "composemirror-agent",
    }


def test_the_app_resolves_with_the_targets_search_list_and_ndots() -> None:
    """The app shares its sidecar's resolv.conf: the target's `search` and `ndots` go there, the
    app's other resolver options stay, and the app's own search list and ndots give way."""
    model = model_of(web=service(dns_search=["local.test"], dns_opt=["ndots:2", "timeout:1"]))
    resolver = Resolver(search=("team.svc.cluster.local", "svc.cluster.local"), ndots=5)
    rendered = compose.rewrite(model, config_of(), replace(PLAN, resolver=resolver))
    sidecar = rendered["services"]["web-mirror"]
    assert sidecar["dns_search"] == ["team.svc.cluster.local", "svc.cluster.local"]
    assert sidecar["dns_opt"] == ["timeout:1", "ndots:5"]
    assert "dns_search" not in rendered["services"]["web"]
    # A target without search domains: `.` tells Docker not to use the host's.
    bare = compose.rewrite(model_of(web=service()), config_of(), replace(PLAN, resolver=Resolver()))
    assert bare["services"]["web-mirror"]["dns_search"] == ["."]
    assert bare["services"]["web-mirror"]["dns_opt"] == ["ndots:1"]


def test_the_agent_gets_the_configured_handshake_timeout() -> None:
    rendered = compose.rewrite(
        model_of(web=service()), config_of(agent={"handshake_timeout": 2}), PLAN
    )
    command = rendered["services"][compose.AGENT_SERVICE]["command"]
    assert command[-2:] == ["--handshake-timeout", "2"]
