"""The one error hierarchy of composemirror.

Every error a user can cause or meet carries a message, an optional hint (what to do) and an exit
code. The CLI catches only these; anything else is a bug and keeps its traceback.

    ComposeMirrorError          exit 1, runtime failure
    ├── ConfigError             exit 2, bad input: compose model, x-composemirror, arguments
    ├── EngineError             exit 1, the Docker engine or compose failed or is missing
    ├── ClusterError            exit 1, the target cannot be found or reached
    ├── TunnelError             exit 1, the sidecar-agent link failed
    │   └── TunnelClosed        the link is down or went away before a request was answered
    ├── SidecarError            exit 1, the sidecar cannot take over its network namespace
    └── AgentError              exit 1, the agent cannot serve

The tunnel's wire protocol has its own errors (`protocol.LocalProtocolError`, a caller's misuse,
and `protocol.RemoteProtocolError`, a peer's violation); a tunnel ends with a `TunnelError`
naming them.
"""

from __future__ import annotations


class ComposeMirrorError(Exception):
    """Base of every error composemirror reports to a user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class ConfigError(ComposeMirrorError):
    """Bad input: the compose model, the x-composemirror block, or command-line arguments."""

    exit_code = 2


class EngineError(ComposeMirrorError):
    """The Docker engine or the compose plugin is missing or failed."""


class ClusterError(ComposeMirrorError):
    """The target or its cluster cannot be found or reached."""


class TunnelError(ComposeMirrorError):
    """The link between a sidecar and the agent failed."""


class TunnelClosed(TunnelError):
    """The link is down, or went away before a request was answered: remote work fails fast."""


class SidecarError(ComposeMirrorError):
    """The sidecar cannot take over its network namespace (firewall rules, listening sockets)."""


class AgentError(ComposeMirrorError):
    """The agent cannot serve (its key, its listening socket)."""
