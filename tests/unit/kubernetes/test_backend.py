"""The backend's sequence over a fake cluster: resolve, place, prepare, teardown, doctor."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from composemirror.backends import Check, Resolution, Resolver, SessionInfo
from composemirror.backends.kubernetes import manifests, state
from composemirror.backends.kubernetes.backend import KubernetesBackend
from composemirror.backends.kubernetes.client import NotFoundError, RefusedError
from composemirror.backends.kubernetes.link import ForwardTarget
from composemirror.config import AgentSettings, Config, EnvSettings, Target
from composemirror.errors import ClusterError
from composemirror.podagent import EnvReport, ready_line, seal
from tests.unit.kubernetes.fake import FakeCluster
from tests.unit.kubernetes.fake import load as fake_load

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
            state_root=tmp_path / "state",
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
            directory=tmp_path / "state" / "shop-dev",
            project="shop-dev",
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
    assert "cannot get the agent's image registry.invalid/python:3.12" in failure.value.message
    assert "scripts/cluster load registry.invalid/python:3.12" in str(failure.value.hint)
    assert "kind load docker-image registry.invalid/python:3.12" in str(failure.value.hint)
    assert h.sleeps == []
    assert ("secrets", name) in h.cluster.deleted  # a failed `up` leaves no Secret


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
    assert "cannot be removed" in h.messages[-1]
    assert h.backend.teardown("shop-dev", h.session.directory, h.messages.append) == []
    assert "checkout-secrets" in {s["metadata"]["name"] for s in h.cluster.objects["secrets"]}


def test_doctor_all_good(tmp_path: Path) -> None:
    checks = Harness(tmp_path).backend.doctor(config())
    assert [(c.name, c.ok) for c in checks] == [
        ("kubernetes API", True),
        ("permissions", True),
        ("kubectl (port-forward)", True),
        ("target", True),
        ("agent placement (dry run)", True),
        ("agent image (cluster)", True),
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
    folder = h.backend.session_dir("shop-dev")
    folder.mkdir(parents=True)
    (folder / "forwarder.json").write_text(json.dumps(state))
    cfg = config()
    placement = h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    assert str(placement.link) == "tcp:host.docker.internal:40913"
    assert h.backend.plans["shop-dev"].address == "172.17.0.1"
    assert sorted(p.name for p in folder.iterdir()) == ["forwarder.json"]  # place writes nothing


def forwarding(h: Harness, project: str = "shop-dev") -> None:
    """Record a live forwarder for the session `prepare` started, as the real one does."""
    [target] = h.forwarded[-1:]
    spec = {"address": target.address, "local_port": target.local_port, "pod": target.pod}
    state = {"pid": os.getpid(), "state": "forwarding", "spec": spec, "forwards": "x"}
    (h.backend.session_dir(project) / "forwarder.json").write_text(json.dumps(state))


def up(h: Harness, cfg: Config | None = None) -> str:
    """One `up` (a fresh backend, as each command has): resolve, place, prepare; the agent's
    name."""
    cfg = cfg or config()
    h.backend = KubernetesBackend(
        connect=h.backend.connect,
        forward=h.forwarded.append,
        sleep=h.sleeps.append,
        state_root=h.backend.state_root,
        kubeconfig=h.backend.kubeconfig,
    )
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    if not h.cluster.logs.get((POD, name)):
        h.agent_runs(POD, name)
    h.backend.prepare(h.session, h.messages.append)
    return name


def test_a_repeated_up_keeps_the_healthy_session(tmp_path: Path) -> None:
    """As compose keeps unchanged containers: no second Secret, agent or forwarder."""
    h = Harness(tmp_path)
    first = up(h)
    forwarding(h)
    h.cluster.created.clear()
    h.cluster.patched.clear()
    h.forwarded.clear()
    h.backend = KubernetesBackend(connect=h.backend.connect, state_root=tmp_path / "state")
    cfg = config()
    placement = h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    h.backend.prepare(h.session, h.messages.append)
    assert (h.cluster.created, h.cluster.patched, h.forwarded) == ([], [], [])
    assert any(f"reusing the running session: agent {first}" in m for m in h.messages)
    assert h.backend.session_env("shop-dev") == {"DATABASE_URL": "from-process"}
    assert str(placement.link).endswith(f":{h.backend.plans['shop-dev'].local_port}")
    # and a failure of that command afterwards leaves the session it did not create alone
    h.backend.release("shop-dev", tmp_path)
    assert h.cluster.deleted == []
    assert (h.backend.session_dir("shop-dev") / "forwarder.json").exists()


def test_a_long_running_session_is_kept_too(tmp_path: Path) -> None:
    """The agent logged a line per link since its ready line: it is still found."""
    h = Harness(tmp_path)
    first = up(h)
    forwarding(h)
    h.cluster.logs[(POD, first)] += "agent INFO link closed\n" * 500
    h.cluster.created.clear()
    h.backend = KubernetesBackend(connect=h.backend.connect, state_root=tmp_path / "state")
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    h.backend.prepare(h.session, h.messages.append)
    assert h.cluster.created == []
    assert any(f"reusing the running session: agent {first}" in m for m in h.messages)


def test_a_session_whose_agent_is_gone_is_not_reused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    first = up(h)
    forwarding(h)
    for item in h.cluster.objects["pods"]:  # the agent exited (its ttl, no link)
        if item["metadata"]["name"] == POD:
            item["status"]["ephemeralContainerStatuses"] = [
                {"name": first, "state": {"terminated": {"reason": "Completed"}}}
            ]
    h.cluster.logs[(POD, first)] = "agent INFO idle, exiting\n"
    h.cluster.created.clear()
    second = up(h)
    assert second != first
    assert [(r, b["metadata"]["name"]) for r, b, _ in h.cluster.created] == [("secrets", second)]
    assert h.cluster.deleted == [("secrets", first)]  # the earlier session's, at once
    assert any(f"replacing the project's earlier session (agent {first})" in m for m in h.messages)


def test_a_session_whose_record_was_deleted_leaves_no_secret_or_job(tmp_path: Path) -> None:
    """`rm -rf` of the project's state folder, then `up -d`: the earlier session's Job and
    Secret (found by the project's label in the agent's namespace) go as the new one is made;
    another project's and another namespace's stay."""
    h = Harness(tmp_path)
    cfg = config(ephemeral=False)
    first = job_agent(h, cfg)
    labels = {manifests.LABEL_PROJECT: "other-dev"}
    h.cluster.objects["secrets"].append(
        {"kind": "Secret", "metadata": {"name": "theirs", "namespace": "shop", "labels": labels}}
    )
    leftovers(h.cluster, "shop-dev")  # cm-agent-a in shop; cm-agent-b in elsewhere
    shutil.rmtree(h.backend.session_dir("shop-dev"))
    h.messages.clear()
    second = job_agent(h, cfg)
    assert second != first
    names = {
        (r, i["metadata"]["namespace"], i["metadata"]["name"])
        for r in ("jobs", "secrets")
        for i in h.cluster.objects.get(r, [])
    }
    assert ("secrets", "shop", first) not in names and ("jobs", "shop", first) not in names
    assert ("secrets", "shop", "cm-agent-a") not in names
    assert {("secrets", "shop", second), ("jobs", "shop", second)} <= names
    assert {("secrets", "shop", "theirs"), ("secrets", "elsewhere", "cm-agent-b")} <= names
    assert any(f"job/{first}" in m and f"secret/{first}" in m for m in h.messages)


def test_a_cluster_that_refuses_the_sweep_still_gets_its_session(tmp_path: Path) -> None:
    """No list permission for the sweep: a warning that `down` deletes them, and `up` goes on."""
    h = Harness(tmp_path)
    first = up(h)

    def refuse(resource: str, namespace: str, selector: str) -> list[str]:
        raise ClusterError("forbidden: cannot list secrets")

    h.cluster.delete_labelled = refuse  # type: ignore[method-assign]
    shutil.rmtree(h.backend.session_dir("shop-dev"))
    second = up(h)
    assert second != first
    assert any("could not delete the project's earlier" in m for m in h.messages)


def test_a_failed_up_deletes_the_secret_it_created(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config(image="registry.invalid/python:3.12", startup_timeout=3)
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    with pytest.raises(ClusterError, match="did not become ready"):
        h.backend.prepare(h.session, h.messages.append)
    name = h.backend.plans["shop-dev"].where.name
    assert ("secrets", name) in h.cluster.deleted
    assert name not in {s["metadata"]["name"] for s in h.cluster.objects["secrets"]}


def test_a_failed_job_agent_leaves_no_job_or_secret(tmp_path: Path) -> None:
    cluster = FakeCluster(refuse_ephemeral=RefusedError("forbidden"))
    h = Harness(tmp_path, cluster)
    cfg = config(startup_timeout=2)
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    with pytest.raises(ClusterError):
        h.backend.prepare(h.session, h.messages.append)
    name = h.backend.plans["shop-dev"].where.name
    assert sorted(cluster.deleted) == [("jobs", name), ("secrets", name)]


def test_an_interrupted_prepare_deletes_what_it_created(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config()
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C while waiting for the agent

    h.backend.sleep = interrupt
    with pytest.raises(KeyboardInterrupt):
        h.backend.prepare(h.session, h.messages.append)
    name = h.backend.plans["shop-dev"].where.name
    assert h.cluster.deleted == [("secrets", name)]


def test_release_after_an_attached_up_deletes_its_secret(tmp_path: Path) -> None:
    """Ctrl-C on an attached `up`: compose stops the stack; the Secret goes with it."""
    h = Harness(tmp_path)
    name = up(h)
    forwarding(h)
    h.backend.release("shop-dev", tmp_path)
    assert h.cluster.deleted == [("secrets", name)]
    assert not (h.backend.session_dir("shop-dev") / "forwarder.json").exists()


def test_down_needs_nothing_of_the_render_dir(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    name = up(h)
    for path in h.session.render_dir.iterdir():
        path.unlink()
    h.session.render_dir.rmdir()
    backend = KubernetesBackend(connect=h.backend.connect, state_root=tmp_path / "state")
    removed = backend.teardown("shop-dev", tmp_path, h.messages.append, config=config())
    assert removed == [f"secret/{name} in namespace shop"]
    assert not backend.session_dir("shop-dev").exists()


def test_down_uses_the_context_given_else_the_recorded_one(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    asked: list[str | None] = []

    def connect(context: str | None, namespace: str | None) -> FakeCluster:
        asked.append(context)
        return h.cluster

    h.backend.connect = connect
    up(h)
    recorded = KubernetesBackend(connect=connect, state_root=tmp_path / "state")
    asked.clear()
    messages: list[str] = []
    recorded.teardown("shop-dev", tmp_path, messages.append, config=config())
    assert asked == ["dev"]  # the recorded one, not the configuration's (None: current)
    assert "cleaning up in context dev (the one `up` used)" in messages
    up(h)
    explicit = KubernetesBackend(connect=connect, state_root=tmp_path / "state")
    asked.clear()
    messages.clear()
    explicit.teardown("shop-dev", tmp_path, messages.append, config=config(), context="other")
    assert asked == ["other"]
    assert "cleaning up in context dev (from --context)" in messages  # the fake answers as dev


def test_down_reports_each_deletion_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    name = up(h)
    messages: list[str] = []
    removed = h.backend.teardown("shop-dev", tmp_path, messages.append, config=config())
    assert removed == [f"secret/{name} in namespace shop"]
    assert not any(name in m for m in messages)  # the CLI prints what `removed` holds


def test_status_finds_the_agent_where_up_placed_it(tmp_path: Path) -> None:
    """`up -n shop` then `status` with no -n (the configuration names another namespace)."""
    h = Harness(tmp_path)
    name = up(h)
    elsewhere = dataclasses.replace(config(), namespace="staging")
    checks = h.backend.inspect(elsewhere, "shop-dev", tmp_path)
    assert [c.name for c in checks] == ["forwarder", f"agent {name}", "note"]


def test_status_fails_loudly_when_the_agents_pod_is_gone(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    up(h)
    h.cluster.objects["pods"] = [
        p for p in h.cluster.objects["pods"] if p["metadata"]["name"] != POD
    ]
    checks = h.backend.inspect(config(), "shop-dev", tmp_path)
    gone = next(c for c in checks if c.name == "agent pod")
    assert not gone.ok
    assert f"pod {POD} in namespace shop" in gone.detail and "is gone" in gone.detail
    assert gone.hint is not None and "composemirror up" in gone.hint


NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "cm-node"},
    "status": {
        "images": [
            {"names": ["docker.io/library/python:3.12-slim"], "sizeBytes": 1},
            {"names": ["docker.io/composemirror/base:bookworm"], "sizeBytes": 1},
        ]
    },
}


@pytest.mark.parametrize(
    ("image", "policy", "ok", "fragment"),
    [
        ("python:3.12-slim", "Never", True, "is on node cm-node"),
        ("composemirror/base:bookworm", "IfNotPresent", True, "is on node cm-node"),
        (
            "python:3.13",
            "IfNotPresent",
            True,
            "not listed on node cm-node; the node will try to pull it (IfNotPresent) when `up` "
            "starts the agent (whether it can is known only then)",
        ),
        ("python:3.13", "Never", True, "Never `up` fails at once if the node lacks it"),
        ("registry.local/shop/checkout:1.4", "Never", True, "on node cm-node (the target runs"),
    ],
)
def test_doctor_checks_the_agents_image_on_the_targets_node(
    tmp_path: Path, image: str, policy: str, ok: bool, fragment: str
) -> None:
    h = Harness(tmp_path, FakeCluster([*fake_load(), NODE]))
    checks = h.backend.doctor(config(image=image, image_pull_policy=policy))
    check = next(c for c in checks if c.name == "agent image (cluster)")
    assert check.ok is ok and fragment in check.detail


def test_doctor_fails_the_image_an_earlier_agent_could_not_get(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    name = "composemirror-other-abcde"
    for item in h.cluster.objects["pods"]:
        if item["metadata"]["name"] == POD:
            item["spec"]["ephemeralContainers"] = [{"name": name, "image": "python:3.12-slim"}]
            item["status"]["ephemeralContainerStatuses"] = [
                {"name": name, "state": {"waiting": {"reason": "ErrImagePull", "message": "no"}}}
            ]
    check = next(c for c in h.backend.doctor(config()) if c.name == "agent image (cluster)")
    assert not check.ok
    assert "could not get python:3.12-slim: ErrImagePull" in check.detail
    assert check.hint is not None and "kind load docker-image python:3.12-slim" in check.hint


def test_a_missing_namespace_is_bad_input(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = dataclasses.replace(config(), namespace="nowhere")
    with pytest.raises(ClusterError, match="namespace 'nowhere' does not exist") as failed:
        h.backend.resolve(cfg)
    assert failed.value.exit_code == 2
    h.cluster.denied = frozenset({"get namespaces"})  # cannot tell: the workload is named
    with pytest.raises(ClusterError, match="there is no deployment 'checkout'") as unsure:
        h.backend.resolve(cfg)
    assert unsure.value.exit_code == 1


def test_up_records_the_kube_config_files_it_read(tmp_path: Path) -> None:
    """`down` in a terminal without KUBECONFIG reads the files `up` read (absolute paths, the
    missing ones left out, KUBECONFIG's order)."""
    h = Harness(tmp_path)
    first, second = tmp_path / "a.kubeconfig", tmp_path / "b.kubeconfig"
    first.write_text("apiVersion: v1\n")
    second.write_text("apiVersion: v1\n")
    h.backend.kubeconfig = os.pathsep.join([str(second), str(tmp_path / "gone"), str(first)])
    up(h)
    record = state.read_record(h.backend.session_dir("shop-dev"))
    assert record.kubeconfig == [str(second), str(first)]


def job_agent(h: Harness, cfg: Config) -> str:
    """Place and prepare `cfg` with its agent as a Job whose pod reports ready (with the empty
    report a Job agent gives); the agent's name."""
    h.backend.place(cfg, h.backend.resolve(cfg), h.session)
    name = h.backend.plans["shop-dev"].where.name
    h.cluster.objects["pods"].append(
        {
            "metadata": {"name": f"{name}-x", "namespace": "shop", "labels": {"job-name": name}},
            "spec": {"containers": []},
            "status": {},
        }
    )
    h.agent_runs(f"{name}-x", name, source="none", container_list="containerStatuses")
    report = EnvReport(source="none", env={})
    h.cluster.logs[(f"{name}-x", name)] = (
        ready_line(version="0.1.0", port=47017, sealed=seal(KEY, report)) + "\n"
    )
    h.backend.prepare(h.session, h.messages.append)
    return name


def test_a_job_agent_keeps_the_env_from_the_api_warns_and_is_listed(tmp_path: Path) -> None:
    """`agent.ephemeral: false`: the Job's empty report does not replace the target's env
    computed from the API, the pod-identity warning is printed, and `status` lists the Job."""
    h = Harness(tmp_path)
    cfg = config(ephemeral=False)
    assert h.backend.resolve(cfg).env["DB_PASSWORD"] == "s3cret"
    name = job_agent(h, cfg)
    assert [r for r, _, _ in h.cluster.created] == ["secrets", "jobs"]
    assert h.backend.session_env("shop-dev") is None  # so `up` keeps Resolution.env
    assert any(manifests.JOB_WARNING in m for m in h.messages)
    assert f"(environment from the API: pod spec of {POD})" in h.messages[-2]
    checks = h.backend.inspect(cfg, "shop-dev", tmp_path)
    agent = next(c for c in checks if c.name == f"agent {name}")
    assert agent.ok and agent.detail == f"Job {name} in namespace shop, pod {name}-x: running"


def test_a_targetless_job_agent_imports_nothing_and_is_listed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    cfg = config("targetless")
    name = job_agent(h, cfg)
    assert h.backend.session_env("shop-dev") is None
    assert "(targetless: no environment imported)" in h.messages[-2]
    assert not any(manifests.JOB_WARNING in m for m in h.messages)
    checks = h.backend.inspect(cfg, "shop-dev", tmp_path)
    assert [c.name for c in checks] == ["forwarder", f"agent {name}"]


def leftovers(cluster: FakeCluster, project: str) -> None:
    """`project`'s Secrets in namespaces shop and elsewhere, and a Job in elsewhere."""
    labels = {manifests.LABEL_PROJECT: project}
    for kind, name, namespace in (
        ("Secret", "cm-agent-a", "shop"),
        ("Secret", "cm-agent-b", "elsewhere"),
        ("Job", "cm-agent-b", "elsewhere"),
    ):
        cluster.objects.setdefault(kind.lower() + "s", []).append(
            {"kind": kind, "metadata": {"name": name, "namespace": namespace, "labels": labels}}
        )


def test_down_with_nothing_recorded_cleans_every_namespace_it_may_list(tmp_path: Path) -> None:
    """`down -p NAME` with the project's files and its session folder deleted: its objects are
    found by label in every namespace when the account may list them cluster-wide."""
    h = Harness(tmp_path)
    leftovers(h.cluster, "gone")
    removed = h.backend.teardown("gone", tmp_path, h.messages.append)
    assert sorted(removed) == [
        "job/cm-agent-b in namespace elsewhere",
        "secret/cm-agent-a in namespace shop",
        "secret/cm-agent-b in namespace elsewhere",
    ]
    assert "in every namespace of context dev" in h.messages[0]


def test_down_with_nothing_recorded_says_what_may_remain(tmp_path: Path) -> None:
    """Without cluster-wide `list secrets`: the context's namespace is cleaned, and `down` says
    others may remain, with the kubectl command that finds them."""
    h = Harness(tmp_path, FakeCluster(denied=frozenset({"list secrets"})))
    leftovers(h.cluster, "gone")
    removed = h.backend.teardown("gone", tmp_path, h.messages.append)
    assert removed == ["secret/cm-agent-a in namespace shop"]
    [warning] = h.messages
    assert "only namespace shop of context dev was cleaned; others may remain" in warning
    selector = manifests.project_selector("gone")
    assert f"`kubectl get jobs,secrets --all-namespaces -l {selector}` finds them" in warning


def test_down_with_nothing_recorded_and_no_cluster_says_so(tmp_path: Path) -> None:
    def unreachable(context: str | None, namespace: str | None) -> FakeCluster:
        raise ClusterError("cannot reach the Kubernetes API server at https://127.0.0.1:9")

    backend = KubernetesBackend(connect=unreachable, state_root=tmp_path / "state")
    messages: list[str] = []
    assert backend.teardown("gone", tmp_path, messages.append) == []
    [warning] = messages
    assert "cannot reach the Kubernetes API server" in warning
    assert "its Jobs and Secrets may remain" in warning


def test_status_fails_a_released_forwarder_while_the_sidecars_run(tmp_path: Path) -> None:
    """A failed `up -d` released the forwarder; the project's containers still run."""
    h = Harness(tmp_path)
    up(h)
    checks = h.backend.inspect(config(), "shop-dev", tmp_path, sidecars=["web-mirror"])
    found = next(c for c in checks if c.name == "forwarder")
    assert not found.ok and "sidecars web-mirror run and dial it" in found.detail
    assert found.hint is not None and "`composemirror up -d`" in found.hint
    idle = h.backend.inspect(config(), "shop-dev", tmp_path)
    assert next(c for c in idle if c.name == "forwarder").ok
