"""Whether a container still shares the network namespace it joined.

A container created with `network_mode: container:X` (compose's `service:X`) joins the namespace
X has when it starts and keeps that one: when X restarts, X gets a new namespace and the joined
container stays in the old one, which then holds only loopback; when X is recreated, the joined
container names an id that no longer exists. Pure: it compares the engine's facts, no I/O.
"""

from __future__ import annotations

from composemirror.engine import Container

CONTAINER_MODE = "container:"


def joined_id(container: Container) -> str | None:
    """The id of the container whose network namespace `container` joined, or None when it has
    a namespace of its own (`HostConfig.NetworkMode` other than `container:<id>`)."""
    mode = container.network_mode
    return mode[len(CONTAINER_MODE) :] if mode.startswith(CONTAINER_MODE) else None


def stale_join(joined: Container, owner: Container | None, *, owner_name: str) -> str | None:
    """Why `joined` is not in `owner`'s current network namespace, or None when it is (or when
    `joined` is not running, so is in no namespace at all).

    `owner` is the container that should own the namespace now (None: there is none, named
    `owner_name` in the message). Stale when `joined` was created for another container (the
    owner was recreated since), when the owner is not running, or when the owner started after
    `joined` did (it restarted, so `joined` was left in its old namespace). Start times are
    the engine's `State.StartedAt`.
    """
    if joined.state != "running":
        return None
    if owner is None:
        return f"{joined.name} joined {owner_name}, which no longer exists: it has no network"
    if joined_id(joined) != owner.id:
        return (
            f"{joined.name} joined an earlier {owner.name} (recreated since): it is not in "
            f"{owner.name}'s network namespace"
        )
    if owner.state != "running":
        return f"{owner.name} is {owner.state}: {joined.name} has no network"
    if owner.started_at and joined.started_at and owner.started_at > joined.started_at:
        when = owner.started_at.strftime("%H:%M:%S UTC")
        return (
            f"{owner.name} restarted at {when}, after {joined.name} joined it: {joined.name} "
            f"is left in {owner.name}'s old network namespace, which has only loopback"
        )
    return None
