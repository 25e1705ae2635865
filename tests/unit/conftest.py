"""A user's project on disk, with a fake engine that knows its compose model and a fake backend."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from composemirror import ops
from composemirror.fakes import FakeBackend, FakeEngine

MODEL: dict[str, Any] = {
    "name": "shop",
    "networks": {"default": {"name": "shop_default", "ipam": {}}},
    "services": {
        "web": {
            "image": "example/web",
            "networks": {"default": None},
            "environment": {"APP_MODE": "local"},
        },
        "db": {"image": "postgres:16", "networks": {"default": None}},
    },
    "x-composemirror": {
        "target": "deployment/checkout",
        "namespace": "shop",
        "services": ["web"],
        "hosts": {"postgres.shop.svc.cluster.local": "db"},
    },
}


@dataclass
class Project:
    """A compose project in a temporary folder, and what `ops` runs it through."""

    folder: Path
    file: Path
    engine: FakeEngine
    backend: FakeBackend
    runtime: ops.Runtime

    @property
    def options(self) -> ops.Options:
        return ops.Options(files=(self.file,))

    @property
    def render_dir(self) -> Path:
        return self.folder / ".composemirror"

    def set_model(self, model: dict[str, Any]) -> None:
        self.engine.models[self.file.resolve()] = model


@pytest.fixture
def project(tmp_path: Path) -> Project:
    folder = tmp_path / "shop"
    folder.mkdir()
    file = folder / "compose.yaml"
    file.write_text("# the model is what the fake engine answers for this file\n")
    engine = FakeEngine(models={file: copy.deepcopy(MODEL)})
    backend = FakeBackend()
    runtime = ops.Runtime(engine=engine, choose=backend.chooser(), environ={})
    return Project(folder=folder, file=file, engine=engine, backend=backend, runtime=runtime)
