"""The x-composemirror configuration: a typed, frozen model and its one loader.

`load()` takes the block as plain data (from the compose model, `composemirror.yaml` or
`--config FILE`) and returns a `Config` or raises `ConfigError` naming the file and the key path.
mirrord's `target` and `feature` keys are accepted verbatim; keys that make no sense at the
network level (`fs`, `network.incoming`, ...) are accepted and reported as ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from composemirror.errors import ConfigError
from composemirror.filters import Filter, FilterSyntaxError, Mode, parse_filter

BLOCK = "x-composemirror"
CONFIG_FILE_NAME = "composemirror.yaml"
MAX_DEPTH = 100
"""Deepest nesting of mappings and lists accepted in a compose model or configuration file; no
key of compose or composemirror needs more, and deeper data would exhaust Python's recursion."""
MAX_NAME_LENGTH = 253
"""Longest target name: a Kubernetes object name is a DNS subdomain (RFC 1123), at most 253."""

TargetKind = Literal[
    "pod",
    "deployment",
    "statefulset",
    "rollout",
    "job",
    "cronjob",
    "service",
    "replicaset",
    "targetless",
    "docker",
]
_KINDS: dict[str, TargetKind] = {
    "pod": "pod",
    "deployment": "deployment",
    "deploy": "deployment",
    "statefulset": "statefulset",
    "rollout": "rollout",
    "job": "job",
    "cronjob": "cronjob",
    "service": "service",
    "replicaset": "replicaset",
}
_TARGET_TABLE_KINDS: dict[str, TargetKind] = {
    "pod": "pod",
    "deployment": "deployment",
    "stateful_set": "statefulset",
    "rollout": "rollout",
    "job": "job",
    "cron_job": "cronjob",
    "service": "service",
    "replica_set": "replicaset",
}

# mirrord keys that have no meaning for a network-level sidecar: accepted so that a mirrord
# config pastes in unchanged, and reported once as ignored.
_IGNORED_FEATURE_KEYS = (
    "fs",
    "hostname",
    "copy_target",
    "split_queues",
    "db_branches",
    "magic",
    "preview",
)
_IGNORED_TOP_KEYS = (
    "operator",
    "kubeconfig",
    "accept_invalid_certificates",
    "skip_processes",
    "skip_build_tools",
    "telemetry",
    "internal_proxy",
    "external_proxy",
    "use_proxy",
    "sip_binaries",
    "pause",
    "connect_tcp",
    "experimental",
    "ci",
    "feedback",
)

# mirrord's agent never imports these (mirrord/agent/src/env.rs); HOSTNAME and KUBERNETES_* are
# added because inside a container they describe the pod, not the app, and would mislead it.
DEFAULT_ENV_EXCLUDES = (
    "BUNDLER_ORIG_BUNDLER_ORIG_MANPATH",
    "BUNDLER_ORIG_BUNDLER_VERSION",
    "BUNDLER_ORIG_BUNDLE_BIN_PATH",
    "BUNDLER_ORIG_BUNDLE_GEMFILE",
    "BUNDLER_ORIG_GEM_HOME",
    "BUNDLER_ORIG_MANPATH",
    "BUNDLER_ORIG_PATH",
    "BUNDLER_ORIG_RB_USER_INSTALL",
    "BUNDLER_ORIG_RUBYLIB",
    "BUNDLER_ORIG_RUBYOPT",
    "BUNDLER_VERSION",
    "BUNDLE_APP_CONFIG",
    "BUNDLE_BIN_PATH",
    "BUNDLE_FORCE_RUBY_PLATFORM",
    "BUNDLE_GEMFILE",
    "BUNDLE_GEM_PATH",
    "BUNDLE_PATH",
    "BUNDLE_WITHOUT",
    "CATALINA_HOME",
    "CLASSPATH",
    "DOTNET_EnableDiagnostics",
    "DOTNET_STARTUP_HOOKS",
    "GEM_HOME",
    "GEM_PATH",
    "GOPATH",
    "GOMODCACHE",
    "HOME",
    "HOMEPATH",
    "JAVA_EXE",
    "JAVA_HOME",
    "JAVA_TOOL_OPTIONS",
    "PATH",
    "PWD",
    "PYTHONPATH",
    "RUBYLIB",
    "RUBYOPT",
    "MIRRORD_LOG",
    "RUST_LOG",
    "_JAVA_OPTIONS",
    "TEMP",
    "TMP",
    "TMPDIR",
    "HOSTNAME",
    "KUBERNETES_*",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What the app impersonates: a workload in the cluster, or a local container."""

    kind: TargetKind
    name: str | None = None
    """Workload or container name; None for `targetless`."""
    container: str | None = None
    """Container within the pod, when the workload has several."""

    def __str__(self) -> str:
        if self.kind == "targetless":
            return "targetless"
        if self.kind == "docker":
            return f"docker://{self.name}"
        suffix = f"/container/{self.container}" if self.container else ""
        return f"{self.kind}/{self.name}{suffix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvSettings:
    """`feature.env`, with mirrord's semantics."""

    enabled: bool = True
    """False imports nothing from the target (mirrord's `env: false`)."""
    include: tuple[str, ...] = ()
    """Glob patterns (`*`, `?`); when given, only matching remote variables are imported."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of remote variables not to import, on top of `DEFAULT_ENV_EXCLUDES`."""
    override: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Values that win over everything else."""
    env_file: Path | None = None
    """A dotenv file whose values win over the remote ones."""
    mapping: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Regex on a variable's name -> the value it gets instead."""
    unset: tuple[str, ...] = ()
    """Names (case-insensitive) removed from the app's final environment."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkSettings:
    """`feature.network`: which traffic and which DNS queries go to the cluster."""

    tcp: bool = True
    """Tunnel outgoing TCP that the filter sends remote."""
    udp: bool = True
    """Tunnel outgoing UDP that the filter sends remote."""
    outgoing: Filter | None = None
    """`outgoing.filter`; None sends everything that is not the project's own to the cluster."""
    dns_enabled: bool = True
    """Resolve names in the cluster (mirrord's `dns.enabled`); False resolves all locally."""
    dns: Filter | None = None
    """`dns.filter`: which names are resolved on which side."""


# mirrord's `agent` keys that composemirror uses; the others are accepted and reported ignored.
_AGENT_KEYS = (
    "image",
    "image_pull_policy",
    "image_pull_secrets",
    "ttl",
    "startup_timeout",
    "ephemeral",
    "namespace",
    "labels",
    "annotations",
    "port",
    "handshake_timeout",
)
_IGNORED_AGENT_KEYS = (
    "log_level",
    "json_log",
    "communication_timeout",
    "network_interface",
    "flush_connections",
    "disabled_capabilities",
    "tolerations",
    "resources",
    "check_out_of_pods",
    "privileged",
    "nftables",
    "dns",
    "node_selector",
    "service_account",
    "metrics",
    "exclude_from_mesh",
    "inject_headers",
    "max_body_buffer_size",
    "max_body_buffer_timeout",
    "priority_class",
    "security_context",
    "clear_iptables_on_start",
)
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_AGENT_IMAGE = "python:3.12-slim"
"""A stock public image: the agent's code travels in the session's Secret (Kubernetes backend)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """mirrord's `agent` block, for targets in a Kubernetes cluster."""

    image: str = DEFAULT_AGENT_IMAGE
    """Any image with python3 >= 3.11; the agent's code is carried in, so none is published."""
    image_pull_policy: str = "IfNotPresent"
    """Always, IfNotPresent or Never, as in a pod spec."""
    image_pull_secrets: tuple[str, ...] = ()
    """Names of docker-registry Secrets in the agent's namespace."""
    ttl: int = 30
    """Seconds the agent waits with no link connected before it exits (mirrord's `ttl`)."""
    startup_timeout: int = 60
    """Seconds to wait for the agent to be ready (image pull included)."""
    ephemeral: bool = True
    """Run the agent as an ephemeral container in the target pod (False: a Job beside it)."""
    namespace: str | None = None
    """Namespace of a Job agent (targetless, fallback); None for the target's."""
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Extra labels on what composemirror creates in the cluster."""
    annotations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Extra annotations on what composemirror creates in the cluster."""
    port: int = 47017
    """Port the agent listens on, on 127.0.0.1 inside the pod."""
    handshake_timeout: int = 5
    """Seconds a connection to the agent has to prove the tunnel key before the agent drops it
    (composemirror's own key, for any target)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole x-composemirror block, validated."""

    source: str
    """Where it came from, e.g. `x-composemirror in compose.yaml`, for messages."""
    target: Target
    namespace: str | None = None
    """Kubernetes namespace of the target; None for the context's default."""
    context: str | None = None
    """Kubernetes context (mirrord's `kube_context`); None for the current one."""
    services: tuple[str, ...] = ()
    """Compose services that get a sidecar."""
    hosts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Host name -> compose service that answers for it (lower-case names)."""
    env: EnvSettings = field(default_factory=EnvSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    ignored: tuple[str, ...] = ()
    """mirrord keys that were accepted but have no effect here, as key paths."""


def load(block: Any, *, source: str, base_dir: Path) -> Config:
    """Validate a raw x-composemirror block. `base_dir` anchors relative paths (`env_file`)."""
    check_depth(block, source=source, path=BLOCK)
    return _Loader(source, base_dir).config(block)


def check_depth(document: Any, *, source: str, path: str = "") -> None:
    """Raise ConfigError when `document` (plain data: dicts, lists, scalars) nests mappings and
    lists more than MAX_DEPTH levels deep, naming `source` and where. Iterative, so it cannot
    itself run out of stack."""
    stack: list[tuple[Any, int, str]] = [(document, 0, path)]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            shown = where if len(where) <= 80 else where[:77] + "..."
            raise ConfigError(
                f"{source}: {shown}: nested more than {MAX_DEPTH} levels deep",
                hint="flatten it: no compose or composemirror key needs that depth",
            )
        if isinstance(value, dict):
            stack.extend(
                (item, depth + 1, f"{where}.{key}" if where else str(key))
                for key, item in value.items()
            )
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))


class _Loader:
    """Walks the raw block once, keeping the key path for every error it raises."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.ignored: list[str] = []

    def fail(self, path: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}", hint=hint)

    def table(self, value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_kind(value)}")
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
                raise self.fail(f"{path}.{key}", "unknown key", hint)
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        """mirrord's `VecOrSingle`: a string (`;`-separated) or a list of strings."""
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(part for part in (p.strip() for p in value.split(";")) if part)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.fail(f"{path}[{i}]", f"expected a string, got {_kind(item)}")
            return tuple(value)
        raise self.fail(path, f"expected a string or a list of strings, got {_kind(value)}")

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_kind(value)}")
        return value

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_kind(value)}")
        result = {}
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise self.fail(f"{path}.{key}", f"expected a string, got {_kind(item)}")
            result[str(key)] = str(item)
        return result

    def config(self, block: Any) -> Config:
        known = (
            "target",
            "namespace",
            "kube_context",
            "services",
            "hosts",
            "feature",
            "agent",
            *_IGNORED_TOP_KEYS,
        )
        raw = self.table(block, BLOCK, known)
        self.ignored.extend(f"{BLOCK}.{k}" for k in _IGNORED_TOP_KEYS if k in raw)
        target, namespace = self.target(raw.get("target"), raw.get("namespace"))
        context = raw.get("kube_context")
        if context is not None and not isinstance(context, str):
            raise self.fail(f"{BLOCK}.kube_context", f"expected a string, got {_kind(context)}")
        services = self.strings(raw.get("services"), f"{BLOCK}.services")
        if not services:
            raise self.fail(
                f"{BLOCK}.services",
                "missing: list the compose services that should reach the cluster",
                "e.g. `services: [web]`",
            )
        if len(set(services)) != len(services):
            raise self.fail(f"{BLOCK}.services", "lists a service twice")
        hosts = self.hosts(raw.get("hosts"))
        feature = self.table(
            raw.get("feature"), f"{BLOCK}.feature", ("env", "network", *_IGNORED_FEATURE_KEYS)
        )
        self.ignored.extend(f"{BLOCK}.feature.{k}" for k in _IGNORED_FEATURE_KEYS if k in feature)
        network = self.network(feature.get("network"))
        self.check_hosts(hosts, network)
        return Config(
            source=self.source,
            target=target,
            namespace=namespace,
            context=context,
            services=services,
            hosts=MappingProxyType(hosts),
            env=self.env(feature.get("env")),
            network=network,
            agent=self.agent(raw.get("agent")),
            ignored=tuple(self.ignored),
        )

    def target(self, value: Any, namespace: Any) -> tuple[Target, str | None]:
        path = f"{BLOCK}.target"
        namespace_path = f"{BLOCK}.namespace"
        if isinstance(value, dict):
            table = self.table(value, path, ("path", "namespace"))
            if table.get("namespace") is not None:
                if namespace is not None and namespace != table["namespace"]:
                    raise self.fail(
                        path + ".namespace", f"conflicts with {BLOCK}.namespace; keep one of them"
                    )
                namespace = table["namespace"]
                namespace_path = path + ".namespace"
            value = table.get("path", "targetless")
            path += ".path"
            if isinstance(value, dict):
                value = self.target_table(value, path)
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise self.fail(namespace_path, "expected a namespace name")
        if value is None:
            raise self.fail(
                path,
                "missing: name what the app impersonates",
                "e.g. `target: deployment/checkout`, `targetless` or `docker://CONTAINER`",
            )
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_kind(value)}")
        return self.target_text(value, path), namespace

    def target_table(self, value: dict[str, Any], path: str) -> str:
        table = self.table(value, path, (*_TARGET_TABLE_KINDS, "container"))
        kinds = [k for k in table if k != "container"]
        if len(kinds) != 1:
            raise self.fail(path, "name exactly one workload, e.g. `{deployment: checkout}`")
        for key, item in table.items():
            if (key != "container" or item is not None) and (not isinstance(item, str) or not item):
                raise self.fail(f"{path}.{key}", f"expected a name, got {_kind(item)}")
        text = f"{_TARGET_TABLE_KINDS[kinds[0]]}/{table[kinds[0]]}"
        if table.get("container"):
            text += f"/container/{table['container']}"
        return text

    def target_text(self, text: str, path: str) -> Target:
        if text == "targetless":
            return Target(kind="targetless")
        for name in re.split(r"/|://", text):
            if len(name) > MAX_NAME_LENGTH:
                raise self.fail(
                    path,
                    f"{_shorten(name)} is {len(name)} characters long: not a name",
                    "name a pod, workload or container: such names are at most "
                    f"{MAX_NAME_LENGTH} characters",
                )
        if text.startswith("docker://"):
            name = text.removeprefix("docker://")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise self.fail(
                    path, f"{_shorten(text)}: expected docker://CONTAINER (a name or an id)"
                )
            return Target(kind="docker", name=name)
        parts = text.split("/")
        kind = _KINDS.get(parts[0].lower())
        if kind is None or len(parts) not in (2, 4) or not parts[1]:
            raise self.fail(
                path,
                f"{_shorten(text)} is not a target",
                "use pod/NAME, deployment/NAME, statefulset/NAME, replicaset/NAME, job/NAME or "
                "cronjob/NAME (optionally /container/C), targetless, or docker://CONTAINER",
            )
        container = None
        if len(parts) == 4:
            if parts[2] != "container" or not parts[3]:
                raise self.fail(path, f"{_shorten(text)}: expected KIND/NAME/container/CONTAINER")
            container = parts[3]
        return Target(kind=kind, name=parts[1], container=container)

    def hosts(self, value: Any) -> dict[str, str]:
        hosts = self.string_map(value, f"{BLOCK}.hosts")
        result = {}
        for name, service in hosts.items():
            try:
                rule = parse_filter("local", [name], protocols=True).rules[0]
            except FilterSyntaxError as e:
                raise self.fail(f"{BLOCK}.hosts.{name}", str(e)) from None
            if rule.name is None or rule.wildcard or rule.qualified:
                raise self.fail(f"{BLOCK}.hosts.{name}", "expected a plain host name")
            result[rule.name] = service
        return result

    def check_hosts(self, hosts: dict[str, str], network: NetworkSettings) -> None:
        """Refuse a `hosts` name that an outgoing `remote` entry also names: `hosts` answers
        it with a local service's address while the entry sends its traffic to the cluster,
        so neither side would reach what it means. (A DNS `remote` entry may cover a `hosts`
        name: `hosts` decides its answer.)"""
        outgoing = network.outgoing
        if outgoing is None or outgoing.mode != "remote":
            return
        for name, service in hosts.items():
            for i, rule in enumerate(outgoing.rules):
                if rule.matches_name(name):
                    entry = f"{BLOCK}.feature.network.outgoing.filter.remote[{i}]"
                    raise self.fail(
                        f"{BLOCK}.hosts.{name}",
                        f"sends {name} to the local service {service!r}, but {entry} "
                        f"({rule.text!r}) sends its traffic to the cluster",
                        f"remove the `hosts` line to reach the cluster's {name}, or the "
                        f"`remote` entry to reach the local {service}",
                    )

    def env(self, value: Any) -> EnvSettings:
        path = f"{BLOCK}.feature.env"
        if isinstance(value, bool):
            return EnvSettings(enabled=value)
        raw = self.table(
            value,
            path,
            ("include", "exclude", "override", "env_file", "mapping", "unset", "load_from_process"),
        )
        include = self.strings(raw.get("include"), f"{path}.include")
        exclude = self.strings(raw.get("exclude"), f"{path}.exclude")
        if include and exclude:
            raise self.fail(
                path,
                "`include` and `exclude` cannot be used together",
                "keep one: include lists what to import, exclude what to skip",
            )
        if "load_from_process" in raw:
            self.ignored.append(f"{path}.load_from_process")
        mapping = self.string_map(raw.get("mapping"), f"{path}.mapping")
        for pattern in mapping:
            try:
                re.compile(pattern)
            except re.error as e:
                raise self.fail(f"{path}.mapping", f"{pattern!r} is not a regex: {e}") from None
        env_file = raw.get("env_file")
        if env_file is not None and not isinstance(env_file, str):
            raise self.fail(f"{path}.env_file", f"expected a path, got {_kind(env_file)}")
        return EnvSettings(
            include=include,
            exclude=exclude,
            override=MappingProxyType(self.string_map(raw.get("override"), f"{path}.override")),
            env_file=self.base_dir / env_file if env_file else None,
            mapping=MappingProxyType(mapping),
            unset=self.strings(raw.get("unset"), f"{path}.unset"),
        )

    def agent(self, value: Any) -> AgentSettings:
        path = f"{BLOCK}.agent"
        raw = self.table(value, path, (*_AGENT_KEYS, *_IGNORED_AGENT_KEYS))
        self.ignored.extend(f"{path}.{k}" for k in _IGNORED_AGENT_KEYS if k in raw)
        defaults = AgentSettings()
        image = raw.get("image", defaults.image)
        if isinstance(image, dict):  # mirrord's `{registry: ..., tag: ...}` form
            table = self.table(image, f"{path}.image", ("registry", "tag"))
            registry, tag = table.get("registry"), table.get("tag")
            if not isinstance(registry, str) or not registry:
                raise self.fail(
                    f"{path}.image.registry",
                    "expected an image name",
                    "e.g. `registry: registry.example.com/python`",
                )
            if tag is not None and (not isinstance(tag, str) or not tag):
                raise self.fail(f"{path}.image.tag", f"expected a tag, got {_kind(tag)}")
            image = f"{registry}:{tag}" if tag else registry
        if not isinstance(image, str) or not re.fullmatch(r"[^\s]+", image):
            raise self.fail(
                f"{path}.image",
                f"expected an image reference, got {_kind(image)}",
                "any image with python3 >= 3.11, e.g. `python:3.12-slim`",
            )
        policy = raw.get("image_pull_policy", defaults.image_pull_policy)
        if policy not in PULL_POLICIES:
            raise self.fail(
                f"{path}.image_pull_policy",
                f"{policy!r} is not a pull policy",
                f"use one of {', '.join(PULL_POLICIES)}",
            )
        secrets = []
        pulls = raw.get("image_pull_secrets") or []
        if not isinstance(pulls, list):
            raise self.fail(
                f"{path}.image_pull_secrets",
                f"expected a list, got {_kind(pulls)}",
                "e.g. `[{name: regcred}]` or `[regcred]`",
            )
        for i, item in enumerate(pulls):
            name = item.get("name") if isinstance(item, dict) else item
            if not isinstance(name, str) or not _DNS_NAME.fullmatch(name):
                raise self.fail(
                    f"{path}.image_pull_secrets[{i}]", "expected a Secret name or `{name: SECRET}`"
                )
            secrets.append(name)
        namespace = raw.get("namespace")
        if namespace is not None and (
            not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace)
        ):
            raise self.fail(f"{path}.namespace", "expected a namespace name")
        return AgentSettings(
            image=image,
            image_pull_policy=policy,
            image_pull_secrets=tuple(secrets),
            ttl=self.seconds(raw.get("ttl"), f"{path}.ttl", defaults.ttl, 1, 3600),
            handshake_timeout=self.seconds(
                raw.get("handshake_timeout"),
                f"{path}.handshake_timeout",
                defaults.handshake_timeout,
                1,
                300,
            ),
            startup_timeout=self.seconds(
                raw.get("startup_timeout"),
                f"{path}.startup_timeout",
                defaults.startup_timeout,
                5,
                1800,
            ),
            ephemeral=self.boolean(raw.get("ephemeral"), f"{path}.ephemeral", True),
            namespace=namespace,
            labels=MappingProxyType(self.string_map(raw.get("labels"), f"{path}.labels")),
            annotations=MappingProxyType(
                self.string_map(raw.get("annotations"), f"{path}.annotations")
            ),
            port=self.seconds(raw.get("port"), f"{path}.port", defaults.port, 1024, 65535),
        )

    def seconds(self, value: Any, path: str, default: int, low: int, high: int) -> int:
        """A whole number within [low, high] (seconds, or a port)."""
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(path, f"expected a whole number from {low} to {high}, got {value!r}")
        return value

    def network(self, value: Any) -> NetworkSettings:
        path = f"{BLOCK}.feature.network"
        if isinstance(value, bool):
            return NetworkSettings(tcp=value, udp=value, dns_enabled=value)
        raw = self.table(value, path, ("outgoing", "dns", "incoming", "ipv6"))
        self.ignored.extend(f"{path}.{k}" for k in ("incoming", "ipv6") if k in raw)
        tcp = udp = True
        outgoing = None
        out = raw.get("outgoing")
        if isinstance(out, bool):
            tcp = udp = out
        else:
            table = self.table(
                out,
                f"{path}.outgoing",
                ("tcp", "udp", "filter", "ignore_localhost", "unix_streams"),
            )
            tcp = self.boolean(table.get("tcp"), f"{path}.outgoing.tcp", True)
            udp = self.boolean(table.get("udp"), f"{path}.outgoing.udp", True)
            outgoing = self.filter(table.get("filter"), f"{path}.outgoing.filter", protocols=True)
            self.check_reachable(outgoing, f"{path}.outgoing", tcp=tcp, udp=udp)
            self.ignored.extend(
                f"{path}.outgoing.{k}" for k in ("ignore_localhost", "unix_streams") if k in table
            )
        dns_enabled = True
        dns = None
        dns_raw = raw.get("dns")
        if isinstance(dns_raw, bool):
            dns_enabled = dns_raw
        else:
            table = self.table(dns_raw, f"{path}.dns", ("enabled", "filter"))
            dns_enabled = self.boolean(table.get("enabled"), f"{path}.dns.enabled", True)
            dns = self.filter(table.get("filter"), f"{path}.dns.filter", protocols=False)
        return NetworkSettings(
            tcp=tcp, udp=udp, outgoing=outgoing, dns_enabled=dns_enabled, dns=dns
        )

    def check_reachable(self, outgoing: Filter | None, path: str, *, tcp: bool, udp: bool) -> None:
        """Refuse outgoing entries that can never match: a protocol the sidecar does not
        intercept (`tcp: false`, `udp: false`), or an IPv6 address or subnet (IPv6 is not
        intercepted; mirrored services on IPv6 networks are refused)."""
        if outgoing is None:
            return
        for i, rule in enumerate(outgoing.rules):
            key = f"{path}.filter.{outgoing.mode}[{i}]"
            for protocol, on in (("tcp", tcp), ("udp", udp)):
                if rule.protocol == protocol and not on:
                    raise self.fail(
                        key,
                        f"{rule.text!r} can never match: `{path.rsplit('.', 1)[-1]}.{protocol}` "
                        f"is false, so no {protocol.upper()} traffic is intercepted",
                        f"set {path}.{protocol}: true, or remove the entry",
                    )
            network = rule.network
            if network is not None and network.version == 6:
                raise self.fail(
                    key,
                    f"{rule.text!r} can never match: composemirror intercepts IPv4 only",
                    "remove the entry",
                )

    def filter(self, value: Any, path: str, *, protocols: bool) -> Filter | None:
        if value is None:
            return None
        table = self.table(value, path, ("local", "remote"))
        if len(table) != 1:
            raise self.fail(
                path,
                "give exactly one of `local` or `remote`",
                "`local` lists what stays local; `remote` what goes to the cluster",
            )
        mode: Mode = "local" if "local" in table else "remote"
        entries = self.strings(table[mode], f"{path}.{mode}")
        if not entries:
            raise self.fail(f"{path}.{mode}", "is empty; list an entry or remove the filter")
        for i, entry in enumerate(entries):
            if protocols and not entry.strip():
                # mirrord's grammar reads it as "anything": here it is most often an unset
                # `${VARIABLE}`, and would silently send everything one way.
                raise self.fail(
                    f"{path}.{mode}[{i}]",
                    "an empty entry (an unset ${VARIABLE}?) would match everything",
                    "give the entry, or write `0.0.0.0` to match everything",
                )
            try:
                parse_filter(mode, [entry], protocols=protocols)
            except FilterSyntaxError as e:
                # Each hint is itself a valid entry of the filter it names.
                usual = (
                    "entries look like `tcp://host:5432`, `10.0.0.0/8`, `*.internal` or `:53`"
                    if protocols
                    else "entries are names: `db.example` or `*.internal`"
                )
                raise self.fail(f"{path}.{mode}[{i}]", str(e), e.hint or usual) from None
        return parse_filter(mode, entries, protocols=protocols)


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _shorten(text: str, limit: int = 60) -> str:
    """`text` quoted for an error message, cut to about `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
