"""composemirror: run part of a system in docker compose, the rest in a Kubernetes cluster."""

__version__ = "0.1.0"
