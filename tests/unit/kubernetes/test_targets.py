"""Target resolution over recorded API objects: which pod and container, and each way it fails."""

from __future__ import annotations

import pytest

from composemirror.backends.kubernetes import targets
from composemirror.backends.kubernetes.backend import find_target
from composemirror.config import Target
from composemirror.errors import ClusterError
from tests.unit.kubernetes.fake import FakeCluster


def target(text: str) -> Target:
    kind, name, *rest = text.split("/")
    return Target(kind=kind, name=name, container=rest[1] if rest else None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "pod", "container"),
    [
        # the ready pod of the current ReplicaSet: not the terminating old one, not the pending
        # new one, not the stray pod with the same labels and no owner; istio-proxy is skipped
        ("deployment/checkout", "checkout-7d9f8b6c5-x2x4q", "checkout"),
        ("deployment/checkout/container/istio-proxy", "checkout-7d9f8b6c5-x2x4q", "istio-proxy"),
        ("pod/checkout-7d9f8b6c5-x2x4q", "checkout-7d9f8b6c5-x2x4q", "checkout"),
        ("statefulset/postgres/container/postgres", "postgres-0", "postgres"),
        ("statefulset/cache", "cache-0", "redis"),  # kubectl.kubernetes.io/default-container
        ("replicaset/worker", "worker-abcde", "worker"),
        ("job/migrate", "migrate-q8w7e", "report"),
        ("cronjob/nightly", "nightly-29410445-bbbbb", "report"),  # the newest job's pod
    ],
)
def test_resolves(text: str, pod: str, container: str) -> None:
    found = find_target(FakeCluster(), target(text), "shop")
    assert (found.name, found.container, found.namespace) == (pod, container, "shop")
    assert pod in found.description


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        (
            "deployment/nope",
            "there is no deployment 'nope' in namespace shop",
            "kubectl get deployments -n shop",
        ),
        (
            "deployment/broken",
            "has no ready pod (broken-5c6d7-aaaaa: Running (CrashLoopBackOff))",
            "kubectl describe pod",
        ),
        ("pod/checkout-7d9f8b6c5-p9k2m", "Pending (ImagePullBackOff)", None),
        ("pod/checkout-6b8f9c7d4-old01", "Terminating", None),
        (
            "statefulset/postgres",
            "several containers (postgres, exporter) and the target names none",
            "statefulset/postgres/container/postgres",
        ),
        ("deployment/checkout/container/web", "has no container 'web'", "checkout, istio-proxy"),
        (
            "cronjob/weekly",
            "cronjob/weekly has no Job yet",
            "kubectl create job --from=cronjob/weekly",
        ),
        ("service/orders", "service targets are not supported", None),
    ],
)
def test_fails_clearly(text: str, message: str, hint: str | None) -> None:
    with pytest.raises(ClusterError) as failure:
        find_target(FakeCluster(), target(text), "shop")
    assert message in failure.value.message
    if hint:
        assert hint in str(failure.value.hint)


def test_no_pods_at_all() -> None:
    with pytest.raises(ClusterError, match="has no pods"):
        targets.pick_pod("deployment/x", [])


@pytest.mark.parametrize(
    ("selector", "text"),
    [
        ({"matchLabels": {"b": "2", "a": "1"}}, "a=1,b=2"),
        (
            {"matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]}]},
            "t in (x,y)",
        ),
        ({"matchExpressions": [{"key": "t", "operator": "NotIn", "values": ["x"]}]}, "t notin (x)"),
        ({"matchExpressions": [{"key": "t", "operator": "Exists"}]}, "t"),
        ({"matchExpressions": [{"key": "t", "operator": "DoesNotExist"}]}, "!t"),
    ],
)
def test_selector_text(selector: dict[str, object], text: str) -> None:
    assert targets.selector_text({"spec": {"selector": selector}}) == text


def test_empty_selector_is_refused() -> None:
    with pytest.raises(ClusterError, match="no pod selector"):
        targets.selector_text({"kind": "Deployment", "metadata": {"name": "x"}, "spec": {}})


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"app": "a", "tier": "db"}, True),
        ({"app": "a", "tier": "web"}, False),
        ({"app": "b", "tier": "db"}, False),
        ({"app": "a", "tier": "db", "canary": "1"}, False),
        ({"app": "a"}, False),
    ],
)
def test_matches(labels: dict[str, str], expected: bool) -> None:
    selector = {
        "matchLabels": {"app": "a"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["db"]},
            {"key": "canary", "operator": "DoesNotExist"},
        ],
    }
    assert targets.matches(selector, labels) is expected


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["app"], "app"),
        (["istio-proxy", "app"], "app"),
        (["linkerd-proxy", "app", "vault-agent"], "app"),
        (["istio-proxy"], "istio-proxy"),  # nothing but a sidecar: that is what there is
    ],
)
def test_default_container(names: list[str], expected: str) -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": n} for n in names]}}
    assert targets.pick_container(Target(kind="pod", name="p"), pod) == expected


def test_default_container_annotation_naming_nothing() -> None:
    pod = {
        "metadata": {"name": "p", "annotations": {targets.DEFAULT_CONTAINER_ANNOTATION: "x"}},
        "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
    }
    with pytest.raises(ClusterError, match="default-container annotation"):
        targets.pick_container(Target(kind="pod", name="p"), pod)


@pytest.mark.parametrize(
    ("spec", "search", "ndots"),
    [
        ({}, ("shop.svc.cluster.local", "svc.cluster.local", "cluster.local"), 5),
        ({"dnsPolicy": "ClusterFirst", "hostNetwork": True}, (), 1),
        (
            {"dnsPolicy": "ClusterFirstWithHostNet", "hostNetwork": True},
            ("shop.svc.cluster.local", "svc.cluster.local", "cluster.local"),
            5,
        ),
        ({"dnsPolicy": "Default"}, (), 1),
        (
            {"dnsPolicy": "None", "dnsConfig": {"searches": ["corp.example."]}},
            ("corp.example",),
            1,
        ),
        (
            {
                "dnsConfig": {
                    "searches": ["corp.example"],
                    "options": [{"name": "ndots", "value": "2"}],
                }
            },
            ("shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "corp.example"),
            2,
        ),
    ],
)
def test_the_app_gets_the_search_list_the_kubelet_writes(
    spec: dict[str, object], search: tuple[str, ...], ndots: int
) -> None:
    pod = {"metadata": {"name": "p", "namespace": "shop"}, "spec": spec}
    resolver = targets.pod_resolver(pod)
    assert (resolver.search, resolver.ndots) == (search, ndots)
