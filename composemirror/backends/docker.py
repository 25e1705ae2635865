"""`docker://CONTAINER` targets: a container on this engine stands in for the deployed app.

The agent joins the container's network namespace (its resolver, routes and peers), and the
container's configured environment is what the app imports, its resolv.conf's `search` and
`ndots` what the app's resolver uses. Nothing is created beyond the
rendered project, so there is nothing to tear down. The agent stays in the namespace the target
had when the agent started: `TargetNamespace` finds an agent the target left behind (it restarted
or was recreated) for `status` and `doctor`, and has `up` recreate it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from composemirror import namespaces
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
from composemirror.engine import Container, Engine
from composemirror.errors import ClusterError

LABEL_PROJECT = "io.composemirror.project"
LABEL_ROLE = "io.composemirror.role"


class TargetNamespace(NoSessionState):
    """The session hooks of a backend whose agent joins a target container on this engine.

    `inspect` says whether the project's agent is in the target's current network namespace;
    `rejoin` (called by `prepare`) removes an agent that is not, so compose creates it again in
    the target's namespace. The target container is `target_name(config)`.
    """

    engine: Engine

    def target_name(self, config: Config) -> str:
        """The container whose network namespace the agent joins."""
        raise NotImplementedError

    def inspect(
        self, config: Config, project: str, directory: Path, *, sidecars: Sequence[str] = ()
    ) -> list[Check]:
        """One check per agent of `project` on this engine: in the target's namespace or not
        (the agent is a compose service: its absence shows in `status` itself)."""
        name = self.target_name(config)
        target = self.engine.inspect_container(name)
        return [self._agent_check(agent, target, name) for agent in self._agents(project)]

    def rejoin(self, session: SessionInfo, progress: Progress) -> None:
        """Remove the project's agent when it is not in the target's current namespace (or not
        running), so that compose, which would leave it as it is, creates it again."""
        name = self.target_name(session.config)
        target = self.engine.inspect_container(name)
        for agent in self._agents(session.project):
            check = self._agent_check(agent, target, name)
            if not check.ok:
                progress(f"{check.detail}: recreating the agent")
                self.engine.remove_labelled(
                    {LABEL_PROJECT: session.project, LABEL_ROLE: "agent"}, volumes=False
                )
                return

    def _agents(self, project: str) -> list[Container]:
        return self.engine.containers({LABEL_PROJECT: project, LABEL_ROLE: "agent"})

    def _agent_check(self, agent: Container, target: Container | None, name: str) -> Check:
        if agent.state != "running":
            return Check(
                name="agent namespace",
                ok=False,
                detail=f"the agent {agent.name} is {agent.state}",
                hint="`composemirror up -d` starts it again",
            )
        reason = namespaces.stale_join(agent, target, owner_name=name)
        if reason is None:
            return Check(name="agent namespace", ok=True, detail=f"shares {name}'s")
        return Check(
            name="agent namespace",
            ok=False,
            detail=reason.replace(agent.name, f"the agent {agent.name}", 1),
            hint="remote names and connections fail until the agent is in the target's "
            "namespace: `composemirror up -d` recreates it there",
        )


class DockerBackend(TargetNamespace):
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

    def target_name(self, config: Config) -> str:
        return str(config.target.name)

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        """The container runs already (`resolve` checked it); an agent it left behind goes."""
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
        """The agent is a service of the rendered project: `down` removes it with the rest."""
        return []

    def doctor(self, config: Config) -> list[Check]:
        return []
