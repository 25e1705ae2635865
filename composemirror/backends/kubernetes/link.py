"""The seam where the host-side forwarder plugs in, and the addresses the sidecars dial.

The agent listens on 127.0.0.1:PORT inside its pod; the API server's port-forward is the only
way to it. `ForwardTarget` says what to forward; a `Forwarder` starts the process that holds the
port-forward, listening on `address`:`local_port` (the Docker host gateway) for the project's
sidecars (they dial `tcp:host.docker.internal:LOCAL_PORT`, with `host.docker.internal:
host-gateway` in their extra_hosts). The tunnel's key authentication stays end to end, through
the forward. `kubectl_forward` (see `forwarder`) is the real one; tests pass their own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from composemirror.backends.kubernetes import forwarder

HOST_ALIAS = "host.docker.internal"
"""The name sidecars dial; compose maps it to the host with `host-gateway`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTarget:
    """One port-forward: from `address`:`local_port` on this host to `pod`:`remote_port`."""

    context: str
    """The kube config context (the forwarder uses the same credentials, on this host)."""
    namespace: str
    pod: str
    remote_port: int
    local_port: int
    address: str = "127.0.0.1"
    """The host address to listen on: the Docker host gateway, never every address."""
    directory: Path | None = None
    """Where the forwarder's state is recorded (the project's session folder, see `state`);
    None: not recorded."""
    project: str = ""
    """The compose project: it labels the forwarder's process, so `down` finds it."""


Forwarder = Callable[[ForwardTarget], None]
"""Starts the forwarder for a session; returns once it listens (or raises ClusterError)."""


def kubectl_forward(target: ForwardTarget) -> None:
    """The default `Forwarder`: a supervised `kubectl port-forward`, recorded in
    `target.directory` for `status` and `down`. Raises ClusterError."""
    assert target.directory is not None, "the forwarder is recorded in the render dir"
    spec = forwarder.Spec(
        kubectl=forwarder.find_kubectl(),
        context=target.context,
        namespace=target.namespace,
        pod=target.pod,
        remote_port=target.remote_port,
        address=target.address,
        local_port=target.local_port,
    )
    forwarder.start(spec, target.directory, project=target.project or target.directory.name)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now at `host` (the forwarder binds it shortly after)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
