"""The backend's sequence over a fake cluster: resolve, place, prepare, teardown, doctor."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from composemirror.backends import Check, Resolution, Resolver, SessionInfo
from composemirror.backends.kubernetes import manifests
from composemirror.backends.kubernetes.backend import KubernetesBackend
from composemirror.backends.kubernetes.client import NotFoundError, RefusedError
from composemirror.backends.kubernetes.link import ForwardTarget
from composemirror.config import AgentSettings, Config, EnvSettings, Target
from composemirror.errors import ClusterError
from composemirror.podagent import EnvReport, ready_line, seal
from tests.unit.kubernetes.fake import FakeCluster

POD = "checkout-7d9f8b6c5-x2x4q"
KEY = bytes(range(32))


def config(target: str = "deployment/checkout", **agent: Any) -> Config:
    kind, _, name = target.partition("/")
    return Config(
        source="test",
        target=Target(kind=kind, name=name or None),  # type: ignore[arg-type]
        namespace="shop",
        services=("web",),
        agent=AgentSettings(**agent),
        env=EnvSettings(),
    )


class Harness:
    def __init__(self, tmp_path: Path, cluster: FakeCluster | None = None) -> None:
        self.cluster = cluster or FakeCluster()
        self.forwarded: list[ForwardTarget] = []
        self.messages: list[str] = []
        self.sleeps: list[float] = []
        self.backend = KubernetesBackend(
            connect=lambda c, n: self.cluster,
            forward=self.forwarded.append,
            sleep=self.sleeps.append,
            check_kubectl=lambda: Check(name="kubectl (port-forward)", ok=True, detail="v1.34.4"),
        )
        self.session = SessionInfo(
            project="shop-dev",
            directory=tmp_path,
            config=config(),
            resolution=Resolution(description="test", target=POD),
            base_image="debian:bookworm-slim",
        )
        self.session.render_dir.mkdir()
        self.session.key_file.write_text(KEY.hex() + "\n")

    def agent_runs(
        self,
        pod: str,
        name: str,
        *,
        source: str = "process",
        container_list: str = "ephemeralContainerStatuses",
    ) -> None:
        """Make the fake pod report the agent running and ready."""
        for item in self.cluster.objects["pods"]:
            if item["metadata"]["name"] == pod:
                item["status"][container_list] = [
                    {"name": name, "state": {"running": {"startedAt": "2026-11-30T11:00:00Z"}}}
                ]
        report = EnvReport(source=source, env={"DATABASE_URL": "from-process"})  # type: ignore[arg-type]
        self.cluster.logs[(pod, name)] = (
            "agent INFO agent listening on tcp:127.0.0.1:47017\n"
            + ready_line(version="0.1.0", port=47017, sealed=seal(KEY, report))
            + "\n"
        )


def test_resolve_gives_the_target_and_its_env(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    resolution = h.backend.resolve(config())
    assert resolution.description.startswith(
        f"deployment/checkout (pod {POD}, container checkout) in namespace shop"
    )
    assert resolution.env["DB_PASSWORD"] == "s3cret"
    assert resolution.env["POD_NAME"] == POD
    assert resolution.resolver == Resolver(
        search=("shop.svc.cluster.local", "svc.cluster.local", "cluster.local"), ndots=5
    )  # the app expands short names itself; the agent resolves exactly what it is asked


def test_place_and_prepare_an_ephemeral_agent(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config()
    placement = h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    plan = h.backend.plans["shop-dev"]
    assert str(placement.link) == f"tcp:host.docker.internal:{plan.local_port}"
    assert dict(placement.extra_hosts) == {"host.docker.internal": "host-gateway"}
    h.agent_runs(POD, plan.where.name)
    h.backend.prepare(h.session, h.messages.append)

    [(resource, secret, dry)] = h.cluster.created
    assert (resource, dry, secret["metadata"]["name"]) == ("secrets", False, plan.where.name)
    assert secret["metadata"]["ownerReferences"][0]["name"] == POD
    [(pod, patch, dry)] = h.cluster.patched
    container = patch["spec"]["ephemeralContainers"][0]
    assert (pod, dry, container["targetContainerName"]) == (POD, False, "checkout")
    assert h.forwarded == [
        ForwardTarget(
            context="dev",
            namespace="shop",
            pod=POD,
            remote_port=47017,
            local_port=plan.local_port,
            address="127.0.0.1",
            directory=tmp_path / ".composemirror",
        )
    ]
    assert h.backend.session_env("shop-dev") == {"DATABASE_URL": "from-process"}
    assert any("environment from process" in m for m in h.messages)
    forwarder, agent, note = h.backend.inspect(cfg, "shop-dev", tmp_path)
    assert forwarder.detail.startswith("not running")  # the test's forwarder records nothing
    assert (agent.name, agent.detail) == (
        f"agent {plan.where.name}",
        f"ephemeral container in pod {POD}: running",
    )
    assert "cannot be removed" in note.detail


@pytest.mark.parametrize(
    "refusal",
    [
        RefusedError("forbidden: cannot patch pods/ephemeralcontainers"),
        RefusedError('violates PodSecurity "restricted:latest"'),
        NotFoundError("pods/x (ephemeralcontainers) not found"),  # a cluster without them
    ],
)
def test_refused_ephemeral_container_falls_back_to_a_job(
    tmp_path: Path, refusal: ClusterError
) -> None:
    cluster = FakeCluster(refuse_ephemeral=refusal)
    h = Harness(tmp_path, cluster)
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    agent_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{name}-abcde", "namespace": "shop", "labels": {"job-name": name}},
        "spec": {"containers": []},
        "status": {},
    }
    cluster.objects["pods"].append(agent_pod)
    h.agent_runs(f"{name}-abcde", name, source="spec", container_list="containerStatuses")
    h.backend.prepare(h.session, h.messages.append)

    kinds = [(r, dry) for r, _, dry in cluster.created]
    assert kinds == [("secrets", False), ("jobs", False)]
    job = cluster.created[1][1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    # downward-API fields would describe the Job's pod: the env resolved from the API stands
    assert not any(e["name"].startswith("CMENV_") for e in container["env"])
    assert container["securityContext"]["runAsUser"] == 1000  # still the target's uid
    assert any(manifests.JOB_WARNING in m for m in h.messages)
    assert h.forwarded[0].pod == f"{name}-abcde"


def test_target_pod_gone_is_not_papered_over(tmp_path: Path) -> None:
    cluster = FakeCluster(refuse_ephemeral=NotFoundError("pods/x not found"))
    h = Harness(tmp_path, cluster)
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    cluster.objects["pods"] = [p for p in cluster.objects["pods"] if p["metadata"]["name"] != POD]
    with pytest.raises(ClusterError, match="went away"):
        h.backend.prepare(h.session, h.messages.append)
    assert [r for r, _, _ in cluster.created] == ["secrets"]  # no Job started for nothing


def test_other_failures_are_not_taken_for_refusals(tmp_path: Path) -> None:
    cluster = FakeCluster(refuse_ephemeral=ClusterError("cannot reach the API server"))
    h = Harness(tmp_path, cluster)
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    with pytest.raises(ClusterError, match="cannot reach"):
        h.backend.prepare(h.session, h.messages.append)
    assert "jobs" not in [r for r, _, _ in cluster.created]


def test_image_pull_failure_stops_the_wait_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config(image="registry.invalid/python:3.12")
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    for item in h.cluster.objects["pods"]:
        if item["metadata"]["name"] == POD:
            item["status"]["ephemeralContainerStatuses"] = [
                {
                    "name": name,
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": "Back-off pulling image",
                        }
                    },
                }
            ]
    with pytest.raises(ClusterError, match="ImagePullBackOff") as failure:
        h.backend.prepare(h.session, h.messages.append)
    assert "registry.invalid/python:3.12" in str(failure.value.hint)
    assert h.sleeps == []


def test_a_secret_cache_still_syncing_is_waited_for(tmp_path: Path) -> None:
    """The Secret was created a moment before the agent: the kubelet catches up by itself."""
    h = Harness(tmp_path)
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    waiting = {
        "reason": "CreateContainerConfigError",
        "message": "failed to sync secret cache: timed out waiting for the condition",
    }
    for item in h.cluster.objects["pods"]:
        if item["metadata"]["name"] == POD:
            item["status"]["ephemeralContainerStatuses"] = [
                {"name": name, "state": {"waiting": waiting}}
            ]
    h.backend.sleep = lambda _: h.agent_runs(POD, name)  # ready at the next poll
    h.backend.prepare(h.session, h.messages.append)
    assert h.backend.session_env("shop-dev") == {"DATABASE_URL": "from-process"}


def test_wait_is_bounded(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config(startup_timeout=5)
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    with pytest.raises(ClusterError, match="did not become ready within 5 s"):
        h.backend.prepare(h.session, h.messages.append)


def test_teardown_deletes_by_label_and_says_what_stays(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config("targetless")
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    h.cluster.objects["pods"].append(
        {
            "metadata": {"name": f"{name}-x", "namespace": "shop", "labels": {"job-name": name}},
            "spec": {},
            "status": {},
        }
    )
    h.agent_runs(f"{name}-x", name, source="none", container_list="containerStatuses")
    h.backend.prepare(h.session, h.messages.append)
    removed = h.backend.teardown("shop-dev", h.session.directory, h.messages.append)
    assert removed == [f"job/{name} in namespace shop", f"secret/{name} in namespace shop"]
    assert h.backend.teardown("shop-dev", h.session.directory, h.messages.append) == []
    assert "checkout-secrets" in {s["metadata"]["name"] for s in h.cluster.objects["secrets"]}
    assert "cannot be removed" in h.messages[-1]


def test_doctor_all_good(tmp_path: Path) -> None:
    checks = Harness(tmp_path).backend.doctor(config())
    assert [(c.name, c.ok) for c in checks] == [
        ("kubernetes API", True),
        ("permissions", True),
        ("kubectl (port-forward)", True),
        ("target", True),
        ("agent placement (dry run)", True),
    ]
    assert "v1.34.2" in checks[0].detail


@pytest.mark.parametrize(
    ("denied", "ok", "fragment"),
    [
        # no ephemeral containers: still fine, through a Job
        ({"patch pods/ephemeralcontainers"}, True, "will run as a Job"),
        # neither: nothing can run the agent
        ({"patch pods/ephemeralcontainers", "create jobs.batch"}, False, "create jobs.batch"),
        # the session's Secret is needed in every case
        ({"create secrets"}, False, "create secrets"),
    ],
)
def test_doctor_names_missing_rules(
    tmp_path: Path, denied: set[str], ok: bool, fragment: str
) -> None:
    h = Harness(tmp_path, FakeCluster(denied=frozenset(denied)))
    check = next(c for c in h.backend.doctor(config()) if c.name == "permissions")
    assert check.ok is ok
    assert fragment in check.detail
    assert check.hint is not None and check.hint.startswith("# Role rules needed")


def test_a_running_session_keeps_its_forwarders_port(tmp_path: Path) -> None:
    """`compose -- ARGS` renders again while the session runs: the sidecars keep dialling the
    forwarder that is there, so the rendered link must not move."""
    h = Harness(tmp_path)
    spec = {"address": "172.17.0.1", "local_port": 40913}
    state = {"pid": os.getpid(), "state": "forwarding", "spec": spec}
    (h.session.render_dir / "forwarder.json").write_text(json.dumps(state))
    cfg = config()
    placement = h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    assert str(placement.link) == "tcp:host.docker.internal:40913"
    assert h.backend.plans["shop-dev"].address == "172.17.0.1"
    assert not (h.session.render_dir / "kubernetes.json").exists()  # place writes nothing
