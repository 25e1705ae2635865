"""`make cluster-down` removes everything the cluster made, and `make cluster` starts it again.

It restarts the machine's one cluster, so it runs after every other test (see conftest)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.kube import NODE, get_json, kubectl
from tests.conftest import ROOT

STATE = "/var/lib/composemirror-cluster"
RUN = "/run/composemirror-cluster"
CGROUP = "composemirror-cluster"
BINARY = "/var/cache/composemirror/cluster/bin/composemirror-cluster"


def make(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", target], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )


def cluster_processes() -> list[str]:
    """Processes running the cluster's binary, or naming its state or runtime directories
    (containerd, its shims, the pods' processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            exe = os.readlink(proc / "exe")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if exe.startswith(BINARY) or STATE in cmdline or f"{RUN}/" in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def leftovers() -> dict[str, list[str]]:
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    chains = []
    for tool in ("iptables-save", "ip6tables-save"):
        dump = subprocess.run([tool], capture_output=True, text=True).stdout
        chains += [
            line
            for line in dump.splitlines()
            if line.startswith(":")
            and line[1:].startswith(("KUBE-", "CNI-", "COMPOSEMIRROR-CLUSTER"))
        ]
    netns = Path("/var/run/netns")
    return {
        "processes": cluster_processes(),
        "mounts": [m for m in mounts if m.startswith((STATE, RUN))],
        "interfaces": [line for line in links.splitlines() if "cmk8s0" in line],
        "netns": [p.name for p in netns.iterdir()] if netns.exists() else [],
        "chains": chains,
        "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP}")],
        "log links": [
            str(p)
            for p in Path("/var/log/containers").glob("*")
            if p.is_symlink() and str(p.readlink()).startswith(STATE)
        ],
        "files": [
            f
            for f in (
                "/var/lib/kubelet/device-plugins/kubelet.sock",
                "/run/containerd/runc/k8s.io",
                STATE + "/etcd",
                RUN,
            )
            if Path(f).exists()
        ],
    }


@pytest.mark.cluster_lifecycle
def test_down_leaves_nothing_and_up_starts_again(cluster: None) -> None:
    before = leftovers()
    assert before["processes"] and before["chains"]  # it was running

    down = make("cluster-down")
    try:
        assert down.returncode == 0, down.stderr
        assert leftovers() == {
            "processes": [],
            "mounts": [],
            "interfaces": [],
            "netns": [],
            "chains": [],
            "cgroups": [],
            "log links": [],
            "files": [],
        }
        again = make("cluster-down")
        assert again.returncode == 0, again.stderr
    finally:
        up = make("cluster")  # other tests and users expect it running, whatever failed
    assert up.returncode == 0, up.stderr
    ready = {c["type"]: c["status"] for c in get_json("node", NODE)["status"]["conditions"]}
    assert ready["Ready"] == "True"
    pids = sorted(Path(RUN, "pids").glob("*.pid"))
    started = [p.read_text() for p in pids]

    # A second start finds it running, changes nothing and returns quickly.
    began = time.monotonic()
    second = make("cluster")
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - began < 60
    assert [p.read_text() for p in sorted(Path(RUN, "pids").glob("*.pid"))] == started
    assert kubectl("get", "--raw", "/readyz").stdout == "ok"
