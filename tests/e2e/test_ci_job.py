"""The README's CI job, end to end: examples/ci-job against the sandbox cluster, as a runner runs
it (stdin closed, output to a pipe), under a project name of its own."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, labelled

EXAMPLE = ROOT / "examples" / "ci-job" / "compose.yaml"
NAME = "cm-e2e-ci-job"


def composemirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "composemirror", "-f", str(EXAMPLE), "-p", NAME, *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_ci_job_example_passes_and_leaves_nothing(sandbox: None) -> None:
    try:
        run = composemirror("run", "--rm", "tests")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "3 passed, 0 failed" in run.stdout
        up = composemirror("up", "--exit-code-from", "tests")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "\x1b" not in run.stdout + run.stderr + up.stdout + up.stderr
    finally:
        down = composemirror("down", "-v")
    assert down.returncode == 0, down.stderr
    for label in (f"com.docker.compose.project={NAME}", f"io.composemirror.project={NAME}"):
        assert labelled(label) == {"container": [], "network": [], "volume": []}, label
