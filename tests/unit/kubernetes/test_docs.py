"""docs/kubernetes.md shows the Role composemirror really needs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from composemirror.backends.kubernetes.access import role_manifest

DOC = Path(__file__).parents[3] / "docs" / "kubernetes.md"


def test_documented_role_is_the_minimal_role() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    documents = [d for block in blocks for d in yaml.safe_load_all(block)]
    [role] = [d for d in documents if isinstance(d, dict) and d.get("kind") == "Role"]
    assert role == role_manifest("NAMESPACE")
