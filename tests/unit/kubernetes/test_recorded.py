"""Target and env resolution over objects recorded from a real v1.34 cluster (record.sh):
workloads just created, their pods still starting."""

from __future__ import annotations

import pytest

from composemirror.backends.kubernetes import targets
from composemirror.backends.kubernetes.backend import find_target, target_env
from composemirror.config import Target
from composemirror.errors import ClusterError
from tests.unit.kubernetes.fake import FakeCluster, load

NS = "cm-k8s-dev"


def recorded() -> FakeCluster:
    return FakeCluster(load("recorded-starting.json"), namespace=NS)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            Target(kind="deployment", name="checkout"),
            "deployment/checkout has no ready pod (checkout-68d97b7b4f-66sdx: Pending "
            "(ContainerCreating); checkout-68d97b7b4f-qc6sz: Pending (ContainerCreating))",
        ),
        (
            Target(kind="cronjob", name="nightly"),
            "cronjob/nightly (its newest job nightly-29934811) has no ready pod "
            "(nightly-29934811-56xml: Pending (ContainerCreating))",
        ),
        (Target(kind="statefulset", name="cache"), "cache-0: Pending (ContainerCreating)"),
        (Target(kind="job", name="migrate"), "migrate-j9lm6: Pending (ContainerCreating)"),
    ],
)
def test_starting_workloads_say_what_their_pods_do(target: Target, message: str) -> None:
    with pytest.raises(ClusterError) as failure:
        find_target(recorded(), target, NS)
    assert message in failure.value.message


def test_controller_chain_of_a_real_deployment() -> None:
    cluster = recorded()
    deployment = cluster.get("deployments", "checkout", NS)
    selector = targets.selector_text(deployment)
    pods = targets.workload_pods(
        "deployment",
        deployment,
        cluster.find("pods", NS, selector),
        cluster.find("replicasets", NS, selector),
    )
    assert sorted(p["metadata"]["name"] for p in pods) == [
        "checkout-68d97b7b4f-66sdx",
        "checkout-68d97b7b4f-qc6sz",
    ]


def test_default_container_annotation_of_a_real_pod() -> None:
    pod = recorded().get("pods", "cache-0", NS)
    assert targets.pick_container(Target(kind="statefulset", name="cache"), pod) == "server"


def test_env_of_a_real_pod() -> None:
    cluster = recorded()
    found = targets.resolve(
        Target(kind="deployment", name="checkout"),
        cluster.get("pods", "checkout-68d97b7b4f-66sdx", NS),
    )
    env, notes = target_env(cluster, found)
    assert notes == []
    assert env == {
        "CFG_database_url": "postgres://app@postgres.shop.svc.cluster.local:5432/shop",
        "CFG_orders_url": "http://orders.shop.svc.cluster.local:8080/orders",
        "APP_MODE": "production",
        "DATABASE_URL": "postgres://app@postgres.shop.svc.cluster.local:5432/shop",
        "DB_PASSWORD": "s3cret",
        "POD_NAME": "checkout-68d97b7b4f-66sdx",
        "POD_IP": "",  # not assigned while the sandbox is being created
        "TEAM": "payments",
        "MEMORY_LIMIT_MI": "256",
        "GREETING": "hello checkout-68d97b7b4f-66sdx",
    }


def running() -> FakeCluster:
    return FakeCluster(load("recorded-running.json"), namespace=NS)


@pytest.mark.parametrize(
    ("target", "pod", "container"),
    [
        # two ready pods created in the same second: the order is by name, so it is stable
        (Target(kind="deployment", name="checkout"), "checkout-68d97b7b4f-66sdx", "checkout"),
        (Target(kind="statefulset", name="cache"), "cache-0", "server"),
        (Target(kind="statefulset", name="cache", container="metrics"), "cache-0", "metrics"),
        (Target(kind="job", name="migrate"), "migrate-j9lm6", "migrate"),
        (Target(kind="cronjob", name="nightly"), "nightly-29934812-9kmkv", "report"),
        (
            Target(kind="pod", name="checkout-68d97b7b4f-qc6sz"),
            "checkout-68d97b7b4f-qc6sz",
            "checkout",
        ),
    ],
)
def test_running_workloads_resolve(target: Target, pod: str, container: str) -> None:
    found = find_target(running(), target, NS)
    assert (found.name, found.container) == (pod, container)


def test_image_that_cannot_be_pulled_is_named() -> None:
    with pytest.raises(
        ClusterError, match=r"broken-587bb87889-q2w29: Pending \(ErrImageNeverPull\)"
    ):
        find_target(running(), Target(kind="deployment", name="broken"), NS)


def test_running_pod_has_its_ip_in_the_env() -> None:
    cluster = running()
    found = find_target(cluster, Target(kind="deployment", name="checkout"), NS)
    env, _ = target_env(cluster, found)
    assert env["POD_IP"] == found.pod["status"]["podIP"] != ""
