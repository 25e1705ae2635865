"""`python -m benchmarks.kubernetes`: the Kubernetes link against `kubectl port-forward`.

One run, one client: a Python client in an app container of a compose project whose target is a
server pod in the test cluster (`make cluster`). It measures download throughput (1 and 8
streams) and connect + 64 B request/response latency to the server's Service, first through
composemirror (sidecar, tunnel, forwarder, agent in the pod), then through a plain
`kubectl port-forward svc/...` on the Docker host gateway, from the same container. Also the
python client's own port-forward (`kubernetes.stream.portforward`) against kubectl, from the
host, which decided which one the forwarder runs. With `--write-results` the figures replace the
"Kubernetes link" section of RESULTS.md. Needs the cluster, the Docker engine, and
composemirror/base:bookworm; creates a namespace `cm-bench-k8s-*` and removes it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.report import merge_documents

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
KUBECTL = ROOT / ".cluster" / "bin" / "kubectl"
NAMESPACE = f"cm-bench-k8s-{secrets.token_hex(3)}"
"""Fresh for each run (a deleted namespace takes a while to go)."""
IMAGE = "composemirror/base:bookworm"
PROJECT = "cm-bench-k8s"
MIB = 1024 * 1024
SECTION = "## Kubernetes link"

SERVER = """\
import socket, threading
def serve(c):
    with c:
        first = c.recv(64)
        if first.startswith(b"get "):
            size = int(first.split()[1]); block = b"x" * (1 << 20)
            while size > 0:
                c.sendall(block[:size]); size -= len(block)
        else:
            data = first
            while len(data) < 64:
                more = c.recv(64 - len(data))
                if not more: return
                data += more
            c.sendall(data)
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7000)); l.listen(256)
while True:
    c, _ = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = """\
import json, socket, sys, threading, time
host, port, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def download(out):
    s = socket.create_connection((host, port), timeout=30); s.sendall(b"get %d" % size)
    got = 0
    while got < size:
        b = s.recv(1 << 20)
        if not b: break
        got += len(b)
    s.close(); out.append(got)
def streams(n):
    out = []; ts = [threading.Thread(target=download, args=(out,)) for _ in range(n)]
    t0 = time.monotonic(); [t.start() for t in ts]; [t.join() for t in ts]
    return sum(out) / (time.monotonic() - t0)
lat = []
for _ in range(rounds):
    t0 = time.monotonic(); s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"e" * 64); d = b""
    while len(d) < 64: d += s.recv(64)
    lat.append((time.monotonic() - t0) * 1000); s.close()
lat.sort()
print(json.dumps({"one": max(streams(1) for _ in range(3)), "eight": streams(8),
                  "p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)]}))
"""

COMPOSE = f"""\
name: {PROJECT}
x-composemirror:
  target: pod/server
  namespace: {NAMESPACE}
  services: [client]
  agent: {{image: {IMAGE}, image_pull_policy: Never}}
services:
  client:
    image: {IMAGE}
    command: [sleep, infinity]
"""


def kubectl(*args: str, input: str | None = None) -> str:
    done = subprocess.run(
        [str(KUBECTL), "--kubeconfig", str(KUBECONFIG), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"kubectl {' '.join(args)}: {done.stderr}")
    return done.stdout


def pod_manifest() -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "server", "labels": {"app": "server"}},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 1000,
                            "runAsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "server",
                                "image": IMAGE,
                                "imagePullPolicy": "Never",
                                "command": ["python3", "-c", SERVER],
                                "readinessProbe": {"tcpSocket": {"port": 7000}, "periodSeconds": 1},
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "server"},
                    "spec": {"selector": {"app": "server"}, "ports": [{"port": 7000}]},
                },
            ],
        }
    )


def in_client(host: str, port: int, size: int, rounds: int) -> dict[str, float]:
    done = subprocess.run(
        [
            "docker",
            "exec",
            f"{PROJECT}-client-1",
            "python3",
            "-c",
            CLIENT,
            host,
            str(port),
            str(size),
            str(rounds),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"client failed: {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def gateway() -> str:
    done = subprocess.run(
        ["docker", "network", "inspect", "bridge", "-f", "{{json .IPAM.Config}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(done.stdout)[0]
    return str(config.get("Gateway") or config["Subnet"].rsplit(".", 2)[0] + ".0.1")


def port_forward(target: str, address: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [
            str(KUBECTL),
            "--kubeconfig",
            str(KUBECONFIG),
            "-n",
            NAMESPACE,
            "port-forward",
            "--address",
            address,
            target,
            "0:7000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # Forwarding from ADDRESS:PORT -> 7000
    threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
    return process, int(line.split(":")[1].split()[0])


def python_client_forward() -> tuple[Callable[[], None], int]:
    """A local listener relaying each connection through `kubernetes.stream.portforward`."""
    from kubernetes import client, config
    from kubernetes.stream import portforward

    config.load_kube_config(str(KUBECONFIG))  # type: ignore[no-untyped-call]
    api = client.CoreV1Api()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def relay(conn: socket.socket) -> None:
        forward = portforward(
            api.connect_get_namespaced_pod_portforward, "server", NAMESPACE, ports="7000"
        )
        remote = forward.socket(7000)
        remote.setblocking(True)
        try:
            while True:
                ready, _, _ = select.select([conn, remote], [], [], 10)
                if not ready:
                    return
                for side in ready:
                    data = side.recv(1 << 16)
                    if not data:
                        return
                    (remote if side is conn else conn).sendall(data)
        except OSError:
            return
        finally:
            conn.close()
            remote.close()
            forward.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.close, int(listener.getsockname()[1])


def host_client(port: int, size: int, rounds: int) -> dict[str, float]:
    """The same client program, run on the host against 127.0.0.1:port."""
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(size), str(rounds)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        return {"one": 0.0, "eight": 0.0, "p50": float("nan"), "p99": float("nan")}
    result: dict[str, float] = json.loads(done.stdout)
    return result


def run(size: int, rounds: int) -> list[tuple[str, str, str, str]]:
    env = dict(os.environ, KUBECONFIG=str(KUBECONFIG), COMPOSEMIRROR_KUBECTL=str(KUBECTL))
    env["COMPOSEMIRROR_CLUSTER"] = "kubernetes"
    kubectl("create", "namespace", NAMESPACE)
    try:
        kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
        time.sleep(2)  # the namespace's default ServiceAccount
        kubectl("-n", NAMESPACE, "apply", "-f", "-", input=pod_manifest())
        kubectl("-n", NAMESPACE, "wait", "pod/server", "--for=condition=Ready", "--timeout=120s")
        service_ip = kubectl(
            "-n", NAMESPACE, "get", "svc/server", "-o", "jsonpath={.spec.clusterIP}"
        )
        with tempfile.TemporaryDirectory(prefix="cm-bench-k8s-") as folder:
            compose = Path(folder) / "compose.yaml"
            compose.write_text(COMPOSE)
            cli = [sys.executable, "-m", "composemirror", "-f", str(compose)]
            subprocess.run([*cli, "up", "-d"], env=env, check=True, capture_output=True)
            try:
                link = in_client(f"server.{NAMESPACE}.svc.cluster.local", 7000, size, rounds)
                print(f"link {link}", file=sys.stderr)
                assert service_ip
                forward, port = port_forward("svc/server", gateway())
                try:
                    # a local name (the sidecars map it to the host gateway): not tunnelled
                    direct = in_client("host.docker.internal", port, size, rounds)
                finally:
                    forward.terminate()
                print(f"kubectl port-forward {direct}", file=sys.stderr)
            finally:
                subprocess.run([*cli, "down"], env=env, check=False, capture_output=True)
        forward, port = port_forward("pod/server", "127.0.0.1")
        try:
            host_kubectl = host_client(port, size, rounds)
        finally:
            forward.terminate()
        close, port = python_client_forward()
        try:
            host_python = host_client(port, size // 8, min(rounds, 30))
        finally:
            close()
    finally:
        kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    return rows(link, direct, host_kubectl, host_python)


def rows(
    link: dict[str, float],
    direct: dict[str, float],
    kubectl_host: dict[str, float],
    python_host: dict[str, float],
) -> list[tuple[str, str, str, str]]:
    def mib(value: float) -> str:
        return f"{value / MIB:,.0f} MiB/s"

    return [
        ("throughput: download, 1 stream", mib(link["one"]), mib(direct["one"]),
         f"{link['one'] / direct['one']:.2f}x (goal >= 0.8x)"),
        ("throughput: download, 8 streams", mib(link["eight"]), mib(direct["eight"]),
         f"{link['eight'] / direct['eight']:.2f}x (goal >= 0.8x)"),
        ("latency: connect + 64 B, p50", f"{link['p50']:.2f} ms", f"{direct['p50']:.2f} ms",
         f"{link['p50'] - direct['p50']:+.2f} ms (goal <= +1 ms)"),
        ("latency: connect + 64 B, p99", f"{link['p99']:.2f} ms", f"{direct['p99']:.2f} ms",
         f"{link['p99'] - direct['p99']:+.2f} ms"),
        ("port-forward choice: 1 stream, kubectl vs python client (host)",
         mib(kubectl_host["one"]), mib(python_host["one"]), "kubectl kept"),
        ("port-forward choice: connect + 64 B p50, kubectl vs python client (host)",
         f"{kubectl_host['p50']:.2f} ms", f"{python_host['p50']:.2f} ms", "kubectl kept"),
    ]  # fmt: skip


def document(table: Sequence[tuple[str, str, str, str]], when: str) -> str:
    lines = [
        SECTION,
        "",
        f"Measured on {when} by `python -m benchmarks.kubernetes --write-results` against the",
        "test cluster (`make cluster`). Client: one Python program in an app container; server: a",
        "pod in the cluster. composemirror: the app's sidecar, the tunnel, the forwarder (a",
        "supervised `kubectl port-forward` on the host gateway) and the agent in the pod.",
        "Baseline: `kubectl port-forward svc/server` on the host gateway, the same client in the",
        "same container. The last two rows compare the port-forwards themselves from the host.",
        "",
        "| benchmark | composemirror (or kubectl) | baseline (or python client) | result |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kubernetes")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--mib", type=int, default=128, help="MiB per download stream")
    parser.add_argument("--rounds", type=int, default=200, help="latency samples")
    args = parser.parse_args(argv)
    table = run(args.mib * MIB, args.rounds)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = document(table, when)
    print(text)
    if args.write_results:
        RESULTS.write_text(merge_documents(RESULTS.read_text(), text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
