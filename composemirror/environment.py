"""The app's environment: the target's variables merged with the local ones, mirrord's way.

Precedence, lowest first: remote (filtered by include/exclude and the default excludes) <
`env_file` < `mapping` < compose's own `environment:` < `override`; `unset` removes names last.
Pure: the caller reads the target's env and the env file.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from composemirror.config import DEFAULT_ENV_EXCLUDES, EnvSettings


def select_remote(remote: Mapping[str, str], settings: EnvSettings) -> dict[str, str]:
    """The remote variables the app imports: include/exclude globs and the default excludes."""
    if not settings.enabled:
        return {}
    excludes = (*DEFAULT_ENV_EXCLUDES, *settings.exclude)
    return {
        name: value
        for name, value in remote.items()
        if not _any_match(name, excludes)
        and (not settings.include or _any_match(name, settings.include))
    }


def merge(
    remote: Mapping[str, str],
    settings: EnvSettings,
    *,
    env_file: Mapping[str, str],
    compose: Mapping[str, str | None],
) -> dict[str, str | None]:
    """The environment the app runs with. `None` keeps compose's meaning (from the shell)."""
    merged: dict[str, str | None] = {**select_remote(remote, settings), **env_file}
    for pattern, value in settings.mapping.items():
        compiled = re.compile(pattern)
        for name in merged:
            if compiled.search(name):
                merged[name] = value
    merged.update(compose)
    merged.update(settings.override)
    unset = {name.lower() for name in settings.unset}
    return {name: value for name, value in sorted(merged.items()) if name.lower() not in unset}


def _any_match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
