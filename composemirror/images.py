"""The sidecar and agent images: what their build context holds and how they are tagged.

A tag carries a hash of everything that goes into the image (Dockerfile, composemirror's code,
dnslib, the base image), so `up` reuses an image exactly when it matches this installation and
builds a new one otherwise. Building itself goes through `engine`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dnslib
import tenacity

import composemirror

ROLES = ("sidecar", "agent")
BASE_ENV = "COMPOSEMIRROR_BASE_IMAGE"
DEFAULT_BASE = "debian:bookworm-slim"
"""A public base for machines that can pull; python3 and iptables are installed on top."""
LOCAL_BASE = "composemirror/base:bookworm"
"""The base `scripts/make-base-image` makes offline with debootstrap; preferred when present."""

_PACKAGE = Path(composemirror.__file__).parent
_SKIP_DIRS = {"images", "sandbox", "__pycache__"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageSpec:
    """One image to build: its tag and the files of its build context."""

    role: str
    tag: str
    base: str
    files: tuple[tuple[str, Path], ...]
    """(path inside the build context, source file)."""


def spec(role: str, base: str) -> ImageSpec:
    """The image for `role` (`sidecar` or `agent`) built on `base`."""
    files = [("Dockerfile", _PACKAGE / "images" / role / "Dockerfile")]
    files += _python_files(_PACKAGE, "site/composemirror")
    for library in (dnslib, tenacity):
        root = Path(str(library.__file__)).parent
        files += _python_files(root, f"site/{library.__name__}")
    digest = hashlib.sha256(base.encode())
    for name, source in files:
        digest.update(name.encode() + b"\0" + source.read_bytes() + b"\0")
    tag = f"composemirror/{role}:{composemirror.__version__}-{digest.hexdigest()[:12]}"
    return ImageSpec(role=role, tag=tag, base=base, files=tuple(files))


def write_context(image: ImageSpec, directory: Path) -> None:
    """Lay out the build context of `image` in `directory`."""
    for name, source in image.files:
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def _python_files(root: Path, prefix: str) -> list[tuple[str, Path]]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(names):
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((f"{prefix}/{path.relative_to(root).as_posix()}", path))
    return found
