"""Where the target lives, and how the agent joins it.

A backend turns a configured target into an `Attachment`: how the agent container joins the
target's network namespace and what environment the target runs with. `choose()` picks the
backend: `docker://` targets are local containers; other targets go to the Kubernetes cluster of
the kube config, or to the sandbox cluster where none is configured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from composemirror.config import Config
from composemirror.errors import ClusterError, ConfigError

Backend = Literal["sandbox", "docker", "kubernetes"]
CLUSTER_ENV = "COMPOSEMIRROR_CLUSTER"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A resolved target."""

    backend: Backend
    description: str
    """For people, e.g. `deployment/checkout in namespace shop (sandbox cluster)`."""
    network_mode: str
    """The agent's compose `network_mode`, e.g. `container:shop-checkout`."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The target's environment, raw (not compose-escaped)."""


def choose(config: Config, environ: Mapping[str, str] | None = None) -> Backend:
    """The backend for `config`'s target. COMPOSEMIRROR_CLUSTER=sandbox|kubernetes forces one."""
    environ = os.environ if environ is None else environ
    if config.target.kind == "docker":
        return "docker"
    forced = environ.get(CLUSTER_ENV, "auto")
    if forced in ("sandbox", "kubernetes"):
        backend: Backend = "sandbox" if forced == "sandbox" else "kubernetes"
    elif forced == "auto":
        backend = "kubernetes" if kubeconfig_present(environ) else "sandbox"
    else:
        raise ConfigError(f"{CLUSTER_ENV}={forced!r} is not a choice",
                          hint="use sandbox, kubernetes or auto")
    if backend == "kubernetes":
        raise ClusterError(
            f"target {config.target} needs a Kubernetes cluster, and this version of "
            "composemirror reaches only the sandbox cluster and docker:// targets",
            hint=f"set {CLUSTER_ENV}=sandbox to use the sandbox cluster",
        )
    return backend


def kubeconfig_present(environ: Mapping[str, str]) -> bool:
    paths = environ.get("KUBECONFIG", "")
    if paths:
        return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").is_file()
