"""Backends on a fake engine: which one a target gets, how each resolves and places its target,
what `prepare` starts, and the errors a user sees when the target is not there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from composemirror import backends
from composemirror.backends import (
    CLUSTER_ENV,
    Backend,
    ContainerPlacement,
    Resolution,
    Resolver,
    SessionInfo,
    choose,
)
from composemirror.backends.docker import DockerBackend
from composemirror.backends.kubernetes import KubernetesBackend, state
from composemirror.backends.sandbox import COMPOSE_FILE, PROJECT, SandboxBackend
from composemirror.config import Config, load
from composemirror.errors import ClusterError, ConfigError
from composemirror.fakes import FakeBackend, FakeEngine

SANDBOX_MODEL: dict[str, Any] = {
    "name": PROJECT,
    "services": {
        "kube-dns": {"image": "composemirror/sandbox:0.1"},
        "checkout": {
            "image": "composemirror/sandbox:0.1",
            "container_name": "composemirror-sandbox-checkout",
            "dns": ["10.96.0.10"],
            "dns_search": ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            "dns_opt": ["ndots:5", "timeout:1"],
            "environment": {
                "DATABASE_URL": "postgresql://shop:pa$$word@postgres/shop",
                "UNSET_IN_SHELL": None,
            },
            "labels": {
                "io.composemirror.sandbox.workload": "deployment/checkout",
                "io.composemirror.sandbox.namespace": "shop",
            },
        },
        "orders": {
            "image": "composemirror/sandbox:0.1",
            "labels": {"io.composemirror.sandbox.workload": "deployment/orders"},
        },
    },
}


def config(target: str, **block: Any) -> Config:
    return load(
        {"target": target, "services": ["web"], **block},
        source="compose.yaml",
        base_dir=Path("/project"),
    )


def session(resolution: Resolution, cfg: Config) -> SessionInfo:
    return SessionInfo(
        project="proj",
        directory=Path("/project"),
        config=cfg,
        resolution=resolution,
        base_image="debian:bookworm-slim",
    )


def sandbox_engine(*, up: bool = False) -> FakeEngine:
    engine = FakeEngine(models={COMPOSE_FILE: SANDBOX_MODEL})
    if up:
        for service in SANDBOX_MODEL["services"]:
            engine.add_container(
                f"{PROJECT}-{service}-1",
                labels={
                    "com.docker.compose.project": PROJECT,
                    "com.docker.compose.service": service,
                },
            )
    return engine


# -- choose ----------------------------------------------------------------------------------


def no_kube(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"KUBECONFIG": "", "HOME": str(tmp_path), **extra}


def test_a_docker_target_gets_the_docker_backend(tmp_path: Path) -> None:
    chosen = choose(config("docker://shop-checkout"), no_kube(tmp_path), FakeEngine())
    assert isinstance(chosen, DockerBackend) and chosen.name == "docker"


def test_without_a_kube_config_the_sandbox_is_chosen(tmp_path: Path) -> None:
    chosen = choose(config("deployment/checkout"), no_kube(tmp_path), FakeEngine())
    assert isinstance(chosen, SandboxBackend) and chosen.name == "sandbox"


def test_a_kubeconfig_naming_no_file_is_an_error_not_the_sandbox(tmp_path: Path) -> None:
    environ = {"KUBECONFIG": str(tmp_path / "typo.yaml"), "HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="KUBECONFIG names no file that exists"):
        choose(config("deployment/checkout"), environ, FakeEngine())
    sandbox = {**environ, CLUSTER_ENV: "sandbox"}
    assert isinstance(choose(config("deployment/checkout"), sandbox, FakeEngine()), SandboxBackend)


def test_forcing_the_sandbox_wins_over_a_kube_config(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    environ = {"KUBECONFIG": str(kubeconfig), CLUSTER_ENV: "sandbox"}
    assert isinstance(choose(config("deployment/checkout"), environ, FakeEngine()), SandboxBackend)


@pytest.mark.parametrize("forced", ["auto", "kubernetes"])
def test_a_kube_config_chooses_the_kubernetes_backend(tmp_path: Path, forced: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    environ = {"KUBECONFIG": f"{tmp_path / 'other'}:{kubeconfig}", CLUSTER_ENV: forced}
    chosen = choose(config("deployment/checkout"), environ, FakeEngine())
    assert isinstance(chosen, KubernetesBackend)
    assert chosen.gateway() == "172.17.0.1"  # the forwarder listens on the engine's gateway


def test_an_unknown_cluster_choice_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(
            config("deployment/checkout"),
            no_kube(tmp_path, **{CLUSTER_ENV: "minikube"}),
            FakeEngine(),
        )
    assert caught.value.message == f"{CLUSTER_ENV}='minikube' is not a choice"


def test_the_home_kube_config_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not backends.kubeconfig_present({})
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\n")
    assert backends.kubeconfig_present({})


def test_every_backend_and_the_fake_follow_the_protocol() -> None:
    engine = FakeEngine()
    implementations: list[Backend] = [DockerBackend(engine), SandboxBackend(engine), FakeBackend()]
    for backend in implementations:
        for method in ("resolve", "place", "prepare", "teardown", "doctor"):
            assert callable(getattr(backend, method)), (backend.name, method)


# -- docker:// --------------------------------------------------------------------------------


def test_a_docker_target_is_resolved_and_placed_in_its_namespace() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout", env={"DATABASE_URL": "postgresql://db/shop"})
    backend = DockerBackend(engine)
    cfg = config("docker://shop-checkout")
    resolution = backend.resolve(cfg)
    assert resolution == Resolution(
        description="container shop-checkout",
        target="shop-checkout",
        env={"DATABASE_URL": "postgresql://db/shop"},
    )
    assert backend.place(cfg, resolution, session(resolution, cfg)) == ContainerPlacement(
        network_mode="container:shop-checkout"
    )
    lines: list[str] = []
    backend.prepare(session(resolution, cfg), lines.append)
    assert lines == [] and engine.runs == []
    assert backend.teardown("proj", Path("/project"), lines.append) == []
    assert backend.doctor(cfg) == []


def test_a_missing_docker_target() -> None:
    with pytest.raises(ClusterError) as caught:
        DockerBackend(FakeEngine()).resolve(config("docker://nope"))
    assert caught.value.message == "target docker://nope: there is no container 'nope'"
    assert caught.value.hint == "start it, or check the name with `docker ps`"


def test_a_stopped_docker_target() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout", state="exited")
    with pytest.raises(ClusterError) as caught:
        DockerBackend(engine).resolve(config("docker://shop-checkout"))
    assert caught.value.message == (
        "target docker://shop-checkout: container 'shop-checkout' is exited"
    )
    assert caught.value.hint == "start it with `docker start shop-checkout`"


def agent_of(engine: FakeEngine, target: str, project: str = "proj") -> None:
    owner = engine.inspect_container(target)
    assert owner is not None
    engine.add_container(
        f"{project}-composemirror-agent-1",
        labels={"io.composemirror.project": project, "io.composemirror.role": "agent"},
        network_mode=f"container:{owner.id}",
    )


def test_an_agent_in_the_targets_namespace_is_inspected_as_such() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout")
    agent_of(engine, "shop-checkout")
    backend = DockerBackend(engine)
    cfg = config("docker://shop-checkout")
    [check] = backend.inspect(cfg, "proj", Path("/project"))
    assert (check.name, check.ok, check.detail) == (
        "agent namespace",
        True,
        "shares shop-checkout's",
    )
    lines: list[str] = []
    backend.prepare(session(backend.resolve(cfg), cfg), lines.append)
    assert lines == [] and engine.removed == []


def test_an_agent_left_behind_by_a_restarted_target_is_reported_and_recreated() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout")
    agent_of(engine, "shop-checkout")
    engine.restart("shop-checkout")
    backend = DockerBackend(engine)
    cfg = config("docker://shop-checkout")
    [check] = backend.inspect(cfg, "proj", Path("/project"))
    assert not check.ok
    assert check.detail.startswith("shop-checkout restarted at ")
    assert "after the agent proj-composemirror-agent-1 joined it" in check.detail
    assert check.hint is not None and "`composemirror up -d` recreates it there" in check.hint
    lines: list[str] = []
    backend.prepare(session(backend.resolve(cfg), cfg), lines.append)
    assert engine.removed == ["container proj-composemirror-agent-1"]
    assert lines[0].endswith(": recreating the agent")


def test_an_agent_of_a_recreated_or_removed_target_is_reported() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout")
    agent_of(engine, "shop-checkout")
    engine.running = [c for c in engine.running if c.name != "shop-checkout"]
    backend = DockerBackend(engine)
    cfg = config("docker://shop-checkout")
    [check] = backend.inspect(cfg, "proj", Path("/project"))
    assert not check.ok and "which no longer exists" in check.detail
    engine.add_container("shop-checkout")  # a new container, a new id
    [check] = backend.inspect(cfg, "proj", Path("/project"))
    assert not check.ok and "joined an earlier shop-checkout" in check.detail


def test_a_stopped_agent_is_reported() -> None:
    engine = FakeEngine()
    engine.add_container("shop-checkout")
    agent_of(engine, "shop-checkout")
    engine.set_state("proj-composemirror-agent-1", "exited")
    [check] = DockerBackend(engine).inspect(config("docker://shop-checkout"), "proj", Path("/p"))
    assert not check.ok and check.detail == "the agent proj-composemirror-agent-1 is exited"


# -- the sandbox ------------------------------------------------------------------------------


def test_a_sandbox_workload_is_resolved_with_its_env_and_resolver() -> None:
    backend = SandboxBackend(sandbox_engine())
    cfg = config("deployment/checkout", namespace="shop")
    resolution = backend.resolve(cfg)
    assert resolution.description == "deployment/checkout in namespace shop (sandbox cluster)"
    assert resolution.target == "composemirror-sandbox-checkout"
    assert resolution.env == {"DATABASE_URL": "postgresql://shop:pa$word@postgres/shop"}
    assert resolution.resolver == Resolver(
        search=("shop.svc.cluster.local", "svc.cluster.local", "cluster.local"),
        ndots=5,
        nameservers=("10.96.0.10",),
    )
    placement = backend.place(cfg, resolution, session(resolution, cfg))
    assert placement == ContainerPlacement(network_mode="container:composemirror-sandbox-checkout")


def test_a_sandbox_workload_in_the_default_namespace() -> None:
    resolution = SandboxBackend(sandbox_engine()).resolve(config("deployment/orders"))
    assert resolution.target == f"{PROJECT}-orders-1"
    assert resolution.resolver is None


def test_the_sandbox_model_is_read_once() -> None:
    engine = sandbox_engine()
    backend = SandboxBackend(engine)
    backend.resolve(config("deployment/orders"))
    backend.resolve(config("deployment/orders"))
    engine.models.clear()
    assert backend.resolve(config("deployment/orders")).target == f"{PROJECT}-orders-1"


def test_a_workload_the_sandbox_does_not_run_lists_those_it_does() -> None:
    with pytest.raises(ClusterError) as caught:
        SandboxBackend(sandbox_engine()).resolve(config("deployment/checkout"))
    assert caught.value.message == (
        "the sandbox cluster has no deployment/checkout in namespace default"
    )
    assert caught.value.hint == (
        "its workloads: deployment/checkout in namespace shop, "
        "deployment/orders in namespace default"
    )


def test_the_sandbox_runs_no_targetless_sessions() -> None:
    with pytest.raises(ClusterError, match="targeted sessions only"):
        SandboxBackend(sandbox_engine()).resolve(config("targetless"))


def test_prepare_starts_the_sandbox_when_it_is_not_up() -> None:
    engine = sandbox_engine()
    backend = SandboxBackend(engine)
    cfg = config("deployment/checkout", namespace="shop")
    resolution = backend.resolve(cfg)
    lines: list[str] = []
    backend.prepare(session(resolution, cfg), lines.append)
    assert lines == ["starting the sandbox cluster"]
    ((project, args),) = engine.runs
    assert args == ["up", "--detach", "--wait", "--build"]
    assert project.name == PROJECT and project.files == (COMPOSE_FILE,)
    assert project.environment == {"COMPOSEMIRROR_BASE_IMAGE": "debian:bookworm-slim"}


def test_prepare_leaves_a_running_sandbox_alone() -> None:
    engine = sandbox_engine(up=True)
    backend = SandboxBackend(engine)
    cfg = config("deployment/checkout", namespace="shop")
    resolution = backend.resolve(cfg)
    backend.prepare(session(resolution, cfg), lambda line: None)
    assert engine.runs == []
    assert backend.doctor(cfg)[0].detail == "running"


def test_an_unhealthy_workload_means_the_sandbox_is_not_up() -> None:
    engine = sandbox_engine(up=True)
    engine.running[0] = replace(engine.running[0], health="starting")
    assert not SandboxBackend(engine).is_up()


def test_a_sandbox_that_does_not_start() -> None:
    engine = sandbox_engine()
    engine.exit_codes["up"] = 1
    with pytest.raises(ClusterError) as caught:
        SandboxBackend(engine).start("debian:bookworm-slim")
    assert caught.value.message == "the sandbox cluster did not start"
    assert caught.value.hint is not None and "composemirror sandbox down" in caught.value.hint


def test_the_sandbox_stays_up_after_a_project_and_goes_on_request() -> None:
    engine = sandbox_engine(up=True)
    backend = SandboxBackend(engine)
    assert backend.teardown("proj", Path("/project"), lambda line: None) == []
    assert engine.running
    backend.remove()
    ((project, volumes),) = engine.downs
    assert project.name == PROJECT and volumes
    assert engine.running == []
    assert backend.doctor(config("deployment/orders"))[0].detail.startswith("not running")


def test_a_docker_targets_resolver_is_its_resolv_conf() -> None:
    """The app gets the target's `search` and `ndots`, read where the target's libc reads them."""
    engine = FakeEngine(
        outputs={
            "shop-checkout": "# Generated by Docker Engine.\nnameserver 127.0.0.11\n"
            "search team.svc.cluster.local.\noptions ndots:5 edns0 trust-ad\n"
        }
    )
    engine.add_container("shop-checkout")
    resolution = DockerBackend(engine).resolve(config("docker://shop-checkout"))
    assert resolution.resolver == Resolver(
        search=("team.svc.cluster.local",), ndots=5, nameservers=("127.0.0.11",)
    )


@pytest.mark.parametrize(
    ("text", "search", "ndots"),
    [
        ("", (), 1),
        ("domain a.test\nsearch b.test c.test\n", ("b.test", "c.test"), 1),
        ("search b.test\ndomain a.test\noptions ndots:20 ; comment\n", ("a.test",), 15),
        ("search .\noptions ndots:0\n", (), 0),
    ],
)
def test_resolv_conf_is_read_as_glibc_reads_it(
    text: str, search: tuple[str, ...], ndots: int
) -> None:
    parsed = Resolver.parse(text)
    assert (parsed.search, parsed.ndots) == (search, ndots)


def test_a_new_terminal_reaches_the_cluster_up_used(tmp_path: Path) -> None:
    """No KUBECONFIG (a new terminal): the kube config files `up` recorded for the project are
    read, so `down` gets the Kubernetes backend on them instead of the sandbox; an explicit
    KUBECONFIG wins."""
    kubeconfig = tmp_path / "cluster.kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    root = tmp_path / "state"
    state.write_record(state.session_dir("shop", root), state.Record(kubeconfig=[str(kubeconfig)]))
    terminal = no_kube(tmp_path, COMPOSEMIRROR_STATE_DIR=str(root))
    environ = backends.session_environ("shop", terminal)
    assert environ["KUBECONFIG"] == str(kubeconfig)
    chosen = choose(config("deployment/checkout"), environ, FakeEngine())
    assert isinstance(chosen, KubernetesBackend) and chosen.kubeconfig == str(kubeconfig)
    assert backends.session_environ("other", terminal) == terminal  # nothing recorded
    explicit = {**terminal, "KUBECONFIG": str(tmp_path / "mine")}
    assert backends.session_environ("shop", explicit) == explicit
