"""Docker compose itself accepts every golden rendered model (no engine needed: `config` only).

The compose CLI plugin is a development requirement (scripts/setup installs it); a missing one
fails these tests rather than skipping them, so CI cannot pass without checking the rewrite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemirror import compose

GOLDEN = Path(__file__).parent / "golden"
RENDERED = sorted(GOLDEN.glob("*.rendered.json"))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The compose command; fails (never skips) when the docker CLI or its plugin is missing."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.fail("the `docker` CLI is not installed; run scripts/setup")
    result = run([docker, "compose", "version"], tmp_path_factory.mktemp("version"))
    if result.returncode != 0:
        pytest.fail(
            f"`docker compose version` failed ({result.stderr.strip()}); "
            "run scripts/setup to install the compose plugin"
        )
    return [docker, "compose"]


def write_project(model: dict[str, Any], folder: Path) -> Path:
    """Write the model as ops does (YAML) in `folder`."""
    path = folder / "compose.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False, default_flow_style=False, width=1000))
    return path


def test_there_are_rendered_golden_files() -> None:
    assert len(RENDERED) >= 4


@pytest.mark.parametrize("golden", RENDERED, ids=[p.name for p in RENDERED])
def test_compose_accepts_the_rendered_model(
    golden: Path, docker_compose: list[str], tmp_path: Path
) -> None:
    model = json.loads(golden.read_text())
    path = write_project(model, tmp_path)
    name = model["name"]
    checked = run([*docker_compose, "-f", str(path), "-p", name, "config", "-q"], tmp_path)
    assert checked.returncode == 0, checked.stderr

    # compose's own reading of it: every service is there, and each one that joins another's
    # network namespace depends on it, so compose recreates it whenever that one is recreated.
    printed = run(
        [*docker_compose, "-f", str(path), "-p", name, "config", "--format", "json"], tmp_path
    )
    assert printed.returncode == 0, printed.stderr
    normalised = json.loads(printed.stdout)
    assert set(normalised["services"]) == set(model["services"])
    for service_name, service in normalised["services"].items():
        mode = service.get("network_mode") or ""
        if mode.startswith("service:"):
            owner = mode.removeprefix("service:")
            assert owner.endswith(compose.SIDECAR_SUFFIX), service_name
            assert service["depends_on"][owner]["restart"] is True, service_name
