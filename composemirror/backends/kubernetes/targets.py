"""Which pod and container a target names, decided over API objects (plain JSON dicts).

The client fetches; these functions decide. A workload's pods are those its selector matches and
that it controls (ownerReferences, through the ReplicaSet for a Deployment, through the newest Job
for a CronJob), as kubectl finds a workload's pods (`kubectl logs deployment/x` lists by the
selector, `polymorphichelpers.AttachablePodForObject`). Of those, one that is Running, Ready and
not terminating is chosen; the container by name, else the `kubectl.kubernetes.io/default-container`
annotation (kubectl's `podcmd.FindOrDefaultContainerByName`), else the first container that is not
a known mesh sidecar. Every failure is a `ClusterError` saying what was found. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from composemirror.backends import Resolver
from composemirror.config import Target
from composemirror.errors import ClusterError

Obj = Mapping[str, Any]
"""An API object as JSON (what the API server sends), e.g. a Pod."""

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
MESH_SIDECARS = frozenset(
    {
        "istio-proxy",
        "istio-init",
        "linkerd-proxy",
        "linkerd-init",
        "envoy",
        "envoy-sidecar",
        "consul-dataplane",
        "consul-connect-envoy-sidecar",
        "kuma-sidecar",
        "vault-agent",
        "cloud-sql-proxy",
        "aws-appmesh-envoy",
        "dapr-sidecar",
    }
)
"""Container names of service-mesh and infrastructure sidecars that are never the app."""

WORKLOAD_KINDS = {
    "deployment": ("apps/v1", "Deployment"),
    "statefulset": ("apps/v1", "StatefulSet"),
    "replicaset": ("apps/v1", "ReplicaSet"),
    "job": ("batch/v1", "Job"),
    "cronjob": ("batch/v1", "CronJob"),
    "pod": ("v1", "Pod"),
}
"""Target kind -> (apiVersion, kind) of the object it names."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetPod:
    """A resolved target: the pod and the container the agent joins."""

    pod: Obj
    container: str
    description: str
    """For people, e.g. `deployment/checkout (pod checkout-7d9f-x2x, container app) in shop`."""

    @property
    def name(self) -> str:
        """The pod's name."""
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        """The pod's namespace."""
        return str(self.pod["metadata"]["namespace"])

    @property
    def spec(self) -> Obj:
        """The chosen container's spec."""
        return next(c for c in self.pod["spec"]["containers"] if c["name"] == self.container)


def selector_text(workload: Obj) -> str:
    """`spec.selector` (a LabelSelector) as a label-selector query string.

    For a CronJob, the selector of its job template is not set; use `owned_jobs` instead.
    Raises ClusterError when the workload selects nothing (an empty selector matches all).
    """
    selector = workload.get("spec", {}).get("selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    if not terms:
        raise ClusterError(
            f"{_kind_name(workload)} has no pod selector",
            hint="name one of its pods instead: `target: pod/NAME`",
        )
    return ",".join(terms)


def matches(selector: Obj, labels: Mapping[str, str]) -> bool:
    """Whether `labels` satisfy a LabelSelector (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if (
            (op == "In" and (not present or labels[key] not in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def controller_uid(obj: Obj) -> str | None:
    """The uid of the object's controller (the ownerReference with `controller: true`)."""
    for owner in obj.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner["uid"])
    return None


def owned(owner: Obj, objects: Iterable[Obj]) -> list[Obj]:
    """The objects whose controller is `owner` (by uid)."""
    uid = owner["metadata"]["uid"]
    return [o for o in objects if controller_uid(o) == uid]


def workload_pods(
    kind: str, workload: Obj, pods: Sequence[Obj], replicasets: Sequence[Obj] = ()
) -> list[Obj]:
    """The pods a Deployment (through its ReplicaSets), StatefulSet, ReplicaSet or Job controls.

    `pods` are those the workload's selector matched; a Deployment's `replicasets` those in the
    namespace (they are filtered by owner here).
    """
    if kind == "deployment":
        owners = {rs["metadata"]["uid"] for rs in owned(workload, replicasets)}
        return [p for p in pods if controller_uid(p) in owners]
    return owned(workload, pods)


def newest_job(cronjob: Obj, jobs: Sequence[Obj]) -> Obj:
    """The CronJob's most recently created Job. Raises ClusterError when it has none."""
    mine = owned(cronjob, jobs)
    if not mine:
        raise ClusterError(
            f"{_kind_name(cronjob)} has no Job yet",
            hint="wait for its schedule, or start one with `kubectl create job "
            f"--from=cronjob/{cronjob['metadata']['name']} NAME`",
        )
    return max(
        mine, key=lambda j: (j["metadata"].get("creationTimestamp", ""), j["metadata"]["name"])
    )


def is_ready(pod: Obj) -> bool:
    """Running, condition Ready=True, and not being deleted."""
    status = pod.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return (
        status.get("phase") == "Running"
        and ready
        and not pod.get("metadata", {}).get("deletionTimestamp")
    )


def pod_state(pod: Obj) -> str:
    """A short account of why a pod is or is not usable, e.g. `Pending (ImagePullBackOff)`."""
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return "Terminating"
    phase = status.get("phase") or "Unknown"
    reasons = []
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        for key in ("waiting", "terminated"):
            reason = (state.get(key) or {}).get("reason")
            if reason:
                reasons.append(reason)
    if status.get("reason"):
        reasons.insert(0, status["reason"])
    if phase == "Running" and not reasons and not is_ready(pod):
        reasons.append("not ready")
    return f"{phase} ({', '.join(dict.fromkeys(reasons))})" if reasons else phase


def pick_pod(what: str, pods: Sequence[Obj]) -> Obj:
    """The ready pod to join: of several, the oldest (the least likely to be rolling away).

    Raises ClusterError listing each pod's state when none is ready.
    """
    ready = sorted(
        (p for p in pods if is_ready(p)),
        key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
    )
    if ready:
        return ready[0]
    if not pods:
        raise ClusterError(
            f"{what} has no pods", hint="is it scaled to zero? `kubectl get pods` shows what runs"
        )
    states = "; ".join(f"{p['metadata']['name']}: {pod_state(p)}" for p in pods)
    raise ClusterError(
        f"{what} has no ready pod ({states})",
        hint="wait until one is Running and Ready; `kubectl describe pod` says why one is not",
    )


def pick_container(target: Target, pod: Obj) -> str:
    """The container the agent joins: named, else the default annotation, else the app's.

    Raises ClusterError for a name the pod lacks, or several app containers and none named.
    """
    names = [c["name"] for c in pod["spec"]["containers"]]
    pod_name = pod["metadata"]["name"]
    wanted = target.container or (pod["metadata"].get("annotations") or {}).get(
        DEFAULT_CONTAINER_ANNOTATION
    )
    if wanted:
        if wanted in names:
            return str(wanted)
        source = "" if target.container else f" (its {DEFAULT_CONTAINER_ANNOTATION} annotation)"
        raise ClusterError(
            f"pod {pod_name} has no container {wanted!r}{source}",
            hint=f"its containers: {', '.join(names)}",
        )
    apps = [n for n in names if n not in MESH_SIDECARS]
    if len(apps) == 1:
        return str(apps[0])
    if not apps:
        return str(names[0])
    raise ClusterError(
        f"pod {pod_name} runs several containers ({', '.join(apps)}) and the target names none",
        hint=f"name one: `target: {target.kind}/{target.name}/container/{apps[0]}`",
    )


def resolve(target: Target, pod: Obj) -> TargetPod:
    """The container of an already chosen `pod` for `target`, with a description."""
    container = pick_container(target, pod)
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    what = f"pod/{name}" if target.kind == "pod" else f"{target.kind}/{target.name} (pod {name}"
    description = (
        f"{what}, container {container}"
        + ("" if target.kind == "pod" else ")")
        + f" in namespace {namespace}"
    )
    return TargetPod(pod=pod, container=container, description=description)


def _kind_name(obj: Obj) -> str:
    return f"{str(obj.get('kind', 'object')).lower()}/{obj.get('metadata', {}).get('name')}"


CLUSTER_DOMAIN = "cluster.local"
"""The kubelet's default `clusterDomain`; the API does not publish a cluster's own."""
CLUSTER_FIRST_NDOTS = 5
"""The `ndots` the kubelet writes for ClusterFirst pods."""


def pod_resolver(pod: Obj, cluster_domain: str = CLUSTER_DOMAIN) -> Resolver:
    """The search list and ndots the kubelet writes into `pod`'s resolv.conf, from its spec.

    As the kubelet builds it (pkg/kubelet/network/dns): for `ClusterFirst` (the default, and
    `ClusterFirstWithHostNet` on the host network) `<ns>.svc.<domain>`, `svc.<domain>`,
    `<domain>` and ndots 5; for `None` only what `dnsConfig` says; for `Default` (the node's
    resolver, which the API does not show) no search list. `dnsConfig.searches` are appended
    and its `ndots` option wins. The node's own search domains are not known here and are left out.
    """
    spec = pod.get("spec") or {}
    namespace = str((pod.get("metadata") or {}).get("namespace", "default"))
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    host_network = bool(spec.get("hostNetwork"))
    search: list[str] = []
    ndots = 1
    if policy == "ClusterFirstWithHostNet" or (policy == "ClusterFirst" and not host_network):
        search = [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        ndots = CLUSTER_FIRST_NDOTS
    config = spec.get("dnsConfig") or {}
    search += [str(s).rstrip(".") for s in config.get("searches") or () if str(s).strip(".")]
    for option in config.get("options") or ():
        value = str(option.get("value", ""))
        if option.get("name") == "ndots" and value.isdigit():
            ndots = min(int(value), 15)
    return Resolver(search=tuple(dict.fromkeys(search)), ndots=ndots)
