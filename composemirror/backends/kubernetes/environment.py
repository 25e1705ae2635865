"""The target container's environment: copied into the agent's spec, or resolved from the API.

`copy_env` renames the target container's `env` and `envFrom` with the `CMENV_` prefix so that
the kubelet resolves them (configMapKeyRef, secretKeyRef, fieldRef, resourceFieldRef with
`containerName` pointing at the target container) in the agent's own environment, where the
agent tells them apart from its image's variables. `resolve_env` computes the same values from
API objects, as the kubelet's `makeEnvironmentVariables` does, for when no agent runs yet.
Selection (include/exclude, default excludes) is `composemirror.environment`'s. Pure.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from composemirror.podagent import SPEC_ENV_PREFIX

Obj = Mapping[str, Any]
_REFERENCE = re.compile(r"\$\$|\$\(([^)]*)\)")


def copy_env(container: Obj, *, prefix: str = SPEC_ENV_PREFIX) -> tuple[list[Obj], list[Obj]]:
    """(env, envFrom) of `container` for the agent's spec, every name under `prefix`.

    `$(NAME)` references to names defined earlier in the list follow the rename (references to
    names from envFrom are left as written, a limit of the copy; the process environment, when
    readable, has the exact values).
    """
    defined: set[str] = set()
    env: list[Obj] = []
    for entry in container.get("env") or []:
        item = copy.deepcopy(dict(entry))
        item["name"] = prefix + entry["name"]
        if "value" in item:
            item["value"] = _REFERENCE.sub(
                lambda m: m.group(0) if m.group(1) not in defined else f"$({prefix}{m.group(1)})",
                item["value"],
            )
        resource = (item.get("valueFrom") or {}).get("resourceFieldRef")
        if resource is not None and not resource.get("containerName"):
            resource["containerName"] = container["name"]
        defined.add(entry["name"])
        env.append(item)
    env_from: list[Obj] = []
    for source in container.get("envFrom") or []:
        item = copy.deepcopy(dict(source))
        item["prefix"] = prefix + (source.get("prefix") or "")
        env_from.append(item)
    return env, env_from


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedEnv:
    """The environment the kubelet would give a container, and what could not be resolved."""

    env: dict[str, str]
    unresolved: list[str] = field(default_factory=list)
    """One line per variable left out, saying why (missing ConfigMap key, no limit set, ...)."""


def resolve_env(
    pod: Obj, container_name: str, *, configmaps: Mapping[str, Obj], secrets: Mapping[str, Obj]
) -> ResolvedEnv:
    """The environment of `container_name` in `pod`, computed from API objects.

    `configmaps` and `secrets` map names (in the pod's namespace) to the objects the container
    references; a missing one counts as absent. envFrom first, later sources winning, then env
    in order with `$(NAME)` expansion (`$$` escapes), as the kubelet does
    (pkg/kubelet/kubelet_pods.go, makeEnvironmentVariables). Service-link variables are not
    known to the API and are left out.
    """
    container = next(c for c in pod["spec"]["containers"] if c["name"] == container_name)
    env: dict[str, str] = {}
    missing: list[str] = []
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, ref, objects in (
            ("ConfigMap", source.get("configMapRef"), configmaps),
            ("Secret", source.get("secretRef"), secrets),
        ):
            if ref is None:
                continue
            obj = objects.get(ref["name"])
            if obj is None:
                if not ref.get("optional"):
                    missing.append(f"envFrom {kind} {ref['name']}: not found")
                continue
            for key, data in _data(kind, obj).items():
                env[prefix + key] = data
    for entry in container.get("env") or []:
        name = entry["name"]
        if "valueFrom" not in entry:
            env[name] = _expand(entry.get("value", ""), env)
            continue
        value, problem = _value_from(entry["valueFrom"], pod, container, configmaps, secrets)
        if value is not None:
            env[name] = value
        elif problem:
            missing.append(f"{name}: {problem}")
    return ResolvedEnv(env=env, unresolved=missing)


def referenced(container: Obj) -> tuple[set[str], set[str]]:
    """(ConfigMap names, Secret names) a container's env and envFrom refer to."""
    configmaps: set[str] = set()
    secrets: set[str] = set()
    for source in container.get("envFrom") or []:
        if source.get("configMapRef"):
            configmaps.add(source["configMapRef"]["name"])
        if source.get("secretRef"):
            secrets.add(source["secretRef"]["name"])
    for entry in container.get("env") or []:
        value_from = entry.get("valueFrom") or {}
        if value_from.get("configMapKeyRef"):
            configmaps.add(value_from["configMapKeyRef"]["name"])
        if value_from.get("secretKeyRef"):
            secrets.add(value_from["secretKeyRef"]["name"])
    return configmaps, secrets


def _data(kind: str, obj: Obj) -> dict[str, str]:
    if kind == "ConfigMap":
        return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}
    result = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            result[str(key)] = base64.b64decode(value).decode("utf-8", errors="replace")
        except binascii.Error:
            continue
    return result


def _expand(value: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REFERENCE.sub(replace, value)


def _value_from(
    value_from: Obj,
    pod: Obj,
    container: Obj,
    configmaps: Mapping[str, Obj],
    secrets: Mapping[str, Obj],
) -> tuple[str | None, str | None]:
    """(value, None), or (None, why) when it cannot be resolved, or (None, None) if optional."""
    for kind, ref_key, objects in (
        ("ConfigMap", "configMapKeyRef", configmaps),
        ("Secret", "secretKeyRef", secrets),
    ):
        ref = value_from.get(ref_key)
        if ref is None:
            continue
        obj = objects.get(ref["name"])
        data = _data(kind, obj) if obj is not None else None
        if data is not None and ref["key"] in data:
            return data[ref["key"]], None
        if ref.get("optional"):
            return None, None
        what = f"{kind} {ref['name']}"
        return None, f"{what} not found" if obj is None else f"{what} has no key {ref['key']!r}"
    if value_from.get("fieldRef"):
        return _field(pod, value_from["fieldRef"]["fieldPath"])
    if value_from.get("resourceFieldRef"):
        return _resource(pod, container, value_from["resourceFieldRef"])
    return None, "an unknown valueFrom"


_INDEXED = re.compile(r"metadata\.(labels|annotations)\['([^']*)'\]")


def _field(pod: Obj, path: str) -> tuple[str | None, str | None]:
    """The downward API's fieldRef paths (pkg/api/v1/pod ConvertDownwardAPIFieldLabel)."""
    metadata, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    indexed = _INDEXED.fullmatch(path)
    if indexed:
        return str((metadata.get(indexed.group(1)) or {}).get(indexed.group(2), "")), None
    simple: dict[str, Any] = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path] or ""), None
    if path in ("metadata.labels", "metadata.annotations"):
        items = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items())), None
    return None, f"fieldRef {path} is not known"


def _resource(pod: Obj, container: Obj, ref: Obj) -> tuple[str | None, str | None]:
    """resourceFieldRef: ceil(quantity / divisor) (the kubelet's ExtractContainerResourceValue)."""
    name = ref.get("containerName") or container["name"]
    target = next((c for c in pod["spec"]["containers"] if c["name"] == name), None)
    if target is None:
        return None, f"resourceFieldRef names no container {name!r}"
    kind, _, resource = ref["resource"].partition(".")
    quantity: str | None = ((target.get("resources") or {}).get(kind) or {}).get(resource)
    if quantity is None and kind == "limits":
        return None, (
            f"{ref['resource']} is not set, and the node's allocatable it falls back "
            "to is not known here"
        )
    if quantity is None:
        quantity = "0"
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        return None, "resourceFieldRef divisor is 0"
    return str(math.ceil(parse_quantity(str(quantity)) / divisor)), None


_SUFFIXES = {
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)")


def parse_quantity(text: str) -> Fraction:
    """A Kubernetes resource.Quantity (`250m`, `1Gi`, `1e3`) as an exact number.

    Raises ValueError for text that is not a quantity.
    """
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a quantity")
    number, suffix = Fraction(match.group(1)), match.group(2)
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    if suffix not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a quantity")
    return number * _SUFFIXES[suffix]
