"""The Kubernetes backend: resolve a target in a cluster, place the agent there, remove it.

`KubernetesBackend` follows the backend interface of `composemirror.backends`: `resolve` finds
the target pod and its environment, `place` decides the agent's objects and the link address the
sidecars dial, `prepare` creates them and waits for the agent's ready line, `teardown` deletes
them by label, `doctor` checks access. Decisions are the pure modules' (`targets`, `manifests`,
`environment`, `access`); this module sequences calls to a `Cluster` (the only I/O), which tests
replace with a fake over recorded objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
)

from composemirror.backends import (
    Check,
    ForwardedPlacement,
    Progress,
    Resolution,
    SessionInfo,
)
from composemirror.backends.kubernetes import client, forwarder, manifests, state, targets
from composemirror.backends.kubernetes.access import PERMISSIONS, Permission, render_rules
from composemirror.backends.kubernetes.carry import bundle
from composemirror.backends.kubernetes.environment import copy_env, referenced, resolve_env
from composemirror.backends.kubernetes.link import (
    HOST_ALIAS,
    Forwarder,
    ForwardTarget,
    free_port,
    kubectl_forward,
)
from composemirror.config import AgentSettings, Config, Target
from composemirror.errors import ClusterError
from composemirror.link import LinkAddress
from composemirror.podagent import EnvReport, SealError, parse_ready, unseal
from composemirror.protocol import key_from_text

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
EPHEMERAL_NOTE = (
    "an ephemeral container cannot be removed: each `up` leaves a terminated entry "
    "in the target pod until the pod is replaced (a rollout, a restart)"
)
IMAGE_FAILURES = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
"""Waiting reasons that say the node cannot get the agent's image."""
LOG_HEAD = 1 << 20
"""Bytes of an agent's log read from its start to find its ready line (which holds the sealed
environment report, a few KiB to tens of KiB)."""
PULL_FAILURES = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Waiting reasons that will not resolve themselves: the wait stops at once."""
TRANSIENT = ("failed to sync", "timed out waiting for the condition")
"""Messages of those reasons that do resolve themselves (the kubelet's Secret and ConfigMap
caches catching up with a Secret created a moment ago): the wait goes on."""


def image_hint(image: str) -> str:
    """How to give a cluster the agent's image, with `image` filled in."""
    return (
        f"load {image} into the cluster's node (`kind load docker-image {image}`, "
        f"`minikube image load {image}`, `k3d image import {image}`, or for this repository's "
        f"test cluster `scripts/cluster load {image}`), or set `agent.image` (or "
        "COMPOSEMIRROR_AGENT_IMAGE) to an image with python3 >= 3.11 the cluster can pull, with "
        "`agent.image_pull_secrets` for a private registry"
    )


class ClusterAPI(Protocol):
    """What the backend needs of `client.Cluster` (a fake implements it in tests)."""

    context: str
    namespace: str

    @property
    def server(self) -> str: ...
    def get(self, resource: str, name: str, namespace: str) -> dict[str, Any]: ...
    def find(
        self, resource: str, namespace: str, selector: str | None = None
    ) -> list[dict[str, Any]]: ...
    def find_everywhere(self, resource: str, selector: str) -> list[dict[str, Any]]: ...
    def pod_log(
        self,
        name: str,
        namespace: str,
        container: str,
        *,
        tail: int | None = 50,
        limit_bytes: int | None = None,
    ) -> str: ...
    def version(self) -> dict[str, Any]: ...
    def node(self, name: str) -> dict[str, Any]: ...
    def namespace_exists(self, name: str) -> bool | None: ...
    def add_ephemeral_container(
        self, pod: str, namespace: str, patch: Obj, *, dry_run: bool = False
    ) -> dict[str, Any]: ...
    def create(
        self, resource: str, namespace: str, body: Obj, *, dry_run: bool = False
    ) -> dict[str, Any]: ...
    def delete(self, resource: str, name: str, namespace: str) -> None: ...
    def delete_labelled(self, resource: str, namespace: str, selector: str) -> list[str]: ...
    def can(self, permission: Permission, namespace: str) -> tuple[bool, str]: ...


Connect = Callable[[str | None, str | None], ClusterAPI]

_RESOURCES = {
    "deployment": "deployments",
    "statefulset": "statefulsets",
    "replicaset": "replicasets",
    "job": "jobs",
    "cronjob": "cronjobs",
    "pod": "pods",
}


def find_target(cluster: ClusterAPI, target: Target, namespace: str) -> targets.TargetPod:
    """The pod and container `target` names in `namespace`, read through `cluster`.

    Raises ClusterError: no such workload, no ready pod (with each pod's state), an ambiguous
    or missing container, or a target kind this backend does not place agents for.
    """
    if target.kind not in _RESOURCES:
        raise ClusterError(
            f"target {target}: {target.kind} targets are not supported on Kubernetes yet",
            hint="name the workload behind it, e.g. `deployment/NAME`",
        )
    resource, name = _RESOURCES[target.kind], str(target.name)
    try:
        workload: Obj = cluster.get(resource, name, namespace)
    except client.NotFoundError as e:
        if cluster.namespace_exists(namespace) is False:
            raise client.MissingNamespaceError(
                f"target {target}: namespace {namespace!r} does not exist "
                f"(context {cluster.context})",
                hint="fix `namespace:` or -n (`kubectl get namespaces` lists them), or "
                "`--context` if the target lives in another cluster",
            ) from e
        raise ClusterError(
            f"target {target}: there is no {target.kind} {name!r} in namespace {namespace}",
            hint=f"`kubectl get {resource} -n {namespace}` lists them; "
            "`namespace:` or the context's namespace chooses where",
        ) from e
    what = f"{target.kind}/{name}"
    if target.kind == "pod":
        pod = targets.pick_pod(what, [workload])
    else:
        if target.kind == "cronjob":
            workload = targets.newest_job(workload, cluster.find("jobs", namespace))
            what += f" (its newest job {workload['metadata']['name']})"
        selector = targets.selector_text(workload)
        pods = cluster.find("pods", namespace, selector)
        sets = (
            cluster.find("replicasets", namespace, selector) if target.kind == "deployment" else []
        )
        kind = "job" if target.kind == "cronjob" else target.kind
        pod = targets.pick_pod(what, targets.workload_pods(kind, workload, pods, sets))
    return targets.resolve(target, pod)


def target_env(cluster: ClusterAPI, found: targets.TargetPod) -> tuple[dict[str, str], list[str]]:
    """The target container's env computed from the API; (env, notes on what was left out)."""
    configmap_names, secret_names = referenced(found.spec)
    objects: dict[str, dict[str, Obj]] = {"configmaps": {}, "secrets": {}}
    notes = []
    for resource, names in (("configmaps", configmap_names), ("secrets", secret_names)):
        for name in sorted(names):
            try:
                objects[resource][name] = cluster.get(resource, name, found.namespace)
            except client.NotFoundError:
                continue
            except ClusterError as e:  # forbidden: import what can be imported, say the rest
                notes.append(e.message)
    resolved = resolve_env(
        found.pod, found.container, configmaps=objects["configmaps"], secrets=objects["secrets"]
    )
    return resolved.env, notes + resolved.unresolved


@dataclass(slots=True, kw_only=True)
class Plan:
    """What `place` decided and `prepare` creates, for one session."""

    cluster: ClusterAPI
    where: manifests.Placement
    target: targets.TargetPod | None
    local_port: int
    address: str = "127.0.0.1"
    """Where the forwarder listens (the Docker host gateway)."""
    mode: str = "ephemeral"
    """`ephemeral` or `job`."""
    pod: str | None = None
    """The pod the agent runs in, once known."""
    env: EnvReport | None = None
    """The environment the agent reported (see composemirror.podagent)."""
    created: list[tuple[str, str]] = field(default_factory=list)
    """(resource, name) of what this command created in `where.namespace`; removed again
    when the command fails or an attached `up` ends (`release`)."""
    forwarding: bool = False
    """This command started the forwarder (`release` stops only what it started)."""
    reused: bool = False
    """`prepare` found the project's session healthy and kept it (a repeated `up -d`)."""


def _connect(context: str | None, namespace: str | None) -> ClusterAPI:
    return client.connect(context, namespace)


@dataclass(slots=True)
class KubernetesBackend:
    """Targets in a Kubernetes cluster, reached through the kube config as kubectl does."""

    name = "kubernetes"
    connect: Connect = _connect
    kubeconfig: str | None = None
    """The kube config files to read (KUBECONFIG's form: paths joined by os.pathsep); None:
    the process's KUBECONFIG, else ~/.kube/config, as kubectl. Used by the default `connect`."""
    forward: Forwarder = kubectl_forward
    gateway: Callable[[], str] = field(default=lambda: "127.0.0.1")
    """The Docker host gateway address (what `host-gateway` maps to): the forwarder listens
    there only. `choose()` passes the engine's."""
    check_kubectl: Callable[[], Check] = field(default=lambda: kubectl_check())
    """`doctor`'s check of the kubectl the forwarder runs."""
    sleep: Callable[[float], None] = time.sleep
    state_root: Path | None = None
    """Where sessions' host-side state lives (`state.root()` when None)."""
    plans: dict[str, Plan] = field(default_factory=dict)
    """Project name -> its session's plan (between `place` and `prepare`)."""
    found: dict[tuple[str | None, str | None, str], targets.TargetPod] = field(default_factory=dict)
    clusters: dict[tuple[str | None, str | None], ClusterAPI] = field(default_factory=dict)
    """One client per (context, namespace), reused across the steps of a command."""

    def __post_init__(self) -> None:
        if self.kubeconfig is not None and self.connect is _connect:
            environ = {"KUBECONFIG": self.kubeconfig}
            self.connect = lambda context, namespace: client.connect(context, namespace, environ)

    def kubeconfig_files(self) -> list[str]:
        """The kube config files this backend reads that exist, as absolute paths."""
        paths = self.kubeconfig or client.kubeconfig_paths(os.environ)
        return [str(Path(p).resolve()) for p in paths.split(os.pathsep) if p and Path(p).is_file()]

    def session_dir(self, project: str) -> Path:
        """`project`'s session folder: its forwarder's state and log, and its record."""
        return state.session_dir(project, self.state_root or state.root())

    def cluster(self, context: str | None, namespace: str | None) -> ClusterAPI:
        """The cluster of `context`, connected once."""
        key = (context, namespace)
        if key not in self.clusters:
            self.clusters[key] = self.connect(context, namespace)
        return self.clusters[key]

    def resolve(self, config: Config) -> Resolution:
        """The target's description and its environment (from the API; see `report_env`).

        The resolver is the target pod's search list and ndots (`targets.pod_resolver`), which
        the app gets, so the agent resolves exactly the name asked. Raises ClusterError.
        """
        cluster = self.cluster(config.context, config.namespace)
        namespace = config.namespace or cluster.namespace
        if config.target.kind == "targetless":
            return Resolution(
                description=f"targetless in namespace {namespace} (context {cluster.context})",
                target=f"namespace/{namespace}",
            )
        found = find_target(cluster, config.target, namespace)
        self.found[(config.context, config.namespace, str(config.target))] = found
        env: dict[str, str] = {}
        if config.env.enabled:
            env, notes = target_env(cluster, found)
            for note in notes:
                log.warning("environment: %s", note)
        return Resolution(
            description=f"{found.description} (context {cluster.context})",
            target=f"pod/{found.name}",
            env=MappingProxyType(env),
            resolver=targets.pod_resolver(found.pod),
        )

    def place(
        self, config: Config, resolution: Resolution, session: SessionInfo
    ) -> ForwardedPlacement:
        """Decide the agent's objects for `session`; the sidecars dial the host's forwarder,
        which will listen on the host gateway address at a port free now."""
        cluster = self.cluster(config.context, config.namespace)
        namespace = config.namespace or cluster.namespace
        found = None
        if config.target.kind != "targetless":
            key = (config.context, config.namespace, str(config.target))
            found = self.found.get(key) or find_target(cluster, config.target, namespace)
        agent_namespace = namespace if found else (config.agent.namespace or namespace)
        where = manifests.placement(
            session.project, agent_namespace, config.agent, str(config.target)
        )
        mode = "ephemeral" if found is not None and config.agent.ephemeral else "job"
        running = forwarder.read_state(self.session_dir(session.project))
        if running and running["alive"]:
            # a session is up (`compose -- ARGS`, `config` while it runs): its sidecars dial
            # the running forwarder, so the rendered project keeps its port
            address, port = running["spec"]["address"], int(running["spec"]["local_port"])
        else:
            address = self.gateway()
            port = free_port(address)
        plan = Plan(
            cluster=cluster, where=where, target=found, local_port=port, address=address, mode=mode
        )
        self.plans[session.project] = plan
        return ForwardedPlacement(
            link=LinkAddress.parse(f"tcp:{HOST_ALIAS}:{plan.local_port}"),
            extra_hosts=MappingProxyType({HOST_ALIAS: "host-gateway"}),
        )

    def prepare(self, session: SessionInfo, progress: Progress) -> None:
        """Create the Secret and the agent, wait for its ready line, start the forwarder; or,
        when the project's session is up and healthy (its forwarder forwarding to an agent that
        runs in the current target pod with this key), keep it, as compose keeps containers
        whose configuration did not change.

        Falls back from an ephemeral container to a Job when the cluster refuses the former
        (RBAC, admission, no such subresource), saying why and what differs. Raises ClusterError
        on refusal, on an image that cannot be pulled, or after `agent.startup_timeout`, having
        deleted the Secret and Job it created.
        """
        plan = self.plans[session.project]
        key = key_from_text(session.key_file.read_text())
        if self._reuse(plan, session.project, key, progress):
            return
        try:
            self._start(plan, session.project, key, progress)
        except BaseException:
            self._remove_created(plan)
            raise

    def _start(self, plan: Plan, project: str, key: bytes, progress: Progress) -> None:
        directory = self.session_dir(project)
        record = state.read_record(directory)
        if record.agent is not None and record.namespace is not None:
            # the project's earlier session could not be kept: its Secret and Job go now
            # rather than at `down` (its forwarder is replaced below)
            for resource in ("jobs", "secrets"):
                with contextlib.suppress(ClusterError):
                    plan.cluster.delete(resource, record.agent, record.namespace)
            progress(f"replacing the project's earlier session (agent {record.agent})")
        self._clear_unrecorded(plan, project, progress)
        if plan.where.namespace not in record.namespaces:
            record.namespaces.append(plan.where.namespace)
        record.context = plan.cluster.context
        record.kubeconfig = self.kubeconfig_files()
        record.agent = record.pod = record.mode = None
        state.write_record(directory, record)  # before anything is created: `down` finds it
        code = bundle()
        owner = plan.target.pod if plan.target and plan.mode == "ephemeral" else None
        progress(f"creating Secret {plan.where.name} in namespace {plan.where.namespace}")
        plan.cluster.create(
            "secrets", plan.where.namespace, manifests.secret(plan.where, key, code, owner)
        )
        plan.created.append(("secrets", plan.where.name))
        if plan.mode == "ephemeral" and plan.target is not None:
            container = self.ephemeral(plan)
            progress(
                f"adding the agent to pod {plan.target.name} as ephemeral container "
                f"{plan.where.name}"
            )
            try:
                plan.cluster.add_ephemeral_container(
                    plan.target.name, plan.target.namespace, manifests.ephemeral_patch(container)
                )
                plan.pod = plan.target.name
            except client.NotFoundError as e:
                self._pod_still_there(plan)
                progress(
                    f"this cluster has no ephemeral containers ({e.message}); running "
                    f"the agent as a Job instead. Warning: {manifests.JOB_WARNING}"
                )
                plan.mode = "job"
            except client.RefusedError as e:
                progress(
                    f"the cluster refused the ephemeral container ({e.message}); "
                    f"running the agent as a Job instead. Warning: {manifests.JOB_WARNING}"
                )
                plan.mode = "job"
        elif plan.mode == "job" and plan.target is not None:  # `agent.ephemeral: false`
            progress(
                "running the agent as a Job (agent.ephemeral: false). "
                f"Warning: {manifests.JOB_WARNING}"
            )
        if plan.mode == "job":
            progress(f"creating Job {plan.where.name} in namespace {plan.where.namespace}")
            plan.cluster.create("jobs", plan.where.namespace, self.job(plan))
            plan.created.append(("jobs", plan.where.name))
        ready = self.wait_ready(plan, progress)
        try:
            plan.env = unseal(key, ready.env)
        except SealError as e:
            raise ClusterError(
                f"the agent's environment report does not verify: {e}",
                hint="another agent answered; run `composemirror down` and `up` again",
            ) from e
        progress(f"agent {ready.version} ready in pod {plan.pod} ({self._env_origin(plan)})")
        progress(f"forwarding {plan.address}:{plan.local_port} to the agent")
        plan.forwarding = True
        self.forward(
            ForwardTarget(
                context=plan.cluster.context,
                namespace=plan.where.namespace,
                pod=str(plan.pod),
                remote_port=ready.port,
                local_port=plan.local_port,
                address=plan.address,
                directory=directory,
                project=project,
            )
        )
        record.agent, record.pod = plan.where.name, plan.pod
        record.namespace, record.mode = plan.where.namespace, plan.mode
        state.write_record(directory, record)

    @staticmethod
    def _clear_unrecorded(plan: Plan, project: str, progress: Progress) -> list[str]:
        """Delete every Job and Secret labelled for `project` in the agent's namespace before a
        new session is made there: sessions whose record was lost (the state folder deleted)
        would otherwise stay until `down`. Safe because one `up` of a project prepares at a
        time (ops holds its lock). What was deleted (`secret/NAME`); a note through
        `progress` when the cluster refuses (they then stay for `down`)."""
        namespace = plan.where.namespace
        selector = manifests.project_selector(project)
        removed: list[str] = []
        try:
            for resource in ("jobs", "secrets"):
                removed += [
                    f"{resource[:-1]}/{name}"
                    for name in plan.cluster.delete_labelled(resource, namespace, selector)
                ]
        except ClusterError as e:
            progress(
                f"warning: could not delete the project's earlier Jobs and Secrets in namespace "
                f"{namespace} ({e.message}); `composemirror down` deletes them"
            )
        if removed:
            progress(
                f"deleted the project's earlier session objects in namespace {namespace}: "
                + ", ".join(removed)
            )
        return removed

    def _reuse(self, plan: Plan, project: str, key: bytes, progress: Progress) -> bool:
        """Keep the project's running session when it is healthy: the forwarder forwards at the
        port the project was rendered with, to the recorded agent, which still runs in the pod
        the target resolves to now (same context) and answers with this session's key."""
        directory = self.session_dir(project)
        record = state.read_record(directory)
        running = forwarder.read_state(directory)
        if record.agent is None or record.pod is None or running is None:
            return False
        spec = running.get("spec") or {}
        if (
            not running["alive"]
            or running.get("state") != "forwarding"
            or int(spec.get("local_port", 0)) != plan.local_port
            or spec.get("pod") != record.pod
            or record.context != plan.cluster.context
            or record.namespace != plan.where.namespace
            or (
                plan.target is not None
                and record.mode == "ephemeral"
                and plan.target.name != record.pod
            )
        ):
            return False
        previous = (plan.where, plan.pod, plan.mode)
        plan.where = dataclasses.replace(plan.where, name=record.agent)
        plan.pod, plan.mode = record.pod, record.mode or "ephemeral"
        try:
            ready = self._ready_once(plan, from_start=True)
            plan.env = unseal(key, ready.env)
        except (_NotYet, ClusterError, SealError) as e:
            log.info("not reusing the session of %s: %s", project, e)
            plan.where, plan.pod, plan.mode = previous
            return False
        plan.reused = True
        progress(
            f"reusing the running session: agent {record.agent} in pod {record.pod}, "
            f"forwarder pid {running['pid']} ({running.get('forwards', '?')})"
        )
        return True

    def _remove_created(self, plan: Plan) -> list[str]:
        """Delete what this command created (a failed or interrupted `up`); what went."""
        removed = []
        while plan.created:
            resource, name = plan.created.pop()
            try:
                plan.cluster.delete(resource, name, plan.where.namespace)
            except client.NotFoundError:
                continue
            except ClusterError as e:
                log.warning("could not delete %s/%s: %s", resource, name, e.message)
                continue
            removed.append(f"{resource[:-1]}/{name} in namespace {plan.where.namespace}")
        return removed

    @staticmethod
    def _pod_still_there(plan: Plan) -> None:
        """Raise ClusterError when the target pod went away since it was resolved."""
        assert plan.target is not None
        try:
            plan.cluster.get("pods", plan.target.name, plan.target.namespace)
        except client.NotFoundError as e:
            raise ClusterError(
                f"the target pod {plan.target.name} went away (a rollout?)",
                hint="run `composemirror up` again: it picks a current pod",
            ) from e

    def session_env(self, project: str) -> Mapping[str, str] | None:
        """The environment the agent reported after `prepare` (the target process's when it
        could read it), or None: for a Job agent, whose pod is not the target's, the
        environment `resolve` computed from the API stands (none for `targetless`). Raw:
        selection is composemirror.environment's."""
        plan = self.plans.get(project)
        if plan is None or plan.env is None or plan.mode == "job":
            return None
        return MappingProxyType(plan.env.env)

    @staticmethod
    def _env_origin(plan: Plan) -> str:
        """Where the app's environment comes from, for `up`'s ready line."""
        if plan.target is None:
            return "targetless: no environment imported"
        if plan.mode == "job":
            return f"environment from the API: pod spec of {plan.target.name}"
        assert plan.env is not None
        return f"environment from {plan.env.source}"

    def ephemeral(self, plan: Plan) -> dict[str, Any]:
        """The ephemeral container for `plan` (env and envFrom of the target copied)."""
        assert plan.target is not None
        env, env_from = copy_env(plan.target.spec)
        return manifests.ephemeral_container(
            plan.where, bundle(), plan.target.spec, plan.target.pod, env, env_from
        )

    def job(self, plan: Plan) -> dict[str, Any]:
        """The Job for `plan`: targetless, or the fallback beside the target.

        The target's env is not copied into a Job: its downward-API fields would describe the
        Job's pod, not the target's; the env `resolve` computed from the API stands.
        """
        if plan.target is None:
            return manifests.job(plan.where, bundle())
        return manifests.job(
            plan.where,
            bundle(),
            target_container=plan.target.spec,
            pod_security=plan.target.pod["spec"].get("securityContext"),
        )

    def wait_ready(self, plan: Plan, progress: Progress) -> Any:
        """Poll until the agent printed its ready line; fail fast on pull/config errors."""
        timeout = plan.where.settings.startup_timeout
        # Bounded by time and, with the sleep injected in tests, by the number of polls.
        retrying = Retrying(
            stop=stop_after_delay(timeout) | stop_after_attempt(timeout + 1),
            wait=wait_fixed(1.0),
            retry=retry_if_exception_type(_NotYet),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._ready_once(plan)
        except _NotYet as e:
            raise ClusterError(
                f"the agent did not become ready within {plan.where.settings.startup_timeout} s"
                f" ({e})",
                hint="raise `agent.startup_timeout` if its image pulls slowly; `kubectl "
                f"describe pod -n {plan.where.namespace} {plan.pod or plan.where.name}` "
                "says what it waits for",
            ) from e
        raise AssertionError("unreachable")

    def _ready_once(self, plan: Plan, *, from_start: bool = False) -> Any:
        """The agent's ready line, or _NotYet. `from_start`: read its log from the beginning
        (a running session's agent has logged every link since its ready line)."""
        cluster, namespace, name = plan.cluster, plan.where.namespace, plan.where.name
        if plan.mode == "ephemeral":
            pod = cluster.get("pods", str(plan.pod), namespace)
            statuses = (pod.get("status") or {}).get("ephemeralContainerStatuses") or []
        else:
            pods = cluster.find("pods", namespace, f"job-name={name}")
            if not pods:
                raise _NotYet("its Job has no pod yet")
            pod = pods[0]
            plan.pod = pod["metadata"]["name"]
            statuses = (pod.get("status") or {}).get("containerStatuses") or []
        status = next((s for s in statuses if s.get("name") == name), None)
        if status is None:
            raise _NotYet("not scheduled yet")
        state = status.get("state") or {}
        if "waiting" in state:
            reason = state["waiting"].get("reason") or "waiting"
            message = state["waiting"].get("message") or ""
            image = plan.where.settings.image
            if reason in IMAGE_FAILURES:
                raise ClusterError(
                    f"the cluster cannot get the agent's image {image} "
                    f"(imagePullPolicy {plan.where.settings.image_pull_policy}; {reason}: "
                    f"{message})",
                    hint=image_hint(image),
                )
            if reason in PULL_FAILURES and not any(t in message for t in TRANSIENT):
                raise ClusterError(
                    f"the agent cannot start: {reason}: {message}",
                    hint=f"image {image!r}: its container could not be created; "
                    "`kubectl describe pod` shows the events",
                )
            raise _NotYet(reason)
        if "running" not in state and "terminated" not in state:
            raise _NotYet("starting")  # its log cannot be read before it runs
        if from_start:
            logs = cluster.pod_log(str(plan.pod), namespace, name, tail=None, limit_bytes=LOG_HEAD)
        else:
            logs = cluster.pod_log(str(plan.pod), namespace, name)
        for line in logs.splitlines():
            ready = parse_ready(line.strip())
            if ready is not None:
                return ready
        if "terminated" in state:
            raise ClusterError(
                f"the agent exited before it was ready "
                f"({state['terminated'].get('reason', '')}): "
                f"{logs.strip()[-800:]}",
                hint="its image needs python3 >= 3.11",
            )
        raise _NotYet("started, not ready yet")

    def teardown(
        self,
        project: str,
        directory: Path,
        progress: Progress,
        *,
        config: Config | None = None,
        context: str | None = None,
    ) -> list[str]:
        """Stop the project's forwarder and delete its Jobs and Secrets by label; what was
        removed, for people.

        Needs nothing of `.composemirror/`: the forwarder is found by its state folder and its
        command line, the cluster objects by label. The context is `context` (`--context`)
        when given, else the one `up` recorded, else `config`'s, as kubectl users expect; the
        one used is said through `progress`. The namespaces are those `up` recorded plus
        `config`'s (or the context's). Ephemeral containers stay (see EPHEMERAL_NOTE).
        """
        folder = self.session_dir(project)
        removed = [f"forwarder (pid {pid})" for pid in forwarder.stop(folder, project=project)]
        record = state.read_record(folder)
        chosen: str | None
        if context is not None:
            chosen, why = context, "from --context"
        elif record.context is not None:
            chosen, why = record.context, "the one `up` used"
        elif config is not None:
            chosen, why = config.context, "from the configuration"
        else:
            # nothing recorded on this host (its state deleted): look where the kube config
            # points, saying what may remain
            removed += self._sweep(project, progress)
            state.remove(folder)
            return removed
        namespaces = list(record.namespaces)
        try:
            cluster = self.cluster(chosen, None)
            configured = (config.namespace if config else None) or cluster.namespace
            if configured not in namespaces:
                namespaces.append(configured)
            progress(f"cleaning up in context {cluster.context} ({why})")
            selector = manifests.project_selector(project)
            for namespace in namespaces:
                for resource in ("jobs", "secrets"):
                    for name in cluster.delete_labelled(resource, namespace, selector):
                        removed.append(f"{resource[:-1]}/{name} in namespace {namespace}")
        except ClusterError:
            if record.context is not None or context is not None:
                raise  # `up` created objects there: failing to remove them is an error
            return removed  # never `up`: nothing there to remove
        if record.mode == "ephemeral" or record.context is not None:
            progress(f"note: {EPHEMERAL_NOTE}")
        state.remove(folder)
        self.plans.pop(project, None)
        return removed

    def _sweep(self, project: str, progress: Progress) -> list[str]:
        """Delete `project`'s Jobs and Secrets with no record of where `up` made them: in every
        namespace when this account may list both cluster-wide, else in the namespace of the
        kube config's current context; a note through `progress`, with the kubectl command
        that finds them, whenever some may remain. What was removed."""
        selector = manifests.project_selector(project)
        search = f"`kubectl get jobs,secrets --all-namespaces -l {selector}`"
        removed: list[str] = []
        try:
            cluster = self.cluster(None, None)
            wide = all(
                cluster.can(Permission("list", r, group=g), "")[0]
                for r, g in (("jobs", "batch"), ("secrets", ""))
            )
            if wide:
                progress(
                    f"no session of {project} is recorded on this host: deleting its Jobs and "
                    f"Secrets in every namespace of context {cluster.context}"
                )
                for resource in ("jobs", "secrets"):
                    for item in cluster.find_everywhere(resource, selector):
                        name = item["metadata"]["name"]
                        namespace = item["metadata"]["namespace"]
                        with contextlib.suppress(client.NotFoundError):
                            cluster.delete(resource, name, namespace)
                            removed.append(f"{resource[:-1]}/{name} in namespace {namespace}")
                return removed
            namespace = cluster.namespace
            for resource in ("jobs", "secrets"):
                for name in cluster.delete_labelled(resource, namespace, selector):
                    removed.append(f"{resource[:-1]}/{name} in namespace {namespace}")
            progress(
                f"warning: no session of {project} is recorded on this host and this account "
                "may not list Jobs and Secrets in every namespace: only namespace "
                f"{namespace} of context {cluster.context} was cleaned; others may remain: "
                f"{search} finds them"
            )
        except ClusterError as e:
            progress(
                f"warning: no session of {project} is recorded on this host and the cluster "
                f"could not be cleaned ({e.message}); its Jobs and Secrets may remain: "
                f"{search} finds them"
            )
        return removed

    def release(self, project: str, directory: Path) -> None:
        """An attached `up` ended, or `up` failed: stop the forwarder this command started and
        delete the Secret and Job it created (a session it reused stays, for `down`)."""
        plan = self.plans.get(project)
        if plan is None:
            return
        folder = self.session_dir(project)
        if plan.forwarding:
            forwarder.stop(folder, project=project)
        if plan.created:
            self._remove_created(plan)
            record = state.read_record(folder)
            record.agent = record.pod = record.mode = None
            state.write_record(folder, record)

    def inspect(
        self, config: Config, project: str, directory: Path, *, sidecars: Sequence[str] = ()
    ) -> list[Check]:
        """For `status` and `doctor`: the forwarder (its process, what it forwards, restarts,
        a failure when it is not running while `sidecars` of the project run and dial it),
        whether the recorded agent's pod still exists (a failure when it was deleted or
        replaced), and the ephemeral agents `project` left in the pod, with why they stay
        (EPHEMERAL_NOTE). The pod and namespace are those `up` recorded, whatever `-n` says
        now. Raises ClusterError when the cluster cannot be read."""
        folder = self.session_dir(project)
        checks = [forwarder_check(folder, sidecars=sidecars)]
        record = state.read_record(folder)
        pod: Obj
        if record.pod is not None and record.namespace is not None:
            cluster = self.cluster(record.context, None)
            try:
                pod = cluster.get("pods", record.pod, record.namespace)
            except client.NotFoundError:
                checks.append(
                    Check(
                        name="agent pod",
                        ok=False,
                        detail=f"pod {record.pod} in namespace {record.namespace}, where the "
                        f"agent {record.agent} ran, is gone (deleted or replaced by a rollout)",
                        hint="run `composemirror up` again to place an agent in the current "
                        "pod (`composemirror down` first for a clean start)",
                    )
                )
                return checks
            name = pod["metadata"]["name"]
            if record.mode == "job":
                checks.append(job_agent_check(pod, str(record.agent), record.namespace))
                return checks
        elif config.target.kind == "targetless":
            return checks
        else:
            cluster = self.cluster(config.context, config.namespace)
            found = find_target(cluster, config.target, config.namespace or cluster.namespace)
            pod, name = found.pod, found.name
        entries = manifests.agent_entries(pod, project)
        checks += [
            Check(
                name=f"agent {e.name}",
                ok=True,
                detail=f"ephemeral container in pod {name}: {e.state}",
            )
            for e in entries
        ]
        if entries:
            checks.append(Check(name="note", ok=True, detail=EPHEMERAL_NOTE))
        return checks

    def doctor(self, config: Config) -> list[Check]:
        """API reachable and version; permissions; the target; a server-side dry run."""
        checks: list[Check] = []
        try:
            cluster = self.cluster(config.context, config.namespace)
            version = cluster.version()
        except ClusterError as e:
            return [Check(name="kubernetes API", ok=False, detail=e.message, hint=e.hint)]
        namespace = config.namespace or cluster.namespace
        checks.append(
            Check(
                name="kubernetes API",
                ok=True,
                detail=f"{cluster.server} (context {cluster.context}), "
                f"Kubernetes {version.get('gitVersion', '?')}",
            )
        )
        checks.append(permissions_check(cluster, namespace, config))
        checks.append(self.check_kubectl())
        found = None
        if config.target.kind != "targetless":
            try:
                found = find_target(cluster, config.target, namespace)
                checks.append(Check(name="target", ok=True, detail=found.description))
            except ClusterError as e:
                checks.append(Check(name="target", ok=False, detail=e.message, hint=e.hint))
                return checks
        checks.append(self.dry_run_check(cluster, config, namespace, found))
        checks.append(image_check(cluster, config.agent, found))
        return checks

    def dry_run_check(
        self, cluster: ClusterAPI, config: Config, namespace: str, found: targets.TargetPod | None
    ) -> Check:
        """A server-side dry run of the agent's objects (PodSecurity, webhooks, quotas)."""
        where = manifests.placement(
            "doctor",
            namespace if found else (config.agent.namespace or namespace),
            config.agent,
            str(config.target),
        )
        plan = Plan(
            cluster=cluster,
            where=where,
            target=found,
            local_port=0,
            mode="ephemeral" if found and config.agent.ephemeral else "job",
        )
        try:
            cluster.create(
                "secrets",
                where.namespace,
                manifests.secret(where, b"\0" * 32, bundle()),
                dry_run=True,
            )
            if plan.mode == "ephemeral" and found is not None:
                cluster.add_ephemeral_container(
                    found.name,
                    found.namespace,
                    manifests.ephemeral_patch(self.ephemeral(plan)),
                    dry_run=True,
                )
                detail = f"an ephemeral container in pod {found.name} is accepted"
            else:
                cluster.create("jobs", where.namespace, self.job(plan), dry_run=True)
                detail = f"a Job in namespace {where.namespace} is accepted"
        except ClusterError as e:
            return Check(name="agent placement (dry run)", ok=False, detail=e.message, hint=e.hint)
        return Check(name="agent placement (dry run)", ok=True, detail=detail)


def job_agent_check(pod: Obj, agent: str, namespace: str) -> Check:
    """`status`'s line for a Job agent: its Job, its pod and its container's state (`running`,
    `terminated (Completed)`, `waiting (ImagePullBackOff)`); a failure unless running."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    state = next((s.get("state") or {} for s in statuses if s.get("name") == agent), {})
    kind = next(iter(state), None)
    reason = (state.get(kind) or {}).get("reason") if kind else None
    text = "not started" if kind is None else f"{kind} ({reason})" if reason else kind
    return Check(
        name=f"agent {agent}",
        ok=kind == "running",
        detail=f"Job {agent} in namespace {namespace}, pod {pod['metadata']['name']}: {text}",
        hint=None
        if kind == "running"
        else f"`kubectl -n {namespace} logs job/{agent}` says why; `composemirror up` again "
        "starts a new one",
    )


def permissions_check(cluster: ClusterAPI, namespace: str, config: Config) -> Check:
    """SelfSubjectAccessReviews for `access.PERMISSIONS`; the missing Role rules as a hint."""
    denied = [p for p in PERMISSIONS if not cluster.can(p, namespace)[0]]
    ephemeral_denied = any(p.subresource == "ephemeralcontainers" for p in denied)
    job_denied = any(p.resource == "jobs" and p.verb == "create" for p in denied)
    fatal = [p for p in denied if not p.optional]
    if config.target.kind == "targetless" or not config.agent.ephemeral:
        fatal += [p for p in denied if p.resource == "jobs" and p.verb == "create"]
    elif ephemeral_denied and job_denied:
        fatal += [p for p in denied if p.subresource == "ephemeralcontainers"]
    if not denied:
        return Check(
            name="permissions",
            ok=True,
            detail=f"all {len(PERMISSIONS)} permissions in namespace {namespace}",
        )
    listed = ", ".join(str(p) for p in denied)
    detail = f"denied in namespace {namespace}: {listed}"
    if ephemeral_denied and not job_denied:
        detail += " (the agent will run as a Job beside the target)"
    return Check(
        name="permissions", ok=not fatal, detail=detail, hint=render_rules(denied, namespace)
    )


def image_check(
    cluster: ClusterAPI,
    settings: AgentSettings,
    found: targets.TargetPod | None,
) -> Check:
    """For `doctor`: whether the target's node can run the agent's image.

    Fails when an agent (of any project) in the target pod already could not get this image,
    the one certain sign. Otherwise says whether the node holds it (a container of the target
    pod runs it, or its Node's `status.images` lists it) or will try to pull it, never that
    the pull will succeed: a registry's reach from the node is not known before it pulls.
    A Node's list is only positive evidence: the kubelet refreshes it periodically and keeps
    the largest images only, so an image loaded a moment ago may be missing from it; and
    `get nodes` (cluster-wide) may not be granted.
    """
    image, policy = settings.image, settings.image_pull_policy
    name = "agent image (cluster)"
    if found is None:
        return Check(
            name=name,
            ok=True,
            detail=f"{image} ({policy}): the Job's node is not known before `up`; it will try "
            "to pull the image",
        )
    for entry in failed_pulls(found.pod, image):
        return Check(
            name=name,
            ok=False,
            detail=f"an earlier agent in pod {found.name} could not get {image}: {entry}",
            hint=image_hint(image),
        )
    wanted = manifests.image_reference(image)
    running = {
        manifests.image_reference(str(c.get("image", "")))
        for c in (found.pod.get("spec") or {}).get("containers") or []
    }
    node_name = str((found.pod.get("spec") or {}).get("nodeName") or "?")
    if wanted in running:
        return Check(
            name=name, ok=True, detail=f"{image} is on node {node_name} (the target runs it)"
        )
    try:
        listed = manifests.node_has_image(cluster.node(node_name), image)
    except ClusterError as e:
        listed, why = False, f"node {node_name} unreadable: {e.message}"
    else:
        why = f"not listed on node {node_name}"
    if listed:
        return Check(name=name, ok=True, detail=f"{image} is on node {node_name}")
    if policy == "Never":
        detail = (
            f"{image}: {why}; with imagePullPolicy Never `up` fails at once if the node lacks it"
        )
    else:
        detail = (
            f"{image}: {why}; the node will try to pull it ({policy}) when `up` starts the "
            "agent (whether it can is known only then)"
        )
    return Check(name=name, ok=True, detail=detail)


def failed_pulls(pod: Obj, image: str) -> list[str]:
    """`reason: message` of each composemirror agent in `pod` whose `image` could not be got."""
    images = {
        c["name"]: c.get("image")
        for c in (pod.get("spec") or {}).get("ephemeralContainers") or []
        if c.get("name", "").startswith("composemirror-")
    }
    failed = []
    for status in (pod.get("status") or {}).get("ephemeralContainerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if images.get(status.get("name")) == image and waiting.get("reason") in IMAGE_FAILURES:
            failed.append(f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
    return failed


def kubectl_check() -> Check:
    """The kubectl the forwarder runs: found, and its version."""
    try:
        kubectl = forwarder.find_kubectl()
        version = forwarder.kubectl_version(kubectl)
    except ClusterError as e:
        return Check(name="kubectl (port-forward)", ok=False, detail=e.message, hint=e.hint)
    return Check(name="kubectl (port-forward)", ok=True, detail=f"{kubectl} {version}")


def forwarder_check(
    render_dir: Path, *, sidecars: Sequence[str] = (), now: float | None = None
) -> Check:
    """The project's forwarder as its state file and process say.

    `sidecars`: the project's sidecar services running on the engine; each dials the
    forwarder, so none running while they do is a failure (their link is down), not a rest.
    A forwarder that says `forwarding` but whose kubectl exited at least RESTARTING_DROPS
    times in the last RESTARTING_WINDOW seconds (`now`, Unix time) is `restarting`, a failure
    with kubectl's last error: kubectl exits when the pod's port refuses a connection."""
    state = forwarder.read_state(render_dir)
    if state is None:
        if not sidecars:
            return Check(name="forwarder", ok=True, detail="not running (no `up` holds a session)")
        return Check(
            name="forwarder",
            ok=False,
            detail=f"not running, while the project's sidecars {', '.join(sidecars)} run and "
            "dial it: their link to the agent is down",
            hint="run `composemirror up -d` to start the session again (or "
            "`composemirror down`, then `composemirror up -d`, for a clean start)",
        )
    what = f"pid {state['pid']}, {state.get('forwards', '?')}"
    if state.get("pod_gone"):
        return Check(
            name="forwarder",
            ok=False,
            detail=f"stopped: {state.get('error')}",
            hint="run `composemirror up -d` again (or `down`, then `up`)",
        )
    if not state["alive"]:
        return Check(
            name="forwarder",
            ok=False,
            detail=f"exited ({what})" + (f": {state['error']}" if state.get("error") else ""),
            hint="run `composemirror up -d` again to restart it",
        )
    restarts = int(state.get("restarts") or 0)
    detail = f"{state['state']} ({what}; {restarts} restart{'s' if restarts != 1 else ''})"
    now = time.time() if now is None else now
    recent = [t for t in state.get("drops") or [] if now - float(t) <= RESTARTING_WINDOW]
    if state["state"] == "forwarding" and len(recent) >= RESTARTING_DROPS:
        return Check(
            name="forwarder",
            ok=False,
            detail=f"restarting: {state.get('last_error') or 'kubectl exited'} (kubectl "
            f"exited {len(recent)} times in the last {RESTARTING_WINDOW:.0f} s; {what}; "
            f"{restarts} restarts)",
            hint="kubectl's port-forward ends at each connection to the agent: its pod may be "
            "terminating or the agent may have exited; `composemirror up -d` places a new "
            f"agent (see {render_dir / forwarder.LOG_FILE})",
        )
    return Check(
        name="forwarder",
        ok=state["state"] == "forwarding",
        detail=detail,
        hint=state.get("error") if state["state"] != "forwarding" else None,
    )


RESTARTING_WINDOW = 60.0
"""Seconds over which `forwarder_check` counts kubectl's exits."""
RESTARTING_DROPS = 2
"""kubectl exits within RESTARTING_WINDOW from which a `forwarding` forwarder is restarting
(one exit is a passing drop that a restart mended)."""


class _NotYet(Exception):
    """The agent is not ready yet; the wait goes on."""
