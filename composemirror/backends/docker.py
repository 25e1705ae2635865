"""`docker://CONTAINER` targets: a container on this engine stands in for the deployed app.

The agent joins the container's network namespace (its resolver, routes and peers), and the
container's configured environment is what the app imports.
"""

from __future__ import annotations

from composemirror import engine
from composemirror.backends import Attachment
from composemirror.config import Target
from composemirror.errors import ClusterError


def attach(target: Target) -> Attachment:
    name = str(target.name)
    container = engine.inspect_container(name)
    if container is None:
        raise ClusterError(f"target {target}: there is no container {name!r}",
                           hint="start it, or check the name with `docker ps`")
    if container.state != "running":
        raise ClusterError(f"target {target}: container {name!r} is {container.state}",
                           hint=f"start it with `docker start {name}`")
    return Attachment(
        backend="docker",
        description=f"container {container.name}",
        network_mode=f"container:{container.name}",
        env=dict(container.env),
    )
