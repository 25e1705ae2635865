"""The agent's objects: restricted security, the key only by reference, sizes within limits."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from composemirror.backends.kubernetes import manifests
from composemirror.backends.kubernetes.carry import PART_SIZE, bundle
from composemirror.backends.kubernetes.environment import copy_env
from composemirror.config import AgentSettings
from composemirror.protocol import key_to_text
from tests.unit.kubernetes.fake import FakeCluster

KEY = bytes(range(32))


def where(**settings: Any) -> manifests.Placement:
    return manifests.placement(
        "Local Database_1",
        "shop",
        AgentSettings(**settings),
        "deployment/checkout",
        name="composemirror-local-database-1-x7k2p",
    )


def ephemeral(**settings: Any) -> dict[str, Any]:
    pod = FakeCluster().get("pods", "checkout-7d9f8b6c5-x2x4q", "shop")
    target = pod["spec"]["containers"][0]
    env, env_from = copy_env(target)
    return manifests.ephemeral_container(where(**settings), bundle(), target, pod, env, env_from)


def restricted(context: dict[str, Any]) -> None:
    """PodSecurity `restricted` (pod-security-admission's checks for a container)."""
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] > 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in context


def test_ephemeral_container_joins_the_target_within_restricted() -> None:
    container = ephemeral()
    assert container["targetContainerName"] == "checkout"
    assert container["name"] == "composemirror-local-database-1-x7k2p"
    assert container["image"] == "python:3.12-slim"
    assert container["command"][:3] == ["python3", "-I", "-c"]
    restricted(container["securityContext"])
    # the target runs as 1000:1000; the agent does too, so it may read /proc/1/environ
    assert (
        container["securityContext"]["runAsUser"],
        container["securityContext"]["runAsGroup"],
    ) == (1000, 1000)
    for forbidden in ("ports", "resources", "livenessProbe", "readinessProbe", "startupProbe"):
        assert forbidden not in container  # ephemeral containers may not have them


def test_key_and_code_only_by_reference() -> None:
    container = ephemeral()
    text = json.dumps(container)
    assert key_to_text(KEY) not in text
    assert bundle().parts[0][:64] not in text
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {}) and e["name"].startswith("COMPOSEMIRROR")
    }
    assert refs["COMPOSEMIRROR_AGENT_KEY"] == {"name": container["name"], "key": "key"}
    assert refs["COMPOSEMIRROR_CODE_0"] == {"name": container["name"], "key": "code-0"}


def test_secret_holds_key_and_code_and_dies_with_the_pod() -> None:
    pod = FakeCluster().get("pods", "checkout-7d9f8b6c5-x2x4q", "shop")
    secret = manifests.secret(where(), KEY, bundle(), owner=pod)
    assert base64.b64decode(secret["data"]["key"]).decode() == key_to_text(KEY)
    code = "".join(
        base64.b64decode(secret["data"][f"code-{i}"]).decode() for i in range(len(bundle().parts))
    )
    assert code == "".join(bundle().parts)
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        }
    ]
    assert secret["metadata"]["labels"] == {
        "io.composemirror.project": "Local-Database_1",
        "io.composemirror.role": "agent-secret",
        "io.composemirror.version": "0.1.0",
    }


def test_sizes_within_limits() -> None:
    """etcd keeps an object under 1.5 MiB, a Secret under 1 MiB, an env var under 128 KiB; each
    `up` leaves its ephemeral container in the pod, so that entry must stay small."""
    secret = manifests.secret(where(), KEY, bundle())
    assert len(json.dumps(secret)) < 256 * 1024
    assert all(len(p) <= PART_SIZE < 128 * 1024 - 64 for p in bundle().parts)
    assert len(json.dumps(ephemeral())) < 8 * 1024


def test_job_for_targetless() -> None:
    job = manifests.job(
        where(image="registry.local/python:3.12", image_pull_secrets=("reg",)), bundle()
    )
    spec = job["spec"]
    assert (
        spec["backoffLimit"],
        spec["activeDeadlineSeconds"],
        spec["ttlSecondsAfterFinished"],
    ) == (0, manifests.JOB_DEADLINE, manifests.JOB_TTL_AFTER_FINISHED)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "reg"}]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    restricted(container["securityContext"])
    assert container["securityContext"]["runAsUser"] == manifests.DEFAULT_UID
    assert container["image"] == "registry.local/python:3.12"
    labels = job["metadata"]["labels"]
    assert labels[manifests.LABEL_ROLE] == "agent"
    assert spec["template"]["metadata"]["labels"] == labels
    assert {"name": "COMPOSEMIRROR_AGENT_TARGETED", "value": "0"} in container["env"]


@pytest.mark.parametrize(
    ("security", "uid", "gid"),
    [
        ({}, manifests.DEFAULT_UID, None),
        ({"runAsUser": 0}, manifests.DEFAULT_UID, None),  # root: restricted forbids it
        ({"runAsUser": 1001}, 1001, None),
        ({"runAsUser": 1001, "runAsGroup": 2000}, 1001, 2000),
    ],
)
def test_security_context_follows_the_target(
    security: dict[str, int], uid: int, gid: int | None
) -> None:
    context = manifests.security_context({"securityContext": security})
    assert context["runAsUser"] == uid
    assert context.get("runAsGroup") == gid


@pytest.mark.parametrize("project", ["web", "Local Database_1", "x" * 80, "---"])
def test_names_are_dns_labels(project: str) -> None:
    name = manifests.agent_name(project)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), name
    assert name != manifests.agent_name(project)  # unique per session


def test_patch_adds_by_name() -> None:
    container = ephemeral()
    assert manifests.ephemeral_patch(container) == {"spec": {"ephemeralContainers": [container]}}


def test_entries_left_in_the_pod_are_found_by_project() -> None:
    pod = FakeCluster().get("pods", "checkout-7d9f8b6c5-x2x4q", "shop")
    mine = ephemeral()
    other = manifests.ephemeral_container(
        manifests.placement("other", "shop", AgentSettings(), "pod/x"),
        bundle(),
        pod["spec"]["containers"][0],
        pod,
    )
    pod["spec"]["ephemeralContainers"] = [mine, other]
    pod["status"]["ephemeralContainerStatuses"] = [
        {"name": mine["name"], "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}
    ]
    assert manifests.agent_entries(pod, "Local Database_1") == [
        manifests.AgentEntry(name=mine["name"], state="terminated (Completed)")
    ]
    assert manifests.agent_entries(pod, "other") == [
        manifests.AgentEntry(name=other["name"], state="not started")
    ]


@pytest.mark.parametrize(
    ("image", "reference"),
    [
        ("python:3.12-slim", "docker.io/library/python:3.12-slim"),
        ("python", "docker.io/library/python:latest"),
        ("composemirror/base:bookworm", "docker.io/composemirror/base:bookworm"),
        ("ghcr.io/org/agent:1", "ghcr.io/org/agent:1"),
        ("localhost:5000/agent", "localhost:5000/agent:latest"),
        ("localhost/agent:2", "localhost/agent:2"),
        ("python@sha256:abc", "docker.io/library/python@sha256:abc"),
    ],
)
def test_image_references_as_the_runtime_names_them(image: str, reference: str) -> None:
    assert manifests.image_reference(image) == reference


def test_a_handshake_timeout_other_than_the_default_reaches_the_pod_agent() -> None:
    def env(container: dict[str, Any]) -> dict[str, str]:
        return {e["name"]: e["value"] for e in container["env"] if "value" in e}

    assert "COMPOSEMIRROR_AGENT_HANDSHAKE_TIMEOUT" not in env(ephemeral())
    assert env(ephemeral(handshake_timeout=2))["COMPOSEMIRROR_AGENT_HANDSHAKE_TIMEOUT"] == "2"
