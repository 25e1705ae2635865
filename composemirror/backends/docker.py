"""`docker://CONTAINER` targets: a container on this engine stands in for the deployed app.

The agent joins the container's network namespace (its resolver, routes and peers), and the
container's configured environment is what the app imports, its resolv.conf's `search` and
`ndots` what the app's resolver uses. Nothing is created beyond the
rendered project, so there is nothing to prepare or tear down.
"""

from __future__ import annotations

from pathlib import Path

from composemirror.backends import (
    Check,
    ContainerPlacement,
    NoSessionState,
    Placement,
    Progress,
    Resolution,
    Resolver,
    SessionInfo,
)
from composemirror.config import Config
from composemirror.engine import Engine
from composemirror.errors import ClusterError


class DockerBackend(NoSessionState):
    """Targets that are containers on this engine."""

    name = "docker"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def resolve(self, config: Config) -> Resolution:
        target = config.target
        name = str(target.name)
        container = self.engine.inspect_container(name)
        if container is None:
            raise ClusterError(
                f"target {target}: there is no container {name!r}",
                hint="start it, or check the name with `docker ps`",
            )
        if container.state != "running":
            raise ClusterError(
                f"target {target}: container {name!r} is {container.state}",
                hint=f"start it with `docker start {name}`",
            )
        resolv_conf = self.engine.exec_output(container.id, ["cat", "/etc/resolv.conf"])
        return Resolution(
            description=f"container {container.name}",
            target=container.name,
            env=dict(container.env),
            resolver=None if resolv_conf is None else Resolver.parse(resolv_conf),
        )

    def place(self, config: Config, resolution: Resolution, session: SessionInfo) -> Placement:
        return ContainerPlacement(network_mode=f"container:{resolution.target}")

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        """The container runs already (`resolve` checked it)."""

    def teardown(
        self,
        project: str,
        directory: Path,
        progress: Progress,
        *,
        config: Config | None = None,
        context: str | None = None,
    ) -> list[str]:
        """The agent is a service of the rendered project: `down` removes it with the rest."""
        return []

    def doctor(self, config: Config) -> list[Check]:
        return []
