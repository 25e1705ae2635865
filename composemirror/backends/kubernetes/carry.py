"""The agent's code, carried in the container spec so that a stock Python image runs it.

`bundle()` collects the agent-side modules of composemirror and the pure-Python libraries they
import (dnslib), strips docstrings, and packs them as base64 of LZMA-compressed JSON, cut into
parts that each fit one environment variable (Linux limits one to 128 KiB, MAX_ARG_STRLEN).
The parts travel in the session's Secret (see `manifests`), so the pod object stays small.
`BOOTSTRAP` is the `python3 -c` program that loads them with an in-memory importer (no file is
written: the container's filesystem may be read-only) and starts `composemirror.agent.pod`.
Pure apart from reading the installed modules' source files.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import dnslib

import composemirror

PART_ENV = "COMPOSEMIRROR_CODE_{}"
PARTS_ENV = "COMPOSEMIRROR_CODE_PARTS"
PART_KEY = "code-{}"
"""Key of part N in the session's Secret."""
PART_SIZE = 96 * 1024
"""Characters per part: under MAX_ARG_STRLEN (131072 bytes for `NAME=value`) with room."""

_ROOT = Path(composemirror.__file__).parent
ENTRY = "composemirror.agent.pod"
"""The agent's entry module in a pod; what it imports, transitively, is carried."""
CARRIED_PACKAGES = ("composemirror", "dnslib")
"""Packages whose modules are carried; everything else the agent imports is the stdlib."""


BOOTSTRAP = """\
import base64, importlib.abc, importlib.util, json, lzma, os, sys
n = int(os.environ.pop("COMPOSEMIRROR_CODE_PARTS"))
code = json.loads(lzma.decompress(base64.b64decode(
    "".join(os.environ.pop(f"COMPOSEMIRROR_CODE_{i}") for i in range(n)))))
class Carried(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in code:
            return importlib.util.spec_from_loader(name, self, is_package=code[name][0])
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        name = module.__name__
        exec(compile(code[name][1], "<carried>/" + name.replace(".", "/") + ".py", "exec"),
             module.__dict__)
sys.meta_path.insert(0, Carried())
from composemirror.agent.pod import main
main()
"""
"""Runs as `python3 -c BOOTSTRAP`; needs Python >= 3.11 (the agent's own requirement)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """The packed agent code."""

    parts: tuple[str, ...]
    """Base64 text, each at most PART_SIZE characters; joined they decode to the bundle."""
    digest: str
    """sha256 of the joined parts, first 12 hex digits (for labels and logs)."""
    source_bytes: int
    """Size of the sources before stripping and compression, in bytes."""

    @property
    def size(self) -> int:
        """Characters of all parts together (what the Secret holds), in bytes."""
        return sum(len(p) for p in self.parts)


@functools.cache
def bundle() -> Bundle:
    """The agent's code from this installation. Cached: it does not change while running."""
    code: dict[str, tuple[bool, str]] = {}
    total = 0
    for name in agent_modules():
        path, package = _source(name)
        text = path.read_text(encoding="utf-8")
        total += len(text.encode())
        code[name] = (package, strip(text))
    packed = base64.b64encode(
        lzma.compress(
            json.dumps(code, separators=(",", ":")).encode(), preset=9 | lzma.PRESET_EXTREME
        )
    ).decode()
    parts = tuple(packed[i : i + PART_SIZE] for i in range(0, len(packed), PART_SIZE))
    return Bundle(
        parts=parts, digest=hashlib.sha256(packed.encode()).hexdigest()[:12], source_bytes=total
    )


@functools.cache
def agent_modules(entry: str = ENTRY) -> tuple[str, ...]:
    """`entry` and every module of CARRIED_PACKAGES it imports, transitively, with their
    parent packages, sorted. Read from the sources (ast), so a module split or added is carried
    without a list to keep; imports under `if TYPE_CHECKING:` are not followed (never run).
    Raises ValueError when a carried module is missing from the installation."""
    found: set[str] = set()
    pending = [entry]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        path, package = _source(name)
        if not path.is_file():
            raise ValueError(f"the agent imports {name}, which has no source at {path}")
        pending += _imports(path.read_text(encoding="utf-8"), name, package)
    return tuple(sorted(found))


def _imports(source: str, name: str, package: bool) -> list[str]:
    """The carried modules `source` (module `name`) imports, including `from P import M`
    where M is a submodule of P."""
    tree = ast.parse(source)
    skipped = {
        id(node)
        for statement in ast.walk(tree)
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test)
        for part in statement.body
        for node in ast.walk(part)
    }
    here = name if package else name.rpartition(".")[0]
    wanted: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            wanted += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            wanted.append(base)
            wanted += [
                f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")
            ]
    return [w for w in wanted if w.split(".")[0] in CARRIED_PACKAGES]


def _is_module(name: str) -> bool:
    if name.split(".")[0] not in CARRIED_PACKAGES:
        return False
    path, _ = _source(name)
    return path.is_file()


def strip(source: str) -> str:
    """`source` without comments and docstrings (same behaviour; about half the size)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = [
                statement
                for statement in node.body
                if not (
                    isinstance(statement, ast.Expr)
                    and isinstance(statement.value, ast.Constant)
                    and isinstance(statement.value.value, str)
                )
            ]
            node.body = body or [ast.Pass()]
    return ast.unparse(tree)


def _source(name: str) -> tuple[Path, bool]:
    """The source file of module `name` and whether it is a package."""
    top, _, rest = name.partition(".")
    root = _ROOT if top == "composemirror" else Path(str(dnslib.__file__)).parent
    path = root.joinpath(*rest.split(".")) if rest else root
    if path.is_dir():
        return path / "__init__.py", True
    return path.with_suffix(".py"), False
