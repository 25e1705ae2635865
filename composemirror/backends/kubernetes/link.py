"""The seam where the host-side forwarder plugs in (built separately).

The agent listens on 127.0.0.1:PORT inside its pod; the API server's port-forward is the only
way to it. `ForwardTarget` says what to forward; a `Forwarder` starts the process that holds the
port-forward and listens on `local_port` for the project's sidecars (they dial
`tcp:host.docker.internal:LOCAL_PORT`, with `host.docker.internal: host-gateway` in their
extra_hosts). The tunnel's key authentication stays end to end, through the forward.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from composemirror.errors import ClusterError

HOST_ALIAS = "host.docker.internal"
"""The name sidecars dial; compose maps it to the host with `host-gateway`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTarget:
    """One port-forward: from `local_port` on this host to `pod`:`remote_port`."""

    context: str
    """The kube config context (the forwarder uses the same credentials, on this host)."""
    namespace: str
    pod: str
    remote_port: int
    local_port: int


Forwarder = Callable[[ForwardTarget], None]
"""Starts the forwarder for a session; returns once it listens (or raises ClusterError)."""


def not_built(target: ForwardTarget) -> None:
    """The default `Forwarder` until the real one exists: says so, with the manual way."""
    raise ClusterError(
        f"the agent is ready in pod {target.pod} (namespace {target.namespace}), but this "
        "version has no port-forward link yet",
        hint=f"forward it by hand: `kubectl --context {target.context} -n {target.namespace} "
        f"port-forward --address 0.0.0.0 pod/{target.pod} "
        f"{target.local_port}:{target.remote_port}`",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the forwarder binds it shortly after)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
