"""The agent: serves sidecar tunnels from inside the target's network namespace."""
