"""Targets in a Kubernetes cluster: resolution, the agent's placement, access checks.

Layers, each importing only those below it: `backend` (sequencing, the backend interface) over
`client` (the only module importing `kubernetes`) and the pure `targets`, `manifests`,
`environment`, `carry`, `access` and `link`.

`KubernetesBackend` is imported on first use, so that running one of the modules
(`python -m composemirror.backends.kubernetes.forwarder`) does not import it twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from composemirror.backends.kubernetes.backend import KubernetesBackend

__all__ = ["KubernetesBackend"]


def __getattr__(name: str) -> Any:
    if name == "KubernetesBackend":
        from composemirror.backends.kubernetes.backend import KubernetesBackend

        return KubernetesBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
