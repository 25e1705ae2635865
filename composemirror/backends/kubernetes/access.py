"""What composemirror may do in a namespace: the permissions it uses and the Role that grants them.

`PERMISSIONS` lists every (verb, resource, subresource) the Kubernetes backend uses, with why;
`render_rules` turns those a SelfSubjectAccessReview denied into the Role rules to ask for, and
`role_manifest` is the minimal Role (docs/kubernetes.md shows it). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import yaml


@dataclass(frozen=True, slots=True, kw_only=False)
class Permission:
    """One RBAC check: `verb` on `resource[/subresource]` in API `group` ('' is core)."""

    verb: str
    resource: str
    subresource: str = ""
    group: str = ""
    purpose: str = ""
    """Why composemirror needs it, for doctor's output."""
    optional: bool = False
    """Something still works without it (a fallback or a narrower feature)."""

    @property
    def resource_path(self) -> str:
        """`pods/ephemeralcontainers`, as RBAC rules name subresources."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        group = f".{self.group}" if self.group else ""
        return f"{self.verb} {self.resource_path}{group}"


PERMISSIONS: tuple[Permission, ...] = (
    Permission("get", "pods", purpose="resolve the target and watch the agent start"),
    Permission("list", "pods", purpose="find a workload's ready pod"),
    Permission("get", "deployments", group="apps", purpose="deployment/ targets"),
    Permission("get", "statefulsets", group="apps", purpose="statefulset/ targets"),
    Permission("get", "replicasets", group="apps", purpose="replicaset/ targets"),
    Permission("list", "replicasets", group="apps", purpose="which pods belong to a deployment"),
    Permission("get", "jobs", group="batch", purpose="job/ targets, and the agent's Job"),
    Permission("get", "cronjobs", group="batch", purpose="cronjob/ targets"),
    Permission("list", "jobs", group="batch", purpose="a cronjob's newest job; `down`"),
    Permission(
        "patch",
        "pods",
        "ephemeralcontainers",
        purpose="the agent as an ephemeral container in the target pod",
        optional=True,
    ),
    Permission(
        "create",
        "jobs",
        group="batch",
        purpose="the agent as a Job (targetless, or ephemeral containers refused)",
        optional=True,
    ),
    Permission(
        "delete", "jobs", group="batch", purpose="`down` removes the agent's Job", optional=True
    ),
    Permission("create", "secrets", purpose="the session's Secret (tunnel key, agent code)"),
    Permission("list", "secrets", purpose="`down` finds the session's Secrets by label"),
    Permission("delete", "secrets", purpose="`down` removes the session's Secrets"),
    Permission("get", "secrets", purpose="import env the target takes from Secrets", optional=True),
    Permission(
        "get", "configmaps", purpose="import env the target takes from ConfigMaps", optional=True
    ),
    Permission("get", "pods", "log", purpose="read the agent's ready line"),
    Permission("create", "pods", "portforward", purpose="the link to the agent"),
)
"""Every permission the backend uses in the target's (and the agent's) namespace."""


def rules(permissions: Iterable[Permission]) -> list[dict[str, list[str]]]:
    """RBAC PolicyRules granting `permissions`: one rule per API group and verb set."""
    by_resource: dict[tuple[str, str], set[str]] = {}
    for p in permissions:
        by_resource.setdefault((p.group, p.resource_path), set()).add(p.verb)
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (group, resource), verbs in sorted(by_resource.items()):
        grouped.setdefault((group, tuple(sorted(verbs))), []).append(resource)
    return [
        {"apiGroups": [group], "resources": resources, "verbs": list(verbs)}
        for (group, verbs), resources in grouped.items()
    ]


def render_rules(missing: Iterable[Permission], namespace: str) -> str:
    """The Role rules to ask for, as YAML, e.g. after SelfSubjectAccessReviews denied them."""
    text = yaml.safe_dump(rules(missing), default_flow_style=None, sort_keys=False, width=100)
    return f"# Role rules needed in namespace {namespace}\n{text}".rstrip()


def role_manifest(namespace: str, name: str = "composemirror") -> dict[str, object]:
    """The minimal Role for composemirror in `namespace` (bind it with a RoleBinding)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": rules(PERMISSIONS),
    }
