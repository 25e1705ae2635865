"""What composemirror creates in a cluster, as API objects (plain dicts): pure, no I/O.

- a Secret per session holding the tunnel key and the agent's code (`carry`), referenced by
  `secretKeyRef`, so neither appears in the pod spec, `kubectl describe` or any log;
- the agent as an ephemeral container in the target pod (`targetContainerName`: it shares the
  target's network and process namespaces and the pod's resolv.conf), or as a Job beside it;
- a securityContext within PodSecurity `restricted` for both.
Everything carries the labels `io.composemirror.project`, `.role` and `.version`.
"""

from __future__ import annotations

import base64
import re
import secrets as random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import composemirror
from composemirror.backends.kubernetes.carry import BOOTSTRAP, PART_ENV, PART_KEY, PARTS_ENV, Bundle
from composemirror.config import AgentSettings
from composemirror.link import HANDSHAKE_TIMEOUT
from composemirror.podagent import (
    ENV_HANDSHAKE_TIMEOUT,
    ENV_KEY,
    ENV_PORT,
    ENV_TARGETED,
    ENV_TTL,
)
from composemirror.protocol import key_to_text

Obj = Mapping[str, Any]
ENV_PROJECT = "COMPOSEMIRROR_PROJECT"
"""Names the project in the agent's env: ephemeral containers carry no labels of their own."""

LABEL_PROJECT = "io.composemirror.project"
LABEL_ROLE = "io.composemirror.role"
LABEL_VERSION = "io.composemirror.version"
ANNOTATION_TARGET = "io.composemirror.target"
ANNOTATION_CODE = "io.composemirror.code"
SECRET_KEY = "key"
DEFAULT_UID = 65532
"""The agent's uid when the target's is unknown or root (`restricted` forbids uid 0)."""
JOB_DEADLINE = 12 * 3600
"""activeDeadlineSeconds of a Job agent: a backstop; the agent exits after `ttl` idle."""
JOB_TTL_AFTER_FINISHED = 300
JOB_WARNING = (
    "the agent runs as a Job beside the target, not inside its pod: its connections come from "
    "another pod IP with the namespace's default ServiceAccount, so NetworkPolicies, mesh "
    "identity (mTLS) and per-pod allow-lists see a different client than the deployed app"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """The names and settings one session's objects share."""

    project: str
    namespace: str
    name: str
    """Unique: the Secret's, the Job's and the ephemeral container's name."""
    settings: AgentSettings
    target: str = "targetless"
    """The target as written (an annotation, for people)."""
    labels: Mapping[str, str] = field(default_factory=dict)


def agent_name(project: str, suffix: str | None = None) -> str:
    """`composemirror-<project>-<5 random>`: a DNS label (<= 63) unique per session."""
    suffix = suffix or "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
    slug = re.sub(r"[^a-z0-9-]+", "-", project.lower()).strip("-")[: 63 - 21] or "project"
    return f"composemirror-{slug.rstrip('-')}-{suffix}"


def labels(project: str, role: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels of everything composemirror creates (`extra` from `agent.labels` first)."""
    return {
        **(extra or {}),
        LABEL_PROJECT: _label_value(project),
        LABEL_ROLE: role,
        LABEL_VERSION: composemirror.__version__,
    }


def project_selector(project: str) -> str:
    """The label selector of a project's objects, for listing and deleting them."""
    return f"{LABEL_PROJECT}={_label_value(project)}"


def placement(
    project: str, namespace: str, settings: AgentSettings, target: str, name: str | None = None
) -> Placement:
    """A new session's names. `name` defaults to a fresh `agent_name`."""
    return Placement(
        project=project,
        namespace=namespace,
        name=name or agent_name(project),
        settings=settings,
        target=target,
        labels=labels(project, "agent", settings.labels),
    )


def secret(where: Placement, key: bytes, code: Bundle, owner: Obj | None = None) -> dict[str, Any]:
    """The session's Secret: the tunnel key and the code parts.

    With `owner` (the target Pod), the garbage collector deletes the Secret with the pod even
    if `down` never runs. `blockOwnerDeletion` stays unset: it would need delete on pods.
    """
    data = {SECRET_KEY: key_to_text(key)}
    data.update({PART_KEY.format(i): part for i, part in enumerate(code.parts)})
    metadata: dict[str, Any] = {
        "name": where.name,
        "namespace": where.namespace,
        "labels": labels(where.project, "agent-secret", where.settings.labels),
        "annotations": {
            **where.settings.annotations,
            ANNOTATION_TARGET: where.target,
            ANNOTATION_CODE: code.digest,
        },
    }
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": owner.get("apiVersion", "v1"),
                "kind": owner.get("kind", "Pod"),
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata,
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def security_context(
    target_container: Obj | None = None, pod_security: Obj | None = None
) -> dict[str, Any]:
    """PodSecurity `restricted` for the agent, as the target's uid/gid where they are known.

    Running as the target's uid and gid lets the agent read /proc/PID/environ of the target
    process (a ptrace read check); a root target gets DEFAULT_UID (the spec copy is used then).
    """
    effective = {**(pod_security or {}), **((target_container or {}).get("securityContext") or {})}
    uid = effective.get("runAsUser")
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": uid if isinstance(uid, int) and uid > 0 else DEFAULT_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
        "readOnlyRootFilesystem": True,
    }
    gid = effective.get("runAsGroup")
    if isinstance(gid, int) and isinstance(uid, int) and uid > 0:
        context["runAsGroup"] = gid
    return context


def agent_env(
    where: Placement, code: Bundle, *, targeted: bool, copied: Sequence[Obj] = ()
) -> list[dict[str, Any]]:
    """The agent's environment: settings, the key and code from the Secret, the copied env."""

    def from_secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": where.name, "key": key}}}

    env: list[dict[str, Any]] = [
        {"name": ENV_PROJECT, "value": where.project},
        {"name": ENV_PORT, "value": str(where.settings.port)},
        {"name": ENV_TTL, "value": str(where.settings.ttl)},
        {"name": ENV_TARGETED, "value": "1" if targeted else "0"},
        {"name": PARTS_ENV, "value": str(len(code.parts))},
        from_secret(ENV_KEY, SECRET_KEY),
    ]
    if where.settings.handshake_timeout != HANDSHAKE_TIMEOUT:
        env.append({"name": ENV_HANDSHAKE_TIMEOUT, "value": str(where.settings.handshake_timeout)})
    env += [from_secret(PART_ENV.format(i), PART_KEY.format(i)) for i in range(len(code.parts))]
    return env + [dict(e) for e in copied]


def _container(
    where: Placement,
    code: Bundle,
    *,
    targeted: bool,
    security: Obj,
    copied_env: Sequence[Obj],
    copied_env_from: Sequence[Obj],
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": where.name,
        "image": where.settings.image,
        "imagePullPolicy": where.settings.image_pull_policy,
        "command": ["python3", "-I", "-c", BOOTSTRAP],
        "env": agent_env(where, code, targeted=targeted, copied=copied_env),
        "securityContext": dict(security),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if copied_env_from:
        container["envFrom"] = [dict(e) for e in copied_env_from]
    return container


def ephemeral_container(
    where: Placement,
    code: Bundle,
    target_container: Obj,
    pod: Obj,
    copied_env: Sequence[Obj] = (),
    copied_env_from: Sequence[Obj] = (),
) -> dict[str, Any]:
    """The agent as an EphemeralContainer joining `target_container` of `pod`.

    Ephemeral containers take no ports, probes or resources, and cannot be removed: the entry
    stays, terminated, in the pod's spec until the pod is replaced.
    """
    security = security_context(target_container, pod.get("spec", {}).get("securityContext"))
    container = _container(
        where,
        code,
        targeted=True,
        security=security,
        copied_env=copied_env,
        copied_env_from=copied_env_from,
    )
    container["targetContainerName"] = target_container["name"]
    return container


def ephemeral_patch(container: Obj) -> dict[str, Any]:
    """A strategic merge patch for `pods/ephemeralcontainers` that adds `container`.

    Ephemeral containers merge by name, so existing entries are kept (kubectl debug patches the
    same subresource the same way).
    """
    return {"spec": {"ephemeralContainers": [dict(container)]}}


def job(
    where: Placement,
    code: Bundle,
    *,
    copied_env: Sequence[Obj] = (),
    copied_env_from: Sequence[Obj] = (),
    target_container: Obj | None = None,
    pod_security: Obj | None = None,
) -> dict[str, Any]:
    """The agent as a Job in the namespace: targetless, or when ephemeral containers are refused.

    backoffLimit 0 (a failed agent is reported, not retried), activeDeadlineSeconds as a
    backstop, ttlSecondsAfterFinished to clean up; no ServiceAccount token is mounted.
    """
    security = security_context(target_container, pod_security)
    container = _container(
        where,
        code,
        targeted=False,
        security=security,
        copied_env=copied_env,
        copied_env_from=copied_env_from,
    )
    container["resources"] = {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"memory": "256Mi"},
    }
    pod_labels = {**where.labels}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if where.settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in where.settings.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": where.name,
            "namespace": where.namespace,
            "labels": dict(where.labels),
            "annotations": {**where.settings.annotations, ANNOTATION_TARGET: where.target},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": JOB_DEADLINE,
            "ttlSecondsAfterFinished": JOB_TTL_AFTER_FINISHED,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentEntry:
    """An ephemeral container composemirror added to a pod, and its state."""

    name: str
    state: str
    """`running`, `terminated (Completed)`, `waiting (ImagePullBackOff)`, or `not started`."""


def agent_entries(pod: Obj, project: str) -> list[AgentEntry]:
    """The ephemeral agents `project` left in `pod` (they stay until the pod is replaced)."""
    statuses = {
        s["name"]: s.get("state") or {}
        for s in (pod.get("status") or {}).get("ephemeralContainerStatuses") or []
    }
    entries = []
    for container in (pod.get("spec") or {}).get("ephemeralContainers") or []:
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        if env.get(ENV_PROJECT) != project:
            continue
        state = statuses.get(container["name"], {})
        kind = next(iter(state), None)
        reason = (state.get(kind) or {}).get("reason") if kind else None
        text = "not started" if kind is None else f"{kind} ({reason})" if reason else kind
        entries.append(AgentEntry(name=container["name"], state=text))
    return entries


def _label_value(text: str) -> str:
    """`text` as a valid label value (<= 63 of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "project"


def image_reference(image: str) -> str:
    """`image` fully qualified as the container runtime and a Node's `status.images` name it:
    `python:3.12-slim` is `docker.io/library/python:3.12-slim`, a missing tag is `latest`
    (the Docker reference grammar: a first component with a dot or a colon, or `localhost`,
    is a registry)."""
    name, at, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    repository, tag = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
    first = repository.split("/", 1)[0]
    if "/" not in repository:
        repository = f"docker.io/library/{repository}"
    elif "." not in first and ":" not in first and first != "localhost":
        repository = f"docker.io/{repository}"
    return f"{repository}@{digest}" if at else f"{repository}:{tag}"


def node_has_image(node: Obj, image: str) -> bool:
    """Whether a Node reports `image` among the images its runtime holds (`status.images`,
    which lists the largest ones, up to the kubelet's `nodeStatusMaxImages`)."""
    wanted = image_reference(image)
    return any(
        image_reference(name) == wanted
        for entry in (node.get("status") or {}).get("images") or []
        for name in entry.get("names") or []
    )
