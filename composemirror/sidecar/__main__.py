"""`python -m composemirror.sidecar`: own the shared network namespace until stopped.

Start order matters: the DNS server and the proxies listen first, then the firewall redirects the
namespace's traffic to them. The tunnel to the agent connects in the background (until it does,
remote traffic fails fast); once it has, the ready file tells compose the app may start. The
rules are checked every `RULES_INTERVAL` seconds and restored when something removed them.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from composemirror import tasks
from composemirror.errors import ComposeMirrorError, SidecarError
from composemirror.filters import IPAddress, IPNetwork, Scope
from composemirror.link import ENV_VAR, READY_FILE, STATUS_FILE, SidecarSettings
from composemirror.protocol import key_from_text
from composemirror.sidecar import dns, firewall, status
from composemirror.sidecar.proxy import AppConnection, Egress, Proxy
from composemirror.sidecar.settings import DNS_PORT, MARK, PROXY_PORT, UDP_PROXY_PORT
from composemirror.sidecar.synqueue import Marks, SynQueue
from composemirror.sidecar.tunnel import TunnelClient
from composemirror.sidecar.udp import UdpProxy

log = logging.getLogger("composemirror.sidecar")


def local_networks(route_table: str) -> list[IPNetwork]:
    """Directly connected IPv4 networks from /proc/net/route: the project's networks."""
    networks: list[IPNetwork] = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[2] != "00000000" or fields[1] == "00000000":
            continue
        destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        networks.append(ipaddress.ip_network(f"{destination}/{mask}", strict=False))
    return networks


def own_addresses(fib_trie: str) -> list[str]:
    """The namespace's own IPv4 addresses but loopback, from /proc/net/fib_trie (an address
    line followed by `/32 host LOCAL`), once each."""
    found: list[str] = []
    last = ""
    for line in fib_trie.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "|--":
            last = words[1]
        elif words == ["/32", "host", "LOCAL"] and last and not last.startswith("127."):
            found.append(last)
    return list(dict.fromkeys(found))


def hosts_addresses(table: dict[str, list[str]]) -> frozenset[IPAddress]:
    """The addresses of an /etc/hosts table (`dns.read_hosts_file`) that parse as addresses."""
    found: set[IPAddress] = set()
    for addresses in table.values():
        for text in addresses:
            try:
                found.add(ipaddress.ip_address(text.split("%")[0]))
            except ValueError:
                continue
    return frozenset(found)


def global_ipv6(if_inet6: str) -> list[str]:
    """The namespace's IPv6 addresses of global scope, from /proc/net/if_inet6 (the fourth
    field is the scope: 00 global, 20 link, 10 host)."""
    found = []
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == "00":
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def refuse_ipv6(if_inet6: str) -> None:
    """Raise SidecarError when the namespace has a global IPv6 address: the firewall has IPv4
    rules only, so IPv6 traffic would pass it unfiltered and untunnelled."""
    addresses = global_ipv6(if_inet6)
    if addresses:
        raise SidecarError(
            f"the network namespace has IPv6 addresses ({', '.join(addresses)}), which "
            "composemirror does not intercept: the app's IPv6 traffic would bypass the filter "
            "and the tunnel; attach the mirrored service to IPv4-only networks"
        )


async def run(settings: SidecarSettings) -> None:
    async with tasks.scope() as spawner:
        await serve(settings, spawner)


RULES_INTERVAL = 2.0
"""Seconds between two checks of the interception rules."""


async def keep_rules(guard: firewall.Guard, interval: float = RULES_INTERVAL) -> None:
    """Check (and restore) the rules every `interval` seconds, off the event loop."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(guard.check)


async def serve(settings: SidecarSettings, spawner: tasks.Tasks) -> None:
    """Take over the namespace and serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    # A restarted container keeps its files: health is earned again in the new namespace.
    Path(READY_FILE).unlink(missing_ok=True)
    try:
        key = key_from_text(Path(settings.key_file).read_text())
    except (OSError, ValueError) as e:
        raise SidecarError(f"cannot read the tunnel key {settings.key_file}: {e}") from e
    inet6 = Path("/proc/net/if_inet6")  # absent where the kernel has IPv6 off
    refuse_ipv6(inet6.read_text() if inet6.exists() else "")
    networks = local_networks(Path("/proc/net/route").read_text())
    static = dns.read_hosts_file(Path("/etc/hosts"))
    scope = Scope(
        names=frozenset(settings.names),
        networks=tuple(networks),
        addresses=hosts_addresses(static),
    )
    outgoing = settings.outgoing.parse(protocols=True) if settings.outgoing else None
    dns_filter = settings.dns.parse(protocols=False) if settings.dns else None
    counters = status.Counters()
    tunnels = TunnelClient(settings.link, key, mark=MARK)
    book = dns.Book.deciding(outgoing, scope)
    resolver = dns.Resolver(
        tunnels=tunnels,
        book=book,
        counters=counters,
        scope=scope,
        hosts=dict(settings.hosts),
        dns_filter=dns_filter,
        outgoing=outgoing,
        remote_enabled=settings.dns_enabled,
        mark=MARK,
        search=dns.read_search(),
    )
    await resolver.learn_domains(own_addresses(Path("/proc/net/fib_trie").read_text()))
    dns.UdpServer(resolver, spawner).listen(("127.0.0.1", DNS_PORT))
    dns_tcp = await asyncio.start_server(
        functools.partial(dns.serve_tcp, resolver), "127.0.0.1", DNS_PORT
    )
    egress = Egress(
        tunnels=tunnels,
        book=book,
        resolver=resolver,
        counters=counters,
        scope=scope,
        outgoing=outgoing,
        mark=MARK,
    )
    proxy = Proxy(egress, spawner)
    # The queue is read before the rules send SYNs to it (until then they would pass unheld).
    syns = SynQueue(
        firewall.SYN_QUEUE,
        Marks(
            refuse=firewall.REFUSE_MARK,
            host_unreachable=firewall.HOST_UNREACHABLE_MARK,
            net_unreachable=firewall.NET_UNREACHABLE_MARK,
        ),
        egress,
        lambda: AppConnection(proxy),
    )
    syns.open()
    proxy.syns = syns
    proxy_server = await loop.create_server(
        proxy.accept, "127.0.0.1", PROXY_PORT, backlog=4096, reuse_address=True
    )
    for server in (dns_tcp, proxy_server):
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    udp_proxy: UdpProxy | None = None
    if settings.udp:
        udp_proxy = UdpProxy(egress, spawner)
        udp_proxy.listen(("127.0.0.1", UDP_PROXY_PORT))
    # With a remote list, the project's own addresses may be listed remote: the proxy decides.
    direct = networks if outgoing is None or outgoing.mode == "local" else []
    plan = firewall.Plan(
        mark=MARK,
        dns_port=DNS_PORT,
        proxy_port=PROXY_PORT,
        tcp=settings.tcp,
        udp=settings.udp,
        udp_port=UDP_PROXY_PORT,
        direct=direct,
        stand_ins=dns.STAND_INS,
        syn_queue=firewall.SYN_QUEUE,
    )
    backend = firewall.apply(plan)
    guard = firewall.Guard(plan, backend)
    log.info(
        "%s: firewall set (%s; tcp %s, udp %s); local networks %s",
        settings.service,
        backend,
        "proxied" if settings.tcp else "direct",
        "proxied" if settings.udp else "direct",
        ", ".join(map(str, networks)) or "none",
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    report = functools.partial(lambda: status.report(counters, tunnels.report(), guard.report()))
    health = status.Health(link_state=lambda: tunnels.state, rules_state=lambda: guard.state)
    # Helpers: an error in one is logged and it starts again; the sidecar never dies of it.
    spawner.keep(tunnels.run, name="agent link")
    spawner.keep(lambda: status.publish(Path(STATUS_FILE), report), name="status file")
    spawner.keep(lambda: keep_rules(guard), name="rules guard")
    spawner.keep(lambda: status.keep_ready(Path(READY_FILE), health.healthy), name="ready file")
    try:
        await stop.wait()  # then the scope cancels the services and the connections' tasks
    finally:
        syns.close()
        if udp_proxy is not None:
            udp_proxy.close()


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("COMPOSEMIRROR_LOG", "INFO"),
        format="sidecar %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    settings = SidecarSettings.from_json(os.environ[ENV_VAR])
    try:
        asyncio.run(run(settings))
    except* ComposeMirrorError as group:
        for error in group.exceptions:
            log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
