"""Fixtures for the real single-node cluster (`make cluster`): a missing cluster is a failure,
never a skip."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.kube import (
    APP_DOCKERFILE,
    APP_IMAGE,
    CLUSTER_SCRIPT,
    KUBECONFIG,
    KUBECTL,
    kubectl,
    ok,
)


@pytest.fixture(scope="session")
def cluster() -> None:
    """The running cluster; its absence fails the test with what to do."""
    if not KUBECONFIG.exists() or not KUBECTL.exists():
        pytest.fail(f"no cluster: {KUBECONFIG} is missing; run `make cluster` (make test does)")
    ready = kubectl("get", "--raw", "/readyz", timeout=30)
    if ready.returncode != 0:
        pytest.fail(f"the cluster does not answer: {ready.stderr} (run `make cluster`)")


@pytest.fixture(scope="session")
def app_image(cluster: None) -> str:
    """A locally built image, loaded into the cluster's containerd by `scripts/cluster load`."""
    build = subprocess.run(
        ["docker", "build", "-q", "-t", APP_IMAGE, "-"],
        input=APP_DOCKERFILE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    load = subprocess.run(
        [str(CLUSTER_SCRIPT), "load", APP_IMAGE], capture_output=True, text=True, timeout=600
    )
    assert load.returncode == 0, load.stderr
    return APP_IMAGE


@pytest.fixture
def namespace(cluster: None) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) afterwards."""
    name = f"cm-test-{uuid.uuid4().hex[:8]}"
    ok(kubectl("create", "namespace", name))
    ok(kubectl("label", "namespace", name, "io.composemirror.role=cluster-test"))
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The lifecycle test restarts the cluster: it runs after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("cluster_lifecycle") is not None)
