"""Cluster access as kubectl has it; the only module that imports the `kubernetes` package.

`connect()` reads the kube config as kubectl does: `KUBECONFIG` (a list of paths, merged) or
~/.kube/config, the current context or an explicit one, the namespace from the explicit value,
else the context's, else `default`. The python client's loader does client certificates, tokens,
exec credential plugins (EKS, GKE, OIDC) and auth-provider refreshes; everything stays on this
host. Every call returns plain JSON (dicts as the API server sent them), so all decisions above
this module are pure, and every failure becomes a `ClusterError` saying what to do, with the
client's exception kept as the cause (kopf's `_cogs/clients/errors.py`, httpx's
`map_httpcore_exceptions`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml

from composemirror.backends.kubernetes.access import Permission, render_rules
from composemirror.errors import ClusterError

Obj = dict[str, Any]
TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for each request."""


class NotFoundError(ClusterError):
    """The API server answered 404 for the object asked for."""


class RefusedError(ClusterError):
    """The API server refused the request: RBAC (403), admission (403) or validation (422)."""


class ConflictError(ClusterError):
    """The API server answered 409: the object exists already, or changed meanwhile."""


class UnknownContextError(ClusterError):
    """`--context` or `kube_context` names a context the kube config does not have: bad input,
    exit 2."""

    exit_code = 2


class MissingNamespaceError(ClusterError):
    """The namespace the configuration or `-n` names does not exist: bad input, exit 2."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class _Kind:
    api: str
    """The client class: CoreV1Api, AppsV1Api, BatchV1Api."""
    singular: str
    """As in the client's method names: `pod`, `stateful_set`, ..."""
    group: str
    """The API group, for RBAC rules ('' for core)."""


KINDS: dict[str, _Kind] = {
    "pods": _Kind("CoreV1Api", "pod", ""),
    "secrets": _Kind("CoreV1Api", "secret", ""),
    "configmaps": _Kind("CoreV1Api", "config_map", ""),
    "deployments": _Kind("AppsV1Api", "deployment", "apps"),
    "statefulsets": _Kind("AppsV1Api", "stateful_set", "apps"),
    "replicasets": _Kind("AppsV1Api", "replica_set", "apps"),
    "jobs": _Kind("BatchV1Api", "job", "batch"),
    "cronjobs": _Kind("BatchV1Api", "cron_job", "batch"),
}
"""Resource (plural, as in RBAC) -> how the client reaches it."""


@functools.cache
def _kubernetes() -> Any:
    """The `kubernetes` package, imported on first use (it takes most of a second, which
    commands for other backends need not pay). Used untyped: its generated signatures are
    validated at run time, and composemirror passes and receives raw JSON."""
    import kubernetes.client
    import kubernetes.config

    # urllib3 logs each retry of a failed connection as a warning; the ClusterError that
    # follows says what failed, once.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    return kubernetes


def kubeconfig_paths(environ: Mapping[str, str]) -> str:
    """The kube config kubectl would read: `$KUBECONFIG` (paths joined by os.pathsep) or
    ~/.kube/config."""
    return environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")


def connect(
    context: str | None = None,
    namespace: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster:
    """A `Cluster` for `context` (None: the current one). No request is made yet.

    Raises ClusterError when the kube config is missing, unreadable or names no such context.
    """
    paths = kubeconfig_paths(os.environ if environ is None else environ)
    kubeconfig = _kubernetes().config
    try:
        for path in (p for p in paths.split(os.pathsep) if p and Path(p).is_file()):
            document = yaml.safe_load(Path(path).read_text())
            if document is not None and not isinstance(document, dict):
                raise ClusterError(
                    f"{path} is not a kube config: it holds a YAML "
                    f"{type(document).__name__}, not a mapping",
                    hint="point KUBECONFIG at a kube config (`kubectl config view` shows one)",
                )
        contexts, current = kubeconfig.list_kube_config_contexts(config_file=paths)
        # kubectl takes current-context from the first file that sets it; the python client's
        # merger from the last, so it is read here.
        wanted = context or current_context(paths) or (current or {}).get("name")
        chosen = next((c for c in contexts if c["name"] == wanted), None)
        if wanted is None:
            raise ClusterError(
                f"the kube config ({paths}) sets no current context",
                hint="choose one with `kube_context`/--context, or "
                "`kubectl config use-context NAME`",
            )
        if chosen is None:
            names = ", ".join(c["name"] for c in contexts) or "none"
            raise UnknownContextError(
                f"the kube config ({paths}) has no context {context!r}",
                hint=f"its contexts: {names} (`kubectl config get-contexts` lists them); "
                "fix --context or `kube_context`",
            )
        # persist_config: a refreshed auth-provider token is written back, as kubectl does.
        configuration = _kubernetes().client.Configuration()
        kubeconfig.load_kube_config(
            config_file=paths,
            context=chosen["name"],
            client_configuration=configuration,
            persist_config=True,
        )
        # Failing fast; callers retry with a bound where it matters. Set before the client is
        # made: its connection pool reads it once.
        configuration.retries = 0
        api = _kubernetes().client.ApiClient(configuration=configuration)
    except kubeconfig.ConfigException as e:
        raise ClusterError(
            f"cannot use the kube config ({paths}): {e}",
            hint="check it with `kubectl config view`; set KUBECONFIG or "
            "--context to choose another",
        ) from e
    except (OSError, yaml.YAMLError) as e:
        raise ClusterError(
            f"cannot read the kube config ({paths}): {e}",
            hint="set KUBECONFIG to a readable kube config",
        ) from e
    api.user_agent = "composemirror"
    context_namespace = (chosen.get("context") or {}).get("namespace")
    cluster_name = str((chosen.get("context") or {}).get("cluster") or "")
    return Cluster(
        api,
        context=chosen["name"],
        namespace=namespace or context_namespace or "default",
        trust=certificate_authority(paths, cluster_name),
    )


def certificate_authority(paths: str, cluster: str) -> str:
    """Where the kube config's CA for `cluster` comes from, for people: `certificate-authority
    /path` or `certificate-authority-data` of the cluster entry and its file, as kubectl
    takes the first file of `paths` that defines the entry."""
    for path in filter(None, paths.split(os.pathsep)):
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for entry in (data.get("clusters") or []) if isinstance(data, dict) else []:
            if not isinstance(entry, dict) or entry.get("name") != cluster:
                continue
            fields = entry.get("cluster") or {}
            where = f"cluster {cluster!r} in {path}"
            if fields.get("insecure-skip-tls-verify"):
                return f"none (insecure-skip-tls-verify of {where})"
            if fields.get("certificate-authority"):
                return f"certificate-authority {fields['certificate-authority']} ({where})"
            if fields.get("certificate-authority-data"):
                return f"certificate-authority-data of {where}"
            return f"the system's CA certificates ({where} names no certificate-authority)"
    return f"the CA of cluster {cluster!r} in {paths}"


def current_context(paths: str) -> str | None:
    """`current-context` of the first file in `paths` (os.pathsep-separated) that sets it.

    Raises OSError or yaml.YAMLError for a file that cannot be read.
    """
    for path in filter(None, paths.split(os.pathsep)):
        if not Path(path).is_file():
            continue  # kubectl skips missing files of the list
        data = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(data, dict) and data.get("current-context"):
            return str(data["current-context"])
    return None


class Cluster:
    """One cluster and context, reached through the python client. Methods return plain JSON.

    Every method raises ClusterError: NotFoundError for 404, RefusedError for 403 and 422,
    ConflictError for 409.
    """

    def __init__(self, api: Any, *, context: str, namespace: str, trust: str = "") -> None:
        self.api = api
        self.context = context
        self.namespace = namespace
        """The namespace to use when the configuration names none."""
        self.trust = trust
        """Which CA the kube config trusts for this cluster (see `certificate_authority`)."""

    @property
    def server(self) -> str:
        """The API server's URL, e.g. `https://127.0.0.1:6443`."""
        return str(self.api.configuration.host)

    # -- reading ---------------------------------------------------------------------------

    def get(self, resource: str, name: str, namespace: str) -> Obj:
        """One object of `resource` (a KINDS key)."""
        kind = KINDS[resource]
        with self._errors(Permission("get", resource, group=kind.group), namespace, name):
            return self._json(
                self._method(kind, f"read_namespaced_{kind.singular}")(
                    name, namespace, _preload_content=False, _request_timeout=TIMEOUT
                )
            )

    def node(self, name: str) -> Obj:
        """One Node (cluster-scoped; `get nodes` is often not granted)."""
        with self._errors(Permission("get", "nodes"), None, name):
            api = _kubernetes().client.CoreV1Api(self.api)
            return self._json(api.read_node(name, _preload_content=False, _request_timeout=TIMEOUT))

    def namespace_exists(self, name: str) -> bool | None:
        """Whether namespace `name` exists; None when this account may not read it."""
        try:
            with self._errors(Permission("get", "namespaces"), None, name):
                api = _kubernetes().client.CoreV1Api(self.api)
                api.read_namespace(name, _preload_content=False, _request_timeout=TIMEOUT)
        except NotFoundError:
            return False
        except RefusedError:
            return None
        return True

    def find(self, resource: str, namespace: str, selector: str | None = None) -> list[Obj]:
        """The objects of `resource` in `namespace`, optionally by label selector."""
        kind = KINDS[resource]
        with self._errors(Permission("list", resource, group=kind.group), namespace):
            kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": TIMEOUT}
            if selector:
                kwargs["label_selector"] = selector
            items = self._json(
                self._method(kind, f"list_namespaced_{kind.singular}")(namespace, **kwargs)
            )
            return list(items.get("items") or [])

    def find_everywhere(self, resource: str, selector: str) -> list[Obj]:
        """The objects of `resource` matching `selector` in every namespace (needs `list` on
        them cluster-wide)."""
        kind = KINDS[resource]
        with self._errors(Permission("list", resource, group=kind.group), None):
            items = self._json(
                self._method(kind, f"list_{kind.singular}_for_all_namespaces")(
                    label_selector=selector, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
            return list(items.get("items") or [])

    def pod_log(
        self,
        name: str,
        namespace: str,
        container: str,
        *,
        tail: int | None = 50,
        limit_bytes: int | None = None,
    ) -> str:
        """The last `tail` lines of a container's log (ephemeral containers included); with
        `tail=None`, the log from its start, at most `limit_bytes` bytes of it."""
        kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": TIMEOUT}
        if tail is not None:
            kwargs["tail_lines"] = tail
        if limit_bytes is not None:
            kwargs["limit_bytes"] = limit_bytes
        with self._errors(Permission("get", "pods", "log"), namespace, name):
            response = (
                _kubernetes()
                .client.CoreV1Api(self.api)
                .read_namespaced_pod_log(name, namespace, container=container, **kwargs)
            )
            return bytes(response.data).decode(errors="replace")

    def version(self) -> Obj:
        """The API server's /version: `gitVersion`, `major`, `minor`, ..."""
        with self._errors(Permission("get", "version"), None):
            api = _kubernetes().client.VersionApi(self.api)
            return self._json(api.get_code(_preload_content=False, _request_timeout=TIMEOUT))

    # -- writing ---------------------------------------------------------------------------

    def add_ephemeral_container(
        self, pod: str, namespace: str, patch: Mapping[str, Any], *, dry_run: bool = False
    ) -> Obj:
        """Apply a strategic merge patch to the pod's `ephemeralcontainers` subresource."""
        with self._errors(Permission("patch", "pods", "ephemeralcontainers"), namespace, pod):
            kwargs: dict[str, Any] = {
                "_preload_content": False,
                "_request_timeout": TIMEOUT,
                "_content_type": "application/strategic-merge-patch+json",
            }
            if dry_run:
                kwargs["dry_run"] = "All"
            api = _kubernetes().client.CoreV1Api(self.api)
            return self._json(
                api.patch_namespaced_pod_ephemeralcontainers(pod, namespace, patch, **kwargs)
            )

    def create(
        self, resource: str, namespace: str, body: Mapping[str, Any], *, dry_run: bool = False
    ) -> Obj:
        """Create an object (Jobs and Secrets here); with `dry_run`, validate it server-side."""
        kind = KINDS[resource]
        with self._errors(
            Permission("create", resource, group=kind.group),
            namespace,
            str(body.get("metadata", {}).get("name", "")),
        ):
            kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": TIMEOUT}
            if dry_run:
                kwargs["dry_run"] = "All"
            return self._json(
                self._method(kind, f"create_namespaced_{kind.singular}")(namespace, body, **kwargs)
            )

    def delete(self, resource: str, name: str, namespace: str) -> None:
        """Delete one object (a Job with its pods). Raises NotFoundError when it is gone."""
        kind = KINDS[resource]
        with self._errors(Permission("delete", resource, group=kind.group), namespace, name):
            self._method(kind, f"delete_namespaced_{kind.singular}")(
                name,
                namespace,
                propagation_policy="Background",
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )

    def delete_labelled(self, resource: str, namespace: str, selector: str) -> list[str]:
        """Delete the objects of `resource` matching `selector` (a Job's pods with it).

        Returns the names deleted. Listing first keeps the answer exact and needs only the
        `list` and `delete` verbs (not `deletecollection`).
        """
        names = [o["metadata"]["name"] for o in self.find(resource, namespace, selector)]
        deleted = []
        for name in names:
            try:
                self.delete(resource, name, namespace)
            except NotFoundError:
                continue  # gone meanwhile (a TTL, a second `down`)
            deleted.append(name)
        return deleted

    def can(self, permission: Permission, namespace: str) -> tuple[bool, str]:
        """A SelfSubjectAccessReview: (allowed, the authorizer's reason)."""
        attributes: Obj = {
            "verb": permission.verb,
            "resource": permission.resource,
            "group": permission.group,
            "namespace": namespace,
        }
        if permission.subresource:
            attributes["subresource"] = permission.subresource
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        }
        with self._errors(
            Permission("create", "selfsubjectaccessreviews", group="authorization.k8s.io"), None
        ):
            review = self._json(
                _kubernetes()
                .client.AuthorizationV1Api(self.api)
                .create_self_subject_access_review(
                    body, _preload_content=False, _request_timeout=TIMEOUT
                )
            )
        status = review.get("status") or {}
        return bool(status.get("allowed")), str(
            status.get("reason") or status.get("evaluationError") or ""
        )

    # -- plumbing --------------------------------------------------------------------------

    def _method(self, kind: _Kind, name: str) -> Any:
        return getattr(getattr(_kubernetes().client, kind.api)(self.api), name)

    @staticmethod
    def _json(response: Any) -> Obj:
        data = json.loads(bytes(response.data) or b"{}")
        assert isinstance(data, dict)
        return data

    @contextmanager
    def _errors(
        self, permission: Permission, namespace: str | None, name: str = ""
    ) -> Iterator[None]:
        try:
            yield
        except _kubernetes().client.ApiException as e:  # evaluated only when something failed
            raise translate(
                e, permission, namespace, name, context=self.context, server=self.server
            ) from e
        except (urllib3.exceptions.HTTPError, OSError) as e:
            reason = getattr(e, "reason", None)
            if isinstance(e, ssl.SSLError | urllib3.exceptions.SSLError) or isinstance(
                reason, ssl.SSLError | urllib3.exceptions.SSLError
            ):
                raise ClusterError(
                    f"TLS with the Kubernetes API server at {self.server} failed (context "
                    f"{self.context}): {reason or e}",
                    hint=f"a certificate problem, not a network one: the kube config trusts "
                    f"{self.trust or 'its cluster entry CA'} for this server; fix that CA (a "
                    "cluster recreated with new certificates needs its kube config again), "
                    "then `kubectl cluster-info` checks the same",
                ) from e
            raise ClusterError(
                f"cannot reach the Kubernetes API server at {self.server} "
                f"(context {self.context}): {e}",
                hint=f"is the cluster running and reachable from here? "
                f"`kubectl --context {self.context} cluster-info` checks the same",
            ) from e
        except _kubernetes().config.ConfigException as e:  # an exec plugin or refresh failed
            raise ClusterError(
                f"cannot authenticate to {self.server} (context {self.context}): {e}",
                hint="log in again (your cloud CLI's login, `kubectl get pods` should then work)",
            ) from e


def translate(
    error: Any,
    permission: Permission,
    namespace: str | None,
    name: str,
    *,
    context: str,
    server: str,
) -> ClusterError:
    """The ClusterError for an API server's error answer, a kubernetes `ApiException` (its
    `status`, `reason` and `body`, a Status object as JSON). Pure; exposed for tests."""
    status: Obj
    try:
        status = json.loads(error.body or "{}")
    except ValueError:
        status = {}
    message = str(status.get("message") or error.reason or "")
    where = f" in namespace {namespace}" if namespace else ""
    what = f"{permission.resource}/{name}" if name else permission.resource
    if permission.subresource:
        what += f" ({permission.subresource})"
    code = error.status
    if code == 401:
        return ClusterError(
            f"the API server at {server} does not accept the credentials of context {context} "
            "(401 Unauthorized)",
            hint="log in again or refresh the token (e.g. `aws eks update-kubeconfig`, "
            "`gcloud container clusters get-credentials`), or choose another --context",
        )
    if code == 403 and "cannot" in message:
        rule = render_rules([permission], namespace or "NAMESPACE")
        return RefusedError(
            f"forbidden: cannot {permission.verb} {what}{where}: {message}",
            hint=f"ask your cluster admin for this Role rule (see docs/kubernetes.md for "
            f"the whole Role):\n{rule}",
        )
    if code == 403:
        return RefusedError(
            f"the cluster refused to {permission.verb} {what}{where}: {message}",
            hint="an admission policy (PodSecurity, a webhook) refused it; "
            "its message above says which rule",
        )
    if code == 404:
        flag = f" -n {namespace}" if namespace else ""
        return NotFoundError(
            f"{what} not found{where}",
            hint=f"`kubectl get {permission.resource}{flag}` lists what there is",
        )
    if code == 409:
        return ConflictError(f"{what}{where}: {message}")
    if code == 422:
        causes = "; ".join(
            f"{c.get('field', '')}: {c.get('message', '')}"
            for c in (status.get("details") or {}).get("causes") or []
        )
        return RefusedError(
            f"the API server rejected {what}{where} as invalid: {causes or message}",
            hint="this is composemirror's manifest against this cluster's "
            "version; please report it with the message",
        )
    return ClusterError(
        f"the API server at {server} failed to {permission.verb} {what}{where}: {code} {message}",
        hint="try again; `kubectl get --raw /readyz` shows the server's health",
    )
