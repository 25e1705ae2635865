"""Import rules: one module imports `kubernetes`; the carried agent code needs nothing else."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import composemirror
from composemirror.backends.kubernetes.carry import _source, agent_modules

ROOT = Path(composemirror.__file__).parent


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_only_the_client_imports_kubernetes() -> None:
    importers = {
        path.relative_to(ROOT).as_posix()
        for path in ROOT.rglob("*.py")
        if any(name.split(".")[0] == "kubernetes" for name in imports(path))
    }
    assert importers == {"backends/kubernetes/client.py"}


def test_carried_code_is_closed() -> None:
    """Every import of a carried module is the standard library's or carried too, so a stock
    python3 image runs the agent (and no Docker or Kubernetes client reaches a pod)."""
    carried = set(agent_modules())
    for name in carried:
        path, _ = _source(name)
        for module in imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or module in carried or top == "__future__":
                continue
            # dnslib's optional imports sit behind try/except or doctest blocks
            assert name.startswith("dnslib") and top in {"StringIO"}, (name, module)
