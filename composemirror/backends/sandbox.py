"""The sandbox cluster: Kubernetes-style workloads in a compose project of composemirror's own.

Its compose file ships inside the package. A workload is found by the labels
`io.composemirror.sandbox.workload` (e.g. `deployment/checkout`) and
`io.composemirror.sandbox.namespace`; its environment is read from the sandbox's compose model,
so rendering needs nothing running. `ensure_up` starts the sandbox when `up` needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import composemirror
from composemirror import engine
from composemirror.backends import Attachment
from composemirror.compose import unescape
from composemirror.config import Target
from composemirror.errors import ClusterError

PROJECT = "composemirror-sandbox"
COMPOSE_FILE = Path(composemirror.__file__).parent / "sandbox" / "compose.yaml"
LABEL_WORKLOAD = "io.composemirror.sandbox.workload"
LABEL_NAMESPACE = "io.composemirror.sandbox.namespace"
DEFAULT_NAMESPACE = "default"


def project(environment: Mapping[str, str]) -> engine.ComposeProject:
    return engine.ComposeProject(files=(COMPOSE_FILE,), name=PROJECT, environment=environment)


def attach(target: Target, namespace: str | None, environment: Mapping[str, str]) -> Attachment:
    """Find `target` among the sandbox's workloads."""
    namespace = namespace or DEFAULT_NAMESPACE
    if target.kind == "targetless":
        raise ClusterError("the sandbox cluster runs targeted sessions only",
                           hint="set `target: deployment/checkout` with `namespace: shop`")
    wanted = f"{target.kind}/{target.name}"
    model = _model(tuple(environment.items()))
    available = []
    for name, service in model.get("services", {}).items():
        labels = service.get("labels") or {}
        workload, ns = labels.get(LABEL_WORKLOAD), labels.get(LABEL_NAMESPACE, DEFAULT_NAMESPACE)
        if workload is None:
            continue
        if (workload, ns) == (wanted, namespace):
            container = service.get("container_name") or f"{PROJECT}-{name}-1"
            return Attachment(
                backend="sandbox",
                description=f"{wanted} in namespace {ns} (sandbox cluster)",
                network_mode=f"container:{container}",
                env={k: str(v) for k, v in unescape(service.get("environment") or {}).items()
                     if v is not None},
            )
        available.append(f"{workload} in namespace {ns}")
    raise ClusterError(
        f"the sandbox cluster has no {wanted} in namespace {namespace}",
        hint=f"its workloads: {', '.join(available) or 'none'}",
    )


def is_up(environment: Mapping[str, str]) -> bool:
    """Whether every workload of the sandbox runs (and is healthy where it has a check)."""
    services = set(_model(tuple(environment.items())).get("services", {}))
    running = {
        c.labels.get("com.docker.compose.service")
        for c in engine.containers({"com.docker.compose.project": PROJECT})
        if c.state == "running" and c.health in (None, "healthy")
    }
    return services <= running


def ensure_up(environment: Mapping[str, str]) -> None:
    """Start (or update) the sandbox and wait until its workloads are healthy."""
    # --build: the layer cache makes it cheap, and a newer composemirror brings a newer sandbox.
    code = engine.compose_run(project(environment), ["up", "--detach", "--wait", "--build"])
    if code != 0:
        raise ClusterError("the sandbox cluster did not start",
                           hint="see compose's output above; `composemirror sandbox down` "
                                "removes it")


@functools.cache
def _model(environment: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return engine.compose_model(project(dict(environment)))


def down() -> None:
    engine.compose_down(project({}), volumes=True)

