"""Cluster access: the kube config as kubectl reads it, and the API server's errors translated."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from composemirror.backends.kubernetes import client
from composemirror.backends.kubernetes.access import Permission
from composemirror.errors import ClusterError


def kubeconfig(
    path: Path, contexts: dict[str, str | None], current: str, server: str = "https://127.0.0.1:1"
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": current,
                "clusters": [
                    {"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [
                    {
                        "name": name,
                        "context": {
                            "cluster": "c",
                            "user": "u",
                            **({"namespace": ns} if ns else {}),
                        },
                    }
                    for name, ns in contexts.items()
                ],
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("context", "namespace", "expected"),
    [
        (None, None, ("dev", "shop")),  # current context, its namespace
        ("prod", None, ("prod", "default")),  # a context with no namespace: default
        ("prod", "billing", ("prod", "billing")),  # the explicit namespace wins
        ("other", None, ("other", "ops")),  # from the second file of the KUBECONFIG list
    ],
)
def test_connect_like_kubectl(
    tmp_path: Path, context: str | None, namespace: str | None, expected: tuple[str, str]
) -> None:
    first = kubeconfig(tmp_path / "a", {"dev": "shop", "prod": None}, "dev")
    second = kubeconfig(tmp_path / "b", {"other": "ops"}, "other")
    cluster = client.connect(context, namespace, {"KUBECONFIG": f"{first}{os.pathsep}{second}"})
    assert (cluster.context, cluster.namespace) == expected
    assert cluster.server == "https://127.0.0.1:1"


def test_unknown_context(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "a", {"dev": "shop"}, "dev")
    with pytest.raises(ClusterError, match="has no context 'staging'") as failure:
        client.connect("staging", None, {"KUBECONFIG": str(path)})
    assert failure.value.exit_code == 2  # bad input
    assert str(failure.value.hint).startswith("its contexts: dev (")


def test_missing_kube_config(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="cannot use the kube config") as failure:
        client.connect(None, None, {"KUBECONFIG": str(tmp_path / "none")})
    assert "kubectl config view" in str(failure.value.hint)


def test_unreachable_names_the_server(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "a", {"dev": "shop"}, "dev", server="https://127.0.0.1:9")
    cluster = client.connect(None, None, {"KUBECONFIG": str(path)})
    with pytest.raises(ClusterError) as failure:
        cluster.get("pods", "x", "shop")
    assert "cannot reach the Kubernetes API server at https://127.0.0.1:9" in str(failure.value)
    assert isinstance(failure.value.__cause__, urllib3.exceptions.HTTPError | OSError)


def test_retries_are_not_logged_before_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong API port: the error names the server; urllib3's retries print nothing."""
    path = kubeconfig(tmp_path / "a", {"dev": "shop"}, "dev", server="https://127.0.0.1:9")
    cluster = client.connect(None, None, {"KUBECONFIG": str(path)})
    with caplog.at_level(logging.DEBUG, logger="composemirror"), pytest.raises(ClusterError):
        cluster.get("pods", "x", "shop")
    assert [r for r in caplog.records if r.name.startswith("urllib3")] == []


def test_a_request_is_not_retried(tmp_path: Path) -> None:
    """The connection pool is made with no retries, so an unreachable server fails at once
    (setting it on the configuration after the client is made would change nothing)."""
    path = kubeconfig(tmp_path / "a", {"dev": "shop"}, "dev", server="https://127.0.0.1:9")
    cluster = client.connect(None, None, {"KUBECONFIG": str(path)})
    pool = cluster.api.rest_client.pool_manager
    retries = pool.connection_pool_kw.get("retries")  # urllib3 may keep it as a Retry
    assert getattr(retries, "total", retries) == 0


def status(code: int, message: str, **details: object) -> ApiException:
    error = ApiException(status=code, reason="x")
    error.body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "code": code,
            "details": details,
        }
    )
    return error


PATCH = Permission("patch", "pods", "ephemeralcontainers")


@pytest.mark.parametrize(
    ("error", "cls", "message", "hint"),
    [
        (
            status(401, "Unauthorized"),
            ClusterError,
            "does not accept the credentials of context dev",
            "log in again",
        ),
        (
            status(
                403,
                'pods "web-1" is forbidden: User "dev" cannot patch resource "pods/'
                'ephemeralcontainers" in API group "" in the namespace "shop"',
            ),
            client.RefusedError,
            "forbidden: cannot patch pods/web-1 (ephemeralcontainers) in namespace shop",
            "resources: [pods/ephemeralcontainers]",
        ),
        (
            status(
                403,
                'pods "web-1" is forbidden: violates PodSecurity "restricted:latest": '
                "runAsNonRoot != true",
            ),
            client.RefusedError,
            "the cluster refused to patch pods/web-1 (ephemeralcontainers) in namespace shop: pods "
            '"web-1" is forbidden: violates PodSecurity',
            "admission policy",
        ),
        (
            status(404, 'pods "web-1" not found'),
            client.NotFoundError,
            "pods/web-1 (ephemeralcontainers) not found in namespace shop",
            "kubectl get pods -n shop",
        ),
        (status(409, "already exists"), client.ConflictError, "already exists", None),
        (
            status(
                422,
                "Pod is invalid",
                causes=[
                    {"field": "spec.ephemeralContainers[0].name", "message": "Duplicate value"}
                ],
            ),
            client.RefusedError,
            "as invalid: spec.ephemeralContainers[0].name: Duplicate value",
            "please report",
        ),
        (
            status(500, "etcdserver: request timed out"),
            ClusterError,
            "failed to patch pods/web-1 (ephemeralcontainers) in namespace shop: 500 etcdserver",
            "readyz",
        ),
    ],
)
def test_translate(
    error: ApiException, cls: type[ClusterError], message: str, hint: str | None
) -> None:
    translated = client.translate(
        error, PATCH, "shop", "web-1", context="dev", server="https://k:6443"
    )
    assert type(translated) is cls
    assert message in translated.message
    if hint:
        assert hint in str(translated.hint)


def test_exec_credential_plugin_runs_on_this_host(tmp_path: Path) -> None:
    """EKS/GKE-style `exec` users: the plugin runs here and its token is what the client sends;
    nothing of it is written into the session's objects."""
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(
        "#!/bin/sh\ncat <<'EOF'\n"
        + json.dumps(
            {
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": {"token": "from-the-plugin"},
            }
        )
        + "\nEOF\n"
    )
    plugin.chmod(0o755)
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "eks",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:9",
                            "insecure-skip-tls-verify": True,
                        },
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1",
                                "command": str(plugin),
                                "interactiveMode": "Never",
                            }
                        },
                    }
                ],
                "contexts": [{"name": "eks", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    cluster = client.connect(None, None, {"KUBECONFIG": str(path)})
    assert cluster.api.configuration.api_key["BearerToken"] == "Bearer from-the-plugin"
    assert cluster.namespace == "default"


def test_a_kube_config_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text("hello\n")
    with pytest.raises(ClusterError, match="is not a kube config"):
        client.connect(None, None, {"KUBECONFIG": str(path)})


def test_a_tls_failure_is_a_certificate_problem_naming_the_ca(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "dev",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:9",
                            "certificate-authority": "/ca",
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    assert client.certificate_authority(str(path), "c") == (
        f"certificate-authority /ca (cluster 'c' in {path})"
    )
    cluster = client.Cluster(
        type("Api", (), {"configuration": type("Conf", (), {"host": "https://k:6443"})})(),
        context="dev",
        namespace="shop",
        trust=client.certificate_authority(str(path), "c"),
    )
    verify = urllib3.exceptions.SSLError("certificate verify failed: unable to get local issuer")
    with pytest.raises(ClusterError) as failure, cluster._errors(Permission("get", "pods"), "shop"):
        raise urllib3.exceptions.MaxRetryError(None, "/api", reason=verify)  # type: ignore[arg-type]
    assert failure.value.message.startswith("TLS with the Kubernetes API server at https://k:6443")
    assert "certificate verify failed" in failure.value.message
    assert "cannot reach" not in failure.value.message
    assert f"certificate-authority /ca (cluster 'c' in {path})" in str(failure.value.hint)
