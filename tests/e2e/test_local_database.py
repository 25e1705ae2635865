"""The README's main job, end to end: examples/local-database against the sandbox cluster.

Real engine, real compose, real clients inside the app container (psql, curl, dig, busybox's
nslookup, a static musl binary). The app's database name is the cluster's; `hosts` sends it to
the local database, and everything else reaches the sandbox through the tunnel.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, docker, exec_in, status, wait_for

EXAMPLE = ROOT / "examples" / "local-database" / "compose.yaml"
APP = "local-database-web-1"
AGENT = "local-database-composemirror-agent-1"
SIDECAR = "local-database-web-mirror-1"
DB = "local-database-db-1"
CLUSTER_DB = "postgres.shop.svc.cluster.local"
DATABASE_URL = f"postgresql://shop:shop-secret@{CLUSTER_DB}:5432/shop"


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=15) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def example(sandbox: None) -> Iterator[None]:
    result = cli("-f", str(EXAMPLE), "up", "-d")
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        wait_for(lambda: _answers("http://localhost:8080/"), timeout=60)
        yield
    finally:
        cli("-f", str(EXAMPLE), "down")


def _answers(url: str) -> bool:
    try:
        http_get(url)
    except OSError:
        return False
    return True


def test_published_port_shows_local_database_and_cluster_orders(example: None) -> None:
    page = http_get("http://localhost:8080/")
    assert "customers  from the LOCAL database (DATABASE_URL host postgres.shop" in page
    assert "Test Customer One (local fixture)" in page
    assert "shared staging data" not in page
    assert "orders     from the CLUSTER" in page
    assert "#1001 espresso machine: shipped" in page


def test_another_service_reaches_the_app_by_its_service_name(example: None) -> None:
    result = exec_in(DB, ["curl", "-fsS", "-m", "10", "http://web:8080/json"])
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["customers"]["source"] == "local"
    assert body["orders"]["source"] == "cluster"


def test_status_lists_app_sidecar_and_agent(example: None) -> None:
    report = status(EXAMPLE)
    by_role = {row["role"]: row for row in report["services"]}
    assert by_role["app"]["service"] == "web" and by_role["app"]["state"] == "running"
    assert by_role["sidecar"]["service"] == "web-mirror"
    assert by_role["sidecar"]["health"] == "healthy"
    assert by_role["agent"]["state"] == "running"
    link = wait_for(lambda: status(EXAMPLE)["services"] and _sidecar_link(), timeout=15)
    assert link["agent"] == "connected"
    assert link["rules"]["state"] == "in place" and link["rules"]["restored"] == 0
    assert by_role["app"]["namespace"]["ok"] is True
    table = cli("-f", str(EXAMPLE), "status").stdout
    assert "web-mirror" in table and "link connected, rules in place" in table
    assert "namespace shares web-mirror's" in table


def _sidecar_link() -> dict[str, object] | None:
    for row in status(EXAMPLE)["services"]:
        if row["role"] == "sidecar" and row["link"].get("agent") == "connected":
            return dict(row["link"])
    return None


def test_psql_with_the_cluster_hostname_reads_the_local_rows(example: None) -> None:
    result = exec_in(
        APP,
        ["psql", DATABASE_URL, "-Atc", "SELECT source, count(*) FROM customers GROUP BY source"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "local|3"


@pytest.mark.parametrize("host", ["orders.shop.svc.cluster.local", "orders"])
def test_curl_reaches_the_cluster_service_through_the_tunnel(example: None, host: str) -> None:
    result = exec_in(APP, ["curl", "-fsS", "-m", "10", f"http://{host}:8080/orders"])
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["source"] == "cluster"
    # The connection leaves from the target's network namespace: the sandbox sees its address.
    assert body["client"] == "10.96.0.22"


def test_static_musl_client_resolves_and_connects_like_the_others(
    example: None, static_client: Path
) -> None:
    assert docker("cp", str(static_client), f"{APP}:/tmp/httpget").returncode == 0
    remote = exec_in(APP, ["/tmp/httpget", "orders.shop.svc.cluster.local", "8080", "/orders"])
    assert remote.returncode == 0, remote.stderr
    assert '"source": "cluster"' in remote.stdout
    short = exec_in(APP, ["/tmp/httpget", "orders", "8080", "/orders"])
    assert '"source": "cluster"' in short.stdout


def test_busybox_nslookup_follows_the_filter(example: None) -> None:
    local_ip = exec_in(APP, ["dig", "+short", "db"]).stdout.strip()
    remote = exec_in(APP, ["busybox", "nslookup", "orders.shop.svc.cluster.local"])
    assert "10.96.0.21" in remote.stdout
    mapped = exec_in(APP, ["busybox", "nslookup", CLUSTER_DB])
    assert local_ip and local_ip in mapped.stdout and "10.96.0.20" not in mapped.stdout


def test_dig_straight_at_port_53_follows_the_filter(example: None) -> None:
    def dig(*args: str) -> str:
        return exec_in(APP, ["dig", "+short", "+time=5", "+tries=1", *args]).stdout.strip()

    local_ip = dig("db")
    assert local_ip.startswith("172.") or local_ip.startswith("192.168.")
    assert dig(CLUSTER_DB) == local_ip
    assert dig("orders.shop.svc.cluster.local") == "10.96.0.21"
    assert dig("orders") == "10.96.0.21"
    # Whatever server the client names, the sidecar answers.
    assert dig("@192.0.2.53", "orders.shop.svc.cluster.local") == "10.96.0.21"
    assert dig("+tcp", "orders.shop.svc.cluster.local") == "10.96.0.21"
    assert dig("SRV", "_http._tcp.orders.shop.svc.cluster.local") == (
        "0 0 8080 orders.shop.svc.cluster.local."
    )
    assert dig("TXT", "orders.shop.svc.cluster.local") == '"owner=team-orders"'
    assert dig("AAAA", "orders-v6.shop.svc.cluster.local") == "fd00:96::21"
    assert dig("shop-db.shop.svc.cluster.local").splitlines() == [
        "postgres.shop.svc.cluster.local.",
        "10.96.0.20",
    ]
    missing = exec_in(APP, ["dig", "+time=5", "+tries=1", "nothere.shop.svc.cluster.local"])
    assert "status: NXDOMAIN" in missing.stdout


def test_the_local_database_name_never_reaches_the_cluster_dns(example: None) -> None:
    since = str(int(time.time()) - 1)
    for _ in range(3):
        exec_in(APP, ["dig", "+short", CLUSTER_DB])
        exec_in(APP, ["psql", DATABASE_URL, "-Atc", "SELECT 1"])
    exec_in(APP, ["dig", "+short", "canary.shop.svc.cluster.local"])
    logs = wait_for(lambda: _cluster_dns_log(since, "canary.shop.svc.cluster.local"), timeout=10)
    leaks = re.findall(r"query\[\w+\] postgres\.shop\.svc\.cluster\.local\S*", logs)
    assert leaks == []


def _cluster_dns_log(since: str, expected: str) -> str | None:
    result = docker("logs", "--since", since, "composemirror-sandbox-kube-dns-1")
    logs = result.stdout + result.stderr
    return logs if expected in logs else None


def test_imported_env_follows_the_documented_precedence(example: None) -> None:
    env = dict(
        line.split("=", 1) for line in exec_in(APP, ["env"]).stdout.splitlines() if "=" in line
    )
    assert env["DATABASE_URL"] == DATABASE_URL  # imported from the deployed app
    assert env["ORDERS_URL"] == "http://orders.shop.svc.cluster.local:8080/orders"
    assert env["LOG_LEVEL"] == "debug"  # compose's own environment wins over the remote one
    assert env["PAYMENTS_MODE"] == "disabled"  # override wins over everything
    assert "KUBERNETES_SERVICE_HOST" not in env  # default excludes
    assert "KUBERNETES_SERVICE_PORT" not in env


def test_with_the_agent_stopped_remote_fails_fast_and_local_works(example: None) -> None:
    assert docker("stop", AGENT).returncode == 0
    try:
        started = time.monotonic()
        remote = exec_in(APP, ["curl", "-sS", "-m", "20", "http://10.96.0.21:8080/orders"])
        assert remote.returncode != 0
        assert time.monotonic() - started < 5
        # A name not in the sidecar's cache (cached answers stay valid for their TTL).
        fresh = f"new-{time.monotonic_ns()}.shop.svc.cluster.local"
        lookup = exec_in(APP, ["dig", "+time=10", "+tries=1", fresh])
        assert "status: SERVFAIL" in lookup.stdout
        local = exec_in(APP, ["psql", DATABASE_URL, "-Atc", "SELECT count(*) FROM customers"])
        assert local.stdout.strip() == "3"
        # No path around the tunnel: from the shared namespace, a socket that the firewall lets
        # through untouched (the sidecar's mark) cannot reach the sandbox network.
        direct = exec_in(
            SIDECAR,
            [
                "python3",
                "-c",
                "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
                "socket.SO_MARK, 0x434D); s.settimeout(3); "
                "sys.exit(0 if s.connect_ex(('10.96.0.21', 8080)) else 1)",
            ],
        )
        assert direct.returncode == 0, "the sandbox was reachable without the tunnel"
    finally:
        assert docker("start", AGENT).returncode == 0
    wait_for(_sidecar_link, timeout=30)
    again = exec_in(APP, ["curl", "-fsS", "-m", "10", "http://orders:8080/orders"])
    assert again.returncode == 0 and '"source": "cluster"' in again.stdout


@pytest.mark.parametrize("host", ["10.96.0.21", "orders.shop.svc.cluster.local"])
def test_udp_reaches_the_cluster_and_the_reply_comes_from_there(example: None, host: str) -> None:
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(5)\n"
        f"s.connect(({host!r}, 9999))\n"
        "for i in range(5):\n"
        "    s.send(b'ping %d' % i)\n"
        "    data, peer = s.recvfrom(100)\n"
        "    assert data == b'ping %d' % i, data\n"
        "print(peer[0], peer[1])\n"
    )
    result = exec_in(APP, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10.96.0.21", "9999"]


def test_a_refused_cluster_port_is_refused_in_the_app_at_once(example: None) -> None:
    """The app's connect() fails as the target's does (ECONNREFUSED, curl's "Couldn't connect",
    7), not with a reset after a completed handshake (56)."""
    started = time.monotonic()
    result = exec_in(APP, ["curl", "-sS", "-m", "20", "http://orders.shop.svc.cluster.local:1/"])
    assert result.returncode == 7, result.stderr
    assert time.monotonic() - started < 5
    script = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('orders.shop.svc.cluster.local', 1), timeout=10)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
    )
    assert exec_in(APP, ["python3", "-c", script]).stdout == "refused\n"


def test_half_close_carries_through_the_tunnel(example: None) -> None:
    script = (
        "import socket\n"
        "body = b'x' * 300000\n"
        "s = socket.create_connection(('orders.shop.svc.cluster.local', 8080), timeout=10)\n"
        "s.sendall(b'POST /upload HTTP/1.0\\r\\nContent-Length: %d\\r\\n\\r\\n' % len(body))\n"
        "s.sendall(body)\n"
        "s.shutdown(socket.SHUT_WR)\n"  # done sending; the answer must still arrive
        "reply = b''\n"
        "while chunk := s.recv(65536):\n"
        "    reply += chunk\n"
        "print(reply.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    )
    result = exec_in(APP, ["python3", "-c", script])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"received": 300000}
