"""The corpus (tests/corpus/): projects laid out as users lay them out, rendered and diffed.

Each folder is a project: compose files, maybe a `.env`, maybe an `args` file with compose's
flags (`-f`, `-p`, `--profile`), maybe a `refused` file with the message of an expected
refusal. Each renders through `ops.render` with compose's own loading (no engine: `docker compose
config` only), or is refused with exit code 2 and that message. compose accepts every rendered
model, and compose's reading of it differs from compose's reading of the original only as the
README's "What the rewrite changes" says: `assert_documented_difference` diffs the two models,
with no expectation written per case.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemirror import compose, ops
from composemirror.config import BLOCK, Config
from composemirror.engine import Engine
from composemirror.errors import ConfigError
from composemirror.fakes import FakeBackend

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def options_of(flags: list[str]) -> ops.Options:
    """compose's global flags as composemirror's options (the corpus uses -f, -p, --profile)."""
    files: list[Path] = []
    profiles: list[str] = []
    name = None
    pairs = iter(flags)
    for flag in pairs:
        value = next(pairs)
        if flag == "-f":
            files.append(Path(value))
        elif flag == "--profile":
            profiles.append(value)
        elif flag == "-p":
            name = value
        else:
            raise AssertionError(f"corpus args: {flag} is not used by the corpus")
    return ops.Options(files=tuple(files), project_name=name, profiles=tuple(profiles))


def compose_json(args: list[str], cwd: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["docker", "compose", *args, "config", "--format", "json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture
def in_case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in the case's folder, as a user does, with none of this shell's COMPOSE_* set."""
    folder = CORPUS / str(request.param)
    monkeypatch.chdir(folder)
    for key in [k for k in os.environ if k.startswith("COMPOSE_")]:
        monkeypatch.delenv(key)
    return folder


def test_the_corpus_covers_what_users_lay_out() -> None:
    features = {
        "override file": any((CORPUS / c / "compose.override.yaml").exists() for c in CASES),
        ".env": any((CORPUS / c / ".env").exists() for c in CASES),
        "several -f": any("-f" in _args(CORPUS / c) for c in CASES),
        "refusals": any((CORPUS / c / "refused").exists() for c in CASES),
    }
    text = "\n".join(p.read_text() for p in CORPUS.rglob("*.yaml"))
    for key in ("include:", "extends:", "profiles:", "network_mode:", "enable_ipv6:"):
        features[key] = key in text
    features["external_links:"] = "external_links:" in text
    assert all(features.values()), features


def _args(folder: Path) -> list[str]:
    path = folder / "args"
    return shlex.split(path.read_text()) if path.exists() else []


@pytest.mark.parametrize("in_case", CASES, indirect=True, ids=CASES)
def test_corpus_case(in_case: Path, tmp_path: Path) -> None:
    args = _args(in_case)
    runtime = ops.Runtime(
        engine=Engine(),
        choose=FakeBackend().chooser(),
        environ={"COMPOSEMIRROR_BASE_IMAGE": "example/base"},
    )
    refused = in_case / "refused"
    if refused.exists():
        with pytest.raises(ConfigError) as caught:
            ops.render(options_of(args), write=False, runtime=runtime)
        assert caught.value.exit_code == 2
        assert refused.read_text().strip() in caught.value.message + str(caught.value.hint)
        return
    rendered = ops.render(options_of(args), write=False, runtime=runtime)
    original = compose_json(args, in_case)
    assert rendered.name == original["name"]

    # compose accepts the rendered model, and this is how it reads it
    assert rendered.model["secrets"][compose.KEY_SECRET] == {"environment": compose.KEY_ENV}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(rendered.model, sort_keys=False, width=1000))
    flags = ["-f", str(path), "-p", rendered.name]
    checked = subprocess.run(
        ["docker", "compose", *flags, "config", "-q"], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert_documented_difference(original, compose_json(flags, tmp_path), rendered.config)


# -- the diff ------------------------------------------------------------------------------------

IDENTITY = {
    "networks",
    "ports",
    "expose",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
    "links",
    "external_links",
}
"""The keys README says move from a mirrored app to its sidecar (written out, not imported: the
check must not follow the code it checks)."""


def assert_documented_difference(
    original: Mapping[str, Any], result: Mapping[str, Any], config: Config
) -> None:
    """Fail unless `result` is `original` changed only as README's "What the rewrite changes"
    says. Both are compose's own reading (`config --format json`) of a project."""
    mirrored = set(config.services)
    sidecars = {compose.sidecar_name(s): s for s in mirrored}
    name = original["name"]
    added = set(result["services"]) - set(original["services"])
    assert added <= {*sidecars, compose.AGENT_SERVICE}, f"services added: {added}"
    assert set(original["services"]) <= set(result["services"]), "a service went missing"

    for service, before in original["services"].items():
        after = dict(result["services"][service])
        before = dict(before)
        where = f"service {service!r}"
        before.pop("profiles", None)  # the rendered file needs no --profile
        _depends_on(before, after, sidecars, where)
        _redirected(before, after, mirrored)
        if service in mirrored:
            side = compose.sidecar_name(service)
            assert after.pop("network_mode") == f"service:{side}", where
            _moved(before, result["services"][side], name, service)
            for key in IDENTITY:
                before.pop(key, None)
            _labels(before, after, where)
            _environment(before, after, config, where)
        assert before == after, f"{where}: {_diff(before, after)}"

    for side, app in sidecars.items():
        labels = result["services"][side]["labels"]
        assert labels[compose.LABEL_SERVICE] == app and labels[compose.LABEL_ROLE] == "sidecar"

    for key in set(original) | set(result):
        if key in ("services", BLOCK):
            continue
        was, now = original.get(key), result.get(key)
        ours = {"volumes": compose.LINK_VOLUME, "secrets": compose.KEY_SECRET}.get(key)
        if ours and now:
            now = {k: v for k, v in now.items() if k != ours} or None
        assert was == now, f"top-level {key}: {_diff(was, now)}"


def _depends_on(
    before: dict[str, Any], after: dict[str, Any], sidecars: Mapping[str, str], where: str
) -> None:
    """Kept as they were; a sidecar may be added (a mirrored app, and anything that joins or
    links to its namespace, starts after it)."""
    was = dict(before.pop("depends_on", None) or {})
    now = dict(after.pop("depends_on", None) or {})
    for side in sidecars:
        now.pop(side, None)
    assert was == now, f"{where}: depends_on {_diff(was, now)}"


def _redirected(before: dict[str, Any], after: dict[str, Any], mirrored: set[str]) -> None:
    """`network_mode: service:APP` and links to APP point at APP's sidecar instead."""
    mode = str(before.get("network_mode") or "")
    if mode.removeprefix("service:") in mirrored and mode.startswith("service:"):
        before["network_mode"] = compose.sidecar_name(mode.removeprefix("service:"))
        before["network_mode"] = "service:" + before["network_mode"]
    if before.get("links"):
        links = []
        for link in before["links"]:
            target, _, alias = link.partition(":")
            if target in mirrored:
                link = f"{compose.sidecar_name(target)}:{alias or target}"
            links.append(link)
        before["links"] = links


def _moved(before: Mapping[str, Any], sidecar: Mapping[str, Any], project: str, app: str) -> None:
    """The app's network identity is the sidecar's, unchanged, plus aliases for the app's
    service name and container name on each of its networks."""
    for key in IDENTITY - {"networks"}:
        assert sidecar.get(key) == before.get(key), f"sidecar of {app!r}: {key}"
    networks = before.get("networks") or {"default": None}
    assert set(sidecar["networks"]) == set(networks), f"sidecar of {app!r}: networks"
    names = {app, *compose.container_names(project, app, before)}
    for network, settings in networks.items():
        settings = dict(settings or {})
        now = dict(sidecar["networks"][network] or {})
        aliases = set(now.pop("aliases", None) or ())
        assert aliases == {*(settings.pop("aliases", None) or ()), *names}, f"aliases on {network}"
        assert now == settings, f"sidecar of {app!r}: network {network}"


def _labels(before: dict[str, Any], after: dict[str, Any], where: str) -> None:
    was = dict(before.pop("labels", None) or {})
    now = dict(after.pop("labels", None) or {})
    ours = {k: v for k, v in now.items() if k.startswith("io.composemirror.")}
    assert now == {**was, **ours}, f"{where}: labels"
    assert ours[compose.LABEL_ROLE] == "app", where


def _environment(before: dict[str, Any], after: dict[str, Any], config: Config, where: str) -> None:
    """The app's own variables stay unless `override` or `unset` names them; the target's are
    added (the FakeBackend's here)."""
    was = dict(before.pop("environment", None) or {})
    now = dict(after.pop("environment", None) or {})
    for key, value in was.items():
        if key in config.env.unset:
            assert key not in now, f"{where}: {key} not unset"
        elif key in config.env.override:
            assert now[key] == compose.escape(config.env.override[key]), f"{where}: {key}"
        else:
            assert now.get(key, "missing") == value, f"{where}: environment {key}"


def _diff(before: Any, after: Any) -> str:
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys)
    return f"{before!r} -> {after!r}"
