"""The rewrite: the compose model in, the model with sidecars (and a local agent) out.

`rewrite()` is a pure function over the model that `docker compose config --format json` returns
(interpolated, merged, normalised). It never reads or writes files and never talks to Docker; the
caller resolves images, the target, its environment and the agent's placement first and passes
them in a `Plan`. A `ContainerPlacement` adds the agent as a service linked by a shared volume; a
`ForwardedPlacement` adds no agent and points the sidecars at the forwarder's address.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from composemirror import environment
from composemirror.backends import ContainerPlacement, ForwardedPlacement, Placement, Resolver
from composemirror.config import BLOCK, Config
from composemirror.errors import ConfigError
from composemirror.link import (
    AGENT_LINK,
    ENV_VAR,
    LINK_DIR,
    READY_FILE,
    AgentSettings,
    FilterText,
    LinkAddress,
    SidecarSettings,
)

LABEL_PROJECT = "io.composemirror.project"
LABEL_ROLE = "io.composemirror.role"
LABEL_VERSION = "io.composemirror.version"
LABEL_SERVICE = "io.composemirror.service"
"""On a sidecar: the app service it serves."""

AGENT_SERVICE = "composemirror-agent"
LINK_VOLUME = "composemirror-link"
KEY_SECRET = "composemirror-key"
KEY_ENV = "COMPOSEMIRROR_TUNNEL_KEY"
"""The variable compose reads the tunnel key from (the secret's `environment:` source). Compose
copies such a secret into the container's `/run/secrets/` (no bind mount, so it works when the
CLI runs in a container against the host's engine, and the key is in no `docker inspect`, no
container env and no log); the variable is set for compose's process only."""
KEY_DIGEST_ENV = "COMPOSEMIRROR_TUNNEL_KEY_DIGEST"
"""The variable compose reads the `LABEL_KEY` label of sidecars and agents from: a digest of the
tunnel key (`key_digest`), so a new key is a changed configuration that compose recreates them
for (a secret's content is not part of compose's configuration hash)."""
LABEL_KEY = "io.composemirror.key"
"""On a sidecar or an agent: `key_digest` of the tunnel key it was created with."""
SIDECAR_SUFFIX = "-mirror"

# Keys Docker refuses on a container that joins another's network namespace: they describe the
# network identity, so they move to the sidecar that owns the namespace.
MOVED_KEYS = (
    "networks",
    "ports",
    "expose",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
    "links",
    "external_links",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the rewrite needs from the outside world, resolved beforehand by `ops`."""

    version: str
    sidecar_image: str
    agent_image: str
    placement: Placement
    """Where the agent runs and how the sidecars reach it."""
    remote_env: Mapping[str, str] = field(default_factory=dict)
    env_file: Mapping[str, str] = field(default_factory=dict)
    """Values of `feature.env.env_file`, already read."""
    resolver: Resolver | None = None
    """The target's resolver: its `search` and `ndots` become the app's (through its sidecar's
    `dns_search` and `dns_opt`, since the app shares the sidecar's resolv.conf)."""


def sidecar_name(service: str) -> str:
    return service + SIDECAR_SUFFIX


def rewrite(model: Mapping[str, Any], config: Config, plan: Plan) -> dict[str, Any]:
    """Return the rendered compose model. The input is not modified."""
    rendered: dict[str, Any] = copy.deepcopy(dict(model))
    rendered.pop(BLOCK, None)
    project = str(rendered.get("name", ""))
    services: dict[str, Any] = rendered.setdefault("services", {})
    _check(services, config)
    _check_ipv6(services, rendered.get("networks") or {}, config)
    local = project_names(services, config, project)
    if isinstance(plan.placement, ForwardedPlacement):
        local |= {name.lower() for name in plan.placement.extra_hosts}
    names = sorted(local)
    for name in config.services:
        app = services[name]
        side = sidecar_name(name)
        services[side] = _sidecar(name, app, config, plan, project, names)
        for key in MOVED_KEYS:
            app.pop(key, None)
        app["network_mode"] = f"service:{side}"
        # The model writes `$$` for a literal `$`: merge raw values, then write them back so.
        merged = environment.merge(
            plan.remote_env,
            config.env,
            env_file=plan.env_file,
            compose=unescape(app.get("environment") or {}),
        )
        app["environment"] = {k: None if v is None else escape(v) for k, v in merged.items()}
        depends = app.setdefault("depends_on", {})
        depends[side] = {"condition": "service_healthy", "restart": True, "required": True}
        app["labels"] = {**(app.get("labels") or {}), **_labels(project, plan, "app", name)}
    for service in services.values():
        _redirect(service, config.services)
        # compose config lists only the services of the active profiles; without this the
        # rendered file would need the same --profile flags on every later compose call.
        service.pop("profiles", None)
    if isinstance(plan.placement, ContainerPlacement):
        services[AGENT_SERVICE] = {
            "image": plan.agent_image,
            "command": AgentSettings(
                listen=AGENT_LINK, handshake_timeout=config.agent.handshake_timeout
            ).command(),
            "network_mode": plan.placement.network_mode,
            "volumes": [_link_mount()],
            "secrets": [KEY_SECRET],
            "restart": "unless-stopped",
            "labels": _labels(project, plan, "agent"),
        }
        rendered.setdefault("volumes", {})[LINK_VOLUME] = {"labels": _labels(project, plan, "link")}
    rendered.setdefault("secrets", {})[KEY_SECRET] = {"environment": KEY_ENV}
    return rendered


def link_of(placement: Placement) -> LinkAddress:
    """Where the sidecars dial for `placement`."""
    if isinstance(placement, ForwardedPlacement):
        return placement.link
    return AGENT_LINK


def project_names(services: Mapping[str, Any], config: Config, project: str = "") -> set[str]:
    """Every name the project's own DNS answers: these stay local unless filtered remote.

    Service names, container names (compose's `<project>-<service>-<n>` or `container_name`),
    aliases, links and external links, `extra_hosts`, and the `hosts` of the configuration.
    """
    names = set(config.hosts) | {AGENT_SERVICE} | {sidecar_name(s) for s in config.services}
    for name, service in services.items():
        names.add(name)
        names.update(container_names(project, name, service))
        for network in (service.get("networks") or {}).values():
            names.update((network or {}).get("aliases") or ())
        for link in [*(service.get("links") or ()), *(service.get("external_links") or ())]:
            names.add(link.split(":")[-1])
        for entry in service.get("extra_hosts") or ():
            names.add(_extra_host_name(entry))
    return {n.lower().rstrip(".") for n in names}


def container_names(project: str, name: str, service: Mapping[str, Any]) -> list[str]:
    """The names compose gives a service's containers: `container_name`, else
    `<project>-<service>-<n>` for each replica (docker compose's naming, `-` separated since
    Compose v2; see the compose docs, "container_name")."""
    if service.get("container_name"):
        return [str(service["container_name"])]
    if not project:
        return []
    replicas = (service.get("deploy") or {}).get("replicas") or service.get("scale") or 1
    return [f"{project}-{name}-{n}" for n in range(1, int(replicas) + 1)]


def notices(model: Mapping[str, Any], config: Config) -> tuple[str, ...]:
    """What the rewrite does that the user may not expect, one sentence each: services that
    share a mirrored app's network namespace (`network_mode: service:APP`) share its sidecar,
    so their traffic is filtered and tunnelled as the app's is."""
    found = []
    for name, service in sorted((model.get("services") or {}).items()):
        owner = str(service.get("network_mode") or "").removeprefix("service:")
        if owner in config.services and name not in config.services:
            found.append(
                f"{name!r} shares the network namespace of {owner!r} (network_mode: "
                f"service:{owner}), so its traffic goes through {sidecar_name(owner)!r} too: "
                "names and addresses the filter does not make local reach the cluster"
            )
    return tuple(found)


def published_ports(service: Mapping[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(host ip, host port, protocol) for every port a service publishes on the host."""
    for port in service.get("ports") or ():
        published = str(port.get("published") or "")
        if not published:
            continue
        first, _, last = published.partition("-")
        host_ip = port.get("host_ip") or ""
        if host_ip in ("0.0.0.0", "::"):
            host_ip = ""
        for number in range(int(first), int(last or first) + 1):
            yield (host_ip, number, port.get("protocol") or "tcp")


def _check(services: Mapping[str, Any], config: Config) -> None:
    where = f"{config.source}: {BLOCK}"
    for i, name in enumerate(config.services):
        if name not in services:
            raise ConfigError(
                f"{where}.services[{i}]: {name!r} is not a service of this project",
                hint=_suggest(name, services),
            )
        service = services[name]
        mode = service.get("network_mode")
        if mode:
            owner = str(mode).removeprefix("service:")
            hint = (
                f"mirror {owner!r} instead (its sidecar serves {name!r} too, which shares its "
                "network namespace)"
                if str(mode).startswith("service:")
                else f"remove network_mode from {name!r}, or remove it from {BLOCK}.services"
            )
            raise ConfigError(
                f"service {name!r} has `network_mode: {mode}`, so it cannot get a sidecar",
                hint=hint,
            )
        replicas = (service.get("deploy") or {}).get("replicas") or service.get("scale") or 1
        if int(replicas) > 1:
            raise ConfigError(
                f"service {name!r} runs {replicas} replicas; a mirrored service runs one container",
                hint="remove deploy.replicas/scale from it",
            )
        for ours in (sidecar_name(name), AGENT_SERVICE):
            if ours in services:
                raise ConfigError(
                    f"the project already has a service named {ours!r}, "
                    "which composemirror needs for its own containers",
                    hint="rename that service",
                )
    _check_ports(services, config)
    for host, target in config.hosts.items():
        key = f"{where}.hosts.{host}"
        if target not in services:
            raise ConfigError(
                f"{key}: {target!r} is not a service of this project",
                hint=_suggest(target, services),
            )
        target_networks = set(services[target].get("networks") or {})
        for name in config.services:
            if not target_networks & set(services[name].get("networks") or {}):
                raise ConfigError(
                    f"{key}: {target!r} shares no network with {name!r}, "
                    f"so {name!r} cannot reach it",
                    hint=f"put {target!r} and {name!r} on a common network",
                )


def _check_ipv6(services: Mapping[str, Any], networks: Mapping[str, Any], config: Config) -> None:
    """Refuse a mirrored service on an IPv6-enabled network: the sidecar intercepts IPv4 only,
    so the app's IPv6 traffic would bypass the filter and the tunnel unnoticed. (An external
    network's settings are not in the model: the sidecar refuses to start on one instead.)"""
    for name in config.services:
        for network in services[name].get("networks") or {}:
            if (networks.get(network) or {}).get("enable_ipv6"):
                raise ConfigError(
                    f"service {name!r} is on network {network!r}, which has `enable_ipv6: "
                    "true`; composemirror intercepts IPv4 only, so the app's IPv6 traffic "
                    "would bypass the filter and the tunnel",
                    hint=f"remove `enable_ipv6` from network {network!r}, or put {name!r} "
                    "on an IPv4-only network",
                )


def _check_ports(services: Mapping[str, Any], config: Config) -> None:
    """Refuse two services publishing the same host port when one of them is mirrored.

    A mirrored app's ports move to its sidecar; compose would find the clash only half-way
    through `up`, with containers already created. An empty host address (or 0.0.0.0, ::)
    binds every address, so it clashes with any other on the same port and protocol.
    """
    taken: dict[tuple[int, str], list[tuple[str, str]]] = {}
    order = [*config.services, *(n for n in services if n not in config.services)]
    for name in order:
        for host_ip, port, protocol in published_ports(services[name]):
            for other_ip, other in taken.get((port, protocol), []):
                clash = not host_ip or not other_ip or host_ip == other_ip
                if other != name and clash and other in config.services:
                    raise ConfigError(
                        f"services {other!r} and {name!r} both publish host port "
                        f"{port}/{protocol}; compose would fail half-way through `up`",
                        hint="give each a different published port",
                    )
            taken.setdefault((port, protocol), []).append((host_ip, name))


def _sidecar(
    name: str,
    app: Mapping[str, Any],
    config: Config,
    plan: Plan,
    project: str,
    names: list[str],
) -> dict[str, Any]:
    local_agent = isinstance(plan.placement, ContainerPlacement)
    mounts = _sidecar_mounts(plan.placement)
    settings = SidecarSettings(
        service=name,
        link=link_of(plan.placement),
        names=tuple(names),
        hosts=dict(config.hosts),
        tcp=config.network.tcp,
        udp=config.network.udp,
        outgoing=FilterText.of(config.network.outgoing),
        dns_enabled=config.network.dns_enabled,
        dns=FilterText.of(config.network.dns),
    )
    sidecar: dict[str, Any] = {
        "image": plan.sidecar_image,
        "command": ["python3", "-m", "composemirror.sidecar"],
        "cap_add": ["NET_ADMIN"],
        "environment": {ENV_VAR: escape(settings.to_json())},
        **({"volumes": mounts} if mounts else {}),
        "secrets": [KEY_SECRET],
        # Healthy while the rules are in place and the link is up (link.READY_FILE); failures
        # in the first minute do not count, later three in a row make the sidecar unhealthy.
        "healthcheck": {
            "test": ["CMD", "test", "-e", READY_FILE],
            "interval": "1s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "60s",
        },
        **(
            {"depends_on": {AGENT_SERVICE: {"condition": "service_started", "required": True}}}
            if local_agent
            else {}
        ),
        "labels": _labels(project, plan, "sidecar", name),
    }
    for key in MOVED_KEYS:
        if app.get(key) is not None:
            sidecar[key] = copy.deepcopy(app[key])
    if plan.resolver is not None:
        _resolve_as(sidecar, plan.resolver)
    if isinstance(plan.placement, ForwardedPlacement) and plan.placement.extra_hosts:
        sidecar["extra_hosts"] = _with_hosts(sidecar.get("extra_hosts"), plan.placement.extra_hosts)
    if app.get("restart") is not None:
        sidecar["restart"] = app["restart"]
    # Other services keep finding the app under its own name and its container name (which
    # the app's container, having no network of its own, no longer answers to).
    aliases = [name, *container_names(project, name, app)]
    networks = sidecar.get("networks") or {"default": None}
    for network_name, network in list(networks.items()):
        network = dict(network or {})
        network["aliases"] = sorted({*(network.get("aliases") or ()), *aliases})
        networks[network_name] = network
    sidecar["networks"] = networks
    return sidecar


def _resolve_as(sidecar: dict[str, Any], resolver: Resolver) -> None:
    """Give the namespace the target's `search` and `ndots`, so the app's own resolver expands
    names as the target's does and every query on the wire is absolute. Docker reads `.` as "no
    search domains" (else the host's would apply). Other `dns_opt` entries of the app stay."""
    sidecar["dns_search"] = list(resolver.search) or ["."]
    options = [o for o in sidecar.get("dns_opt") or () if not str(o).startswith("ndots:")]
    sidecar["dns_opt"] = [*options, f"ndots:{resolver.ndots}"]


def _redirect(service: dict[str, Any], mirrored: tuple[str, ...]) -> None:
    """Point other services' `network_mode: service:APP` and links at the app's sidecar."""
    mode = service.get("network_mode") or ""
    if mode.startswith("service:") and mode.removeprefix("service:") in mirrored:
        service["network_mode"] = "service:" + sidecar_name(mode.removeprefix("service:"))
    links = service.get("links")
    if links:
        rewritten = []
        for link in links:
            target, _, alias = link.partition(":")
            if target in mirrored:
                link = f"{sidecar_name(target)}:{alias or target}"
            rewritten.append(link)
        service["links"] = rewritten


def _labels(project: str, plan: Plan, role: str, service: str | None = None) -> dict[str, str]:
    labels = {LABEL_PROJECT: project, LABEL_ROLE: role, LABEL_VERSION: plan.version}
    if service is not None:
        labels[LABEL_SERVICE] = service
    if role in ("sidecar", "agent"):
        labels[LABEL_KEY] = "${" + KEY_DIGEST_ENV + ":-}"  # compose fills it in at `up`
    return labels


def key_digest(key: str) -> str:
    """A short digest of the tunnel key's text (16 hex digits of its SHA-256): tells keys apart,
    says nothing of the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def escape(value: str) -> str:
    """A raw string as compose's model writes it: `$$` for a literal `$`."""
    return value.replace("$", "$$")


def unescape(value: Any) -> Any:
    """Strings of a compose model (recursively) as raw values: `$$` is a literal `$`."""
    if isinstance(value, str):
        return value.replace("$$", "$")
    if isinstance(value, dict):
        return {k: unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unescape(v) for v in value]
    return value


def _sidecar_mounts(placement: Placement) -> list[dict[str, str]]:
    """The link volume shared with a local agent, or the forwarder's bind mounts."""
    if isinstance(placement, ContainerPlacement):
        return [_link_mount()]
    return [
        {"type": "bind", "source": source, "target": target}
        for source, target in sorted(placement.mounts.items())
    ]


def _link_mount() -> dict[str, str]:
    return {"type": "volume", "source": LINK_VOLUME, "target": LINK_DIR}


def _with_hosts(entries: Any, hosts: Mapping[str, str]) -> Any:
    """The app's extra_hosts (a list or, from newer compose, a mapping) plus `hosts`."""
    if isinstance(entries, dict):
        return {**entries, **{name: [address] for name, address in hosts.items()}}
    kept = [e for e in entries or () if _extra_host_name(e) not in hosts]
    return [*kept, *(f"{name}={address}" for name, address in sorted(hosts.items()))]


def _extra_host_name(entry: str) -> str:
    separator = "=" if "=" in entry else ":"
    return entry.split(separator, 1)[0]


def _suggest(name: str, services: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(services), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"services of this project: {', '.join(sorted(services))}"
