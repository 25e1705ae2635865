"""A fake `Cluster` over recorded API objects, answering as the API server would."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from composemirror.backends.kubernetes.access import Permission
from composemirror.backends.kubernetes.client import NotFoundError, RefusedError
from composemirror.errors import ClusterError

FIXTURES = Path(__file__).parent / "fixtures"
RESOURCES = {
    "Pod": "pods",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "ReplicaSet": "replicasets",
    "Job": "jobs",
    "CronJob": "cronjobs",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Node": "nodes",
}


def load(name: str = "shop.json") -> list[dict[str, Any]]:
    """The items of a recorded `kubectl get -o json` List."""
    return list(json.loads((FIXTURES / name).read_text())["items"])


def selected(selector: str | None, labels: Mapping[str, str]) -> bool:
    """Label-selector query strings as the API server reads them (=, in, notin, exists, !)."""
    if not selector:
        return True
    for term in re.split(r",(?![^(]*\))", selector):
        term = term.strip()
        if m := re.fullmatch(r"(\S+) (in|notin) \((.*)\)", term):
            values = m.group(3).split(",")
            if (m.group(2) == "in") != (labels.get(m.group(1)) in values):
                return False
        elif "=" in term:
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeCluster:
    """Holds objects by resource; records what was written; refuses what it is told to."""

    server = "https://cluster.example:6443"

    def __init__(
        self,
        items: list[dict[str, Any]] | None = None,
        *,
        context: str = "dev",
        namespace: str = "shop",
        denied: frozenset[str] = frozenset(),
        refuse_ephemeral: ClusterError | None = None,
    ) -> None:
        self.context = context
        self.namespace = namespace
        self.objects: dict[str, list[dict[str, Any]]] = {}
        for item in load() if items is None else items:
            self.objects.setdefault(RESOURCES[item["kind"]], []).append(item)
        self.denied = denied
        """Permissions (as `str(Permission)`) SelfSubjectAccessReviews deny."""
        self.refuse_ephemeral = refuse_ephemeral
        self.created: list[tuple[str, dict[str, Any], bool]] = []
        self.patched: list[tuple[str, Mapping[str, Any], bool]] = []
        self.deleted: list[tuple[str, str]] = []
        self.logs: dict[tuple[str, str], str] = {}
        self.namespaces: set[str] = {namespace}

    def get(self, resource: str, name: str, namespace: str) -> dict[str, Any]:
        for item in self.objects.get(resource, []):
            if item["metadata"]["name"] == name and item["metadata"]["namespace"] == namespace:
                return copy.deepcopy(item)
        raise NotFoundError(f"{resource}/{name} not found in namespace {namespace}")

    def find(
        self, resource: str, namespace: str, selector: str | None = None
    ) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(i)
            for i in self.objects.get(resource, [])
            if i["metadata"]["namespace"] == namespace
            and selected(selector, i["metadata"].get("labels") or {})
        ]

    def find_everywhere(self, resource: str, selector: str) -> list[dict[str, Any]]:
        if f"list {resource}" in self.denied:
            raise RefusedError(
                f"{resource} is forbidden: cannot list {resource} at the cluster scope"
            )
        return [
            copy.deepcopy(i)
            for i in self.objects.get(resource, [])
            if selected(selector, i["metadata"].get("labels") or {})
        ]

    def pod_log(
        self,
        name: str,
        namespace: str,
        container: str,
        *,
        tail: int | None = 50,
        limit_bytes: int | None = None,
    ) -> str:
        text = self.logs.get((name, container), "")
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return text if limit_bytes is None else text.encode()[:limit_bytes].decode()

    def node(self, name: str) -> dict[str, Any]:
        for item in self.objects.get("nodes", []):
            if item["metadata"]["name"] == name:
                return copy.deepcopy(item)
        if "get nodes" in self.denied:
            raise RefusedError(f"forbidden: cannot get nodes/{name}")
        raise NotFoundError(f"nodes/{name} not found")

    def namespace_exists(self, name: str) -> bool | None:
        if "get namespaces" in self.denied:
            return None
        return name in self.namespaces or any(
            i["metadata"].get("namespace") == name for items in self.objects.values() for i in items
        )

    def version(self) -> dict[str, Any]:
        return {"major": "1", "minor": "34", "gitVersion": "v1.34.2"}

    def add_ephemeral_container(
        self, pod: str, namespace: str, patch: Mapping[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        if self.refuse_ephemeral:
            raise self.refuse_ephemeral
        target = self.get("pods", pod, namespace)
        self.patched.append((pod, patch, dry_run))
        if not dry_run:
            for item in self.objects["pods"]:
                if item["metadata"]["name"] == pod:
                    item["spec"].setdefault("ephemeralContainers", []).extend(
                        patch["spec"]["ephemeralContainers"]
                    )
        return target

    def create(
        self, resource: str, namespace: str, body: Mapping[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        if f"create {resource}" in self.denied or (
            resource == "jobs" and "create jobs.batch" in self.denied
        ):
            raise ClusterError(f"forbidden: cannot create {resource}")
        self.created.append((resource, copy.deepcopy(dict(body)), dry_run))
        if not dry_run:
            self.objects.setdefault(resource, []).append(copy.deepcopy(dict(body)))
        return dict(body)

    def delete(self, resource: str, name: str, namespace: str) -> None:
        if not any(
            i["metadata"]["name"] == name and i["metadata"]["namespace"] == namespace
            for i in self.objects.get(resource, [])
        ):
            raise NotFoundError(f"{resource}/{name} not found in namespace {namespace}")
        self.objects[resource] = [
            i
            for i in self.objects[resource]
            if not (i["metadata"]["name"] == name and i["metadata"]["namespace"] == namespace)
        ]
        self.deleted.append((resource, name))

    def delete_labelled(self, resource: str, namespace: str, selector: str) -> list[str]:
        names = [i["metadata"]["name"] for i in self.find(resource, namespace, selector)]
        self.objects[resource] = [
            i for i in self.objects.get(resource, []) if i["metadata"]["name"] not in names
        ]
        self.deleted += [(resource, n) for n in names]
        return names

    def can(self, permission: Permission, namespace: str) -> tuple[bool, str]:
        allowed = str(permission) not in self.denied
        return allowed, "" if allowed else "no RBAC policy matched"
