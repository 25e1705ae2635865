"""Targets in a Kubernetes cluster: resolution, the agent's placement, access checks.

Layers, each importing only those below it: `backend` (sequencing, the backend interface) over
`client` (the only module importing `kubernetes`) and the pure `targets`, `manifests`,
`environment`, `carry`, `access` and `link`.
"""

from composemirror.backends.kubernetes.backend import KubernetesBackend

__all__ = ["KubernetesBackend"]
