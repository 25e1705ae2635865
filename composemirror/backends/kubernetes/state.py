"""Where a Kubernetes session's host-side state lives, and what it records.

One folder per compose project under a directory of this user that does not depend on the
project's files (`$COMPOSEMIRROR_STATE_DIR`, else `$XDG_RUNTIME_DIR/composemirror`, else
`<tmp>/composemirror-<uid>`): the forwarder's state and log, and the session record (the context,
the namespaces, the agent and its pod). So `down` and `status` find a session whatever became of
`.composemirror/`, and two projects started from one directory never share a forwarder. Reading
never creates anything; only `write_record` and the forwarder's start do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from composemirror.errors import ClusterError

STATE_ENV = "COMPOSEMIRROR_STATE_DIR"
"""Overrides where sessions' host-side state is kept."""
RECORD_FILE = "session.json"


def root(environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding every project's session folder (not created here)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(STATE_ENV)
    if chosen:
        return Path(chosen)
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "composemirror"
    return Path(tempfile.gettempdir()) / f"composemirror-{os.getuid()}"


def session_dir(project: str, base: Path) -> Path:
    """The folder of `project`'s session under `base` (a compose project name is already a
    safe file name; anything else is replaced, so no name can leave `base`)."""
    return base / (re.sub(r"[^A-Za-z0-9_.-]", "-", project).lstrip(".") or "project")


def ensure(directory: Path) -> Path:
    """Create `directory` (and its parent, the state root) private to this user.

    Raises ClusterError when the state root belongs to another user (a shared /tmp).
    """
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = directory.parent.stat().st_uid
    if owner != os.getuid():
        raise ClusterError(
            f"{directory.parent} belongs to another user (uid {owner})",
            hint=f"set {STATE_ENV} to a directory of your own",
        )
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


@dataclass(slots=True, kw_only=True)
class Record:
    """What `up` created for one project, for `down` and `status`."""

    context: str | None = None
    """The kube config context the objects were created with."""
    kubeconfig: list[str] = field(default_factory=list)
    """The kube config files `up` read (absolute paths, KUBECONFIG's order): `down` and
    `status` read them when the environment names none (a new terminal)."""
    namespaces: list[str] = field(default_factory=list)
    """Every namespace the project's Secrets and Jobs were created in."""
    agent: str | None = None
    """The running session's agent: its name (the Secret's, the Job's, the container's)."""
    pod: str | None = None
    """The pod the agent runs in (the target pod, or the Job's)."""
    namespace: str | None = None
    """The agent's namespace."""
    mode: str | None = None
    """`ephemeral` or `job`."""


def read_record(directory: Path) -> Record:
    """The record in `directory`, empty when there is none (or it cannot be read)."""
    try:
        data: Any = json.loads((directory / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return Record()
    if not isinstance(data, dict):
        return Record()
    known = {k: v for k, v in data.items() if k in Record.__slots__}
    return Record(**known)


def write_record(directory: Path, record: Record) -> None:
    """Write `record` in `directory` (created private to this user), atomically."""
    ensure(directory)
    path = directory / RECORD_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
    temporary.replace(path)


def remove(directory: Path) -> None:
    """Forget the session: its record, the forwarder's files, the folder when empty."""
    for name in (RECORD_FILE, "forwarder.json", "forwarder.log", "forwarder.tmp"):
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else is in it: it stays
        directory.rmdir()
