"""Bad input through `cli.main()` in-process: every kind ends in a clean exit-2 error that names
the file and what to fix, never a traceback. The loader is fuzzed with hypothesis: arbitrary bytes
as `--config` and as `feature.env.env_file`, arbitrary YAML data as the x-composemirror block."""

from __future__ import annotations

import copy
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composemirror import cli, ops
from composemirror.config import MAX_DEPTH
from composemirror.fakes import FakeBackend, FakeEngine
from tests.unit.conftest import MODEL, Project

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _project(folder: Path, model: dict[str, Any]) -> Project:
    file = folder / "compose.yaml"
    file.write_text("# the model is what the fake engine answers for this file\n")
    engine = FakeEngine(models={file: model})
    backend = FakeBackend()
    runtime = ops.Runtime(engine=engine, choose=backend.chooser(), environ={})
    return Project(folder=folder, file=file, engine=engine, backend=backend, runtime=runtime)


def _config(project: Project, *args: str) -> tuple[int, str]:
    """`composemirror -f FILE ARGS config`: exit code and stderr."""
    err = io.StringIO()
    out = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(["-f", str(project.file), *args, "config"], runtime=project.runtime)
    finally:
        sys.stdout, sys.stderr = saved
    return code, err.getvalue()


def _assert_clean(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("composemirror: "), err
        assert len(err) < 2000, "an error message echoes the whole input"


def _with_block(block: Any) -> dict[str, Any]:
    model = copy.deepcopy(MODEL)
    model["x-composemirror"] = block
    return model


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_a_binary_config_file_names_the_file_and_the_encoding(
    project: Project, tmp_path: Path
) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00target: \x80\x81")
    code, err = _config(project, "--config", str(binary))
    assert code == 2
    assert f"{binary}: not UTF-8 text" in err
    assert "hint: give --config" in err


def test_a_deeply_nested_config_file_is_refused_with_its_depth(
    project: Project, tmp_path: Path
) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("target: targetless\nfeature: " + "[" * 20000 + "]" * 20000 + "\n")
    code, err = _config(project, "--config", str(nested))
    assert code == 2
    assert f"{nested}: nested more than {MAX_DEPTH} levels deep" in err


def test_a_deeply_nested_block_names_where(project: Project) -> None:
    project.set_model(_with_block({**MODEL["x-composemirror"], "feature": _nested(500)}))
    code, err = _config(project)
    assert code == 2
    assert "x-composemirror.feature[0][0]" in err and f"more than {MAX_DEPTH} levels" in err


def test_a_deeply_nested_service_is_refused_before_the_rewrite(project: Project) -> None:
    model = copy.deepcopy(MODEL)
    model["services"]["web"]["x-deep"] = _nested(2000)
    project.set_model(model)
    code, err = _config(project)
    assert code == 2
    assert "services.web.x-deep[0]" in err


def test_a_binary_env_file_names_the_key_and_the_file(project: Project) -> None:
    (project.folder / "bin.env").write_bytes(bytes(range(256)) * 4)
    block = {**MODEL["x-composemirror"], "feature": {"env": {"env_file": "bin.env"}}}
    project.set_model(_with_block(block))
    code, err = _config(project)
    assert code == 2
    assert "x-composemirror.feature.env.env_file" in err and "bin.env is not UTF-8 text" in err


@pytest.mark.parametrize("target", ["deployment/", "docker://", "pod/x/container/"])
def test_a_huge_target_name_is_refused_without_echoing_it(project: Project, target: str) -> None:
    block = {**MODEL["x-composemirror"], "target": target + "a" * 100_000}
    project.set_model(_with_block(block))
    code, err = _config(project)
    assert code == 2
    assert "100000 characters long" in err and "at most 253 characters" in err
    assert len(err) < 500


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_ends_the_command_quietly(
    project: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`composemirror status | head -1`: no BrokenPipeError traceback (the engine-side run of
    this is in tests/integration/test_bad_input.py)."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = cli.main(["-f", str(project.file), "status"], runtime=project.runtime)
    assert code == 1
    assert "Traceback" not in capsys.readouterr().err


# -- fuzzing --------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
_keys = st.sampled_from(
    ["target", "namespace", "services", "hosts", "feature", "agent", "env", "network",
     "dns", "outgoing", "filter", "local", "remote", "env_file", "override", "ttl", "path",
     "deployment", "container", "udp", "tcp", "image", "port"]
) | st.text(max_size=10)  # fmt: skip
_yaml_data = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=30,
)


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_config_file_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        project = _project(Path(folder), copy.deepcopy(MODEL))
        config = Path(folder) / "fuzz.yaml"
        config.write_bytes(data)
        _assert_clean(*_config(project, "--config", str(config)))


@FUZZ
@given(block=_yaml_data)
def test_fuzz_config_file_yaml(block: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        project = _project(Path(folder), copy.deepcopy(MODEL))
        config = Path(folder) / "fuzz.yaml"
        config.write_text(yaml.safe_dump(block))
        _assert_clean(*_config(project, "--config", str(config)))


@FUZZ
@given(block=_yaml_data, base=st.sampled_from(["target", "services", "feature", "agent"]))
def test_fuzz_block_in_the_compose_model(block: Any, base: str) -> None:
    """Arbitrary data under one key of an otherwise valid block, or as the whole block."""
    with tempfile.TemporaryDirectory() as folder:
        whole = copy.deepcopy(MODEL["x-composemirror"])
        whole[base] = block
        for candidate in (whole, block):
            project = _project(Path(folder), _with_block(candidate))
            _assert_clean(*_config(project))


@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_env_file_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "fuzz.env").write_bytes(data)
        block = {**MODEL["x-composemirror"], "feature": {"env": {"env_file": "fuzz.env"}}}
        project = _project(Path(folder), _with_block(block))
        _assert_clean(*_config(project))
