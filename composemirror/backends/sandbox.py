"""The sandbox cluster: Kubernetes-style workloads in a compose project of composemirror's own.

Its compose file ships inside the package. A workload is found by the labels
`io.composemirror.sandbox.workload` (e.g. `deployment/checkout`) and
`io.composemirror.sandbox.namespace`; its environment and resolver are read from the sandbox's
compose model, so resolving needs nothing running. `prepare` starts the sandbox when it is not
up; it is left running afterwards, as a cluster would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import composemirror
from composemirror.backends import (
    Check,
    ContainerPlacement,
    Placement,
    Progress,
    Resolution,
    Resolver,
    SessionInfo,
)
from composemirror.backends.docker import TargetNamespace
from composemirror.compose import unescape
from composemirror.config import Config
from composemirror.engine import ComposeProject, Engine
from composemirror.errors import ClusterError
from composemirror.images import BASE_ENV, DEFAULT_BASE

PROJECT = "composemirror-sandbox"
COMPOSE_FILE = Path(composemirror.__file__).parent / "sandbox" / "compose.yaml"
LABEL_WORKLOAD = "io.composemirror.sandbox.workload"
LABEL_NAMESPACE = "io.composemirror.sandbox.namespace"
DEFAULT_NAMESPACE = "default"


def project(base_image: str = DEFAULT_BASE) -> ComposeProject:
    """The sandbox's compose project; its image is built on `base_image`."""
    return ComposeProject(files=(COMPOSE_FILE,), name=PROJECT, environment={BASE_ENV: base_image})


class SandboxBackend(TargetNamespace):
    """Targets in the sandbox cluster."""

    name = "sandbox"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._model: dict[str, Any] | None = None

    def resolve(self, config: Config) -> Resolution:
        """Find the target among the sandbox's workloads."""
        target = config.target
        namespace = config.namespace or DEFAULT_NAMESPACE
        if target.kind == "targetless":
            raise ClusterError(
                "the sandbox cluster runs targeted sessions only",
                hint="set `target: deployment/checkout` with `namespace: shop`",
            )
        wanted = f"{target.kind}/{target.name}"
        available = []
        for name, service in self.model().get("services", {}).items():
            labels = service.get("labels") or {}
            workload = labels.get(LABEL_WORKLOAD)
            ns = labels.get(LABEL_NAMESPACE, DEFAULT_NAMESPACE)
            if workload is None:
                continue
            if (workload, ns) == (wanted, namespace):
                environment = unescape(service.get("environment") or {})
                return Resolution(
                    description=f"{wanted} in namespace {ns} (sandbox cluster)",
                    target=service.get("container_name") or f"{PROJECT}-{name}-1",
                    env={k: str(v) for k, v in environment.items() if v is not None},
                    resolver=_resolver(service),
                )
            available.append(f"{workload} in namespace {ns}")
        raise ClusterError(
            f"the sandbox cluster has no {wanted} in namespace {namespace}",
            hint=f"its workloads: {', '.join(available) or 'none'}",
        )

    def place(self, config: Config, resolution: Resolution, session: SessionInfo) -> Placement:
        return ContainerPlacement(network_mode=f"container:{resolution.target}")

    def target_name(self, config: Config) -> str:
        return self.resolve(config).target

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        if not self.is_up():
            progress("starting the sandbox cluster")
            self.start(session.base_image)
        self.rejoin(session, progress)

    def teardown(
        self,
        project: str,
        directory: Path,
        progress: Progress,
        *,
        config: Config | None = None,
        context: str | None = None,
    ) -> list[str]:
        """The sandbox is shared by every project, like a cluster: it stays up."""
        return []

    def doctor(self, config: Config) -> list[Check]:
        running = self.is_up()
        return [
            Check(
                name="sandbox cluster",
                ok=True,
                detail="running" if running else "not running (`up` starts it)",
            )
        ]

    def model(self) -> dict[str, Any]:
        """The sandbox's compose model (read once)."""
        if self._model is None:
            self._model = self.engine.compose_model(project())
        return self._model

    def is_up(self) -> bool:
        """Whether every workload of the sandbox runs (and is healthy where it has a check)."""
        services = set(self.model().get("services", {}))
        running = {
            c.labels.get("com.docker.compose.service")
            for c in self.engine.containers({"com.docker.compose.project": PROJECT})
            if c.state == "running" and c.health in (None, "healthy")
        }
        return services <= running

    def start(self, base_image: str) -> None:
        """Start (or update) the sandbox and wait until its workloads are healthy."""
        # --build: the layer cache makes it cheap, and a newer composemirror brings a newer one.
        code = self.engine.compose_run(project(base_image), ["up", "--detach", "--wait", "--build"])
        if code != 0:
            raise ClusterError(
                "the sandbox cluster did not start",
                hint="see compose's output above; `composemirror sandbox down` removes it",
            )

    def remove(self) -> None:
        """Remove the sandbox and its volumes."""
        self.engine.compose_down(project(), volumes=True)


def _resolver(service: Mapping[str, Any]) -> Resolver | None:
    """The workload's resolv.conf as its compose service sets it."""
    nameservers = tuple(str(s) for s in service.get("dns") or ())
    if not nameservers:
        return None
    ndots = 1
    for option in service.get("dns_opt") or ():
        name, _, value = str(option).partition(":")
        if name == "ndots" and value.isdigit():
            ndots = int(value)
    return Resolver(
        search=tuple(str(s) for s in service.get("dns_search") or ()),
        ndots=ndots,
        nameservers=nameservers,
    )
