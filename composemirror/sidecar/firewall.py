"""The sidecar's firewall: iptables rules rendered as text, applied atomically.

Rules live in one nat chain jumped to first from OUTPUT. They send every DNS query of the shared
network namespace to the sidecar's DNS server, and new outgoing TCP connections that are not the
sidecar's own (marked), not loopback and not to the project's own networks to the transparent
proxy; connections to the DNS server's stand-in addresses always go to the proxies. Before that,
a mangle chain queues the SYNs of those same connections to the sidecar (NFQUEUE), which holds
each until the agent has answered: accepted, it goes on to the proxy; refused or unreachable, it
comes back marked and a filter rule answers the app with a reset or an ICMP error; timed out, it
is dropped. With UDP, a
mangle chain marks the same kind of outgoing UDP datagrams, a policy route sends marked packets
to loopback, and TPROXY hands them to the UDP proxy (IPv4 only). Docker's own DNS rules are left
as they are. Rendering is pure; `apply` runs iptables-restore on whichever backend (nft or
legacy) holds Docker's rules, and `ip` for the policy route. A `Guard` then keeps what was
installed in place: anything else in the namespace with NET_ADMIN (the app) can flush the
tables, so it compares them with a snapshot taken after `apply` and restores what went.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from composemirror.errors import SidecarError
from composemirror.filters import IPNetwork

log = logging.getLogger(__name__)

CHAIN = "COMPOSEMIRROR"
TPROXY_CHAIN = "COMPOSEMIRROR_TPROXY"
SYN_CHAIN = "COMPOSEMIRROR_SYN"
SYN_QUEUE = 0x434D
"""Netfilter queue number of the app's held SYNs (one namespace, one queue)."""
REFUSE_MARK = 0x4350
"""Mark of a held SYN the remote side refused: the filter rules answer it with a TCP reset."""
HOST_UNREACHABLE_MARK = 0x4351
"""Mark of a held SYN whose remote host was unreachable: ICMP host unreachable."""
NET_UNREACHABLE_MARK = 0x4352
"""Mark of a held SYN whose remote network was unreachable: ICMP network unreachable."""
TPROXY_MARK = 0x434E
"""Firewall mark of the app's UDP datagrams on their way to the UDP proxy (not the sidecar's)."""
ROUTE_TABLE = 100
"""Routing table that delivers TPROXY-marked packets locally (`local 0.0.0.0/0 dev lo`)."""
DOCKER_CHAINS = ("DOCKER_OUTPUT", "DOCKER_POSTROUTING")
"""Docker's nat chains for its embedded DNS (127.0.0.11), which the sidecar's own local lookups
need: a flush of the nat table removes them with ours, so the guard keeps them too."""
OUR_CHAINS = (CHAIN, TPROXY_CHAIN, SYN_CHAIN)
KEPT_CHAINS = (*OUR_CHAINS, *DOCKER_CHAINS)
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the rules must do."""

    mark: int
    """Packets of sockets with this mark are the sidecar's own and pass untouched."""
    dns_port: int
    proxy_port: int
    tcp: bool
    """Redirect outgoing TCP to the proxy (False leaves all TCP local)."""
    udp: bool = False
    """Send outgoing UDP (but DNS) to the UDP proxy on `udp_port` with TPROXY."""
    udp_port: int = 0
    udp_mark: int = TPROXY_MARK
    """Mark that routes an intercepted datagram to loopback; must differ from `mark`."""
    table: int = ROUTE_TABLE
    direct: Sequence[IPNetwork] = ()
    """Destinations that never need a decision (the project's networks), skipped in-kernel."""
    stand_ins: IPNetwork | None = None
    """The sidecar's stand-in addresses (`sidecar.dns.STAND_INS`): always sent to the proxies,
    before `direct` is skipped, since only the proxies know what they stand for."""
    syn_queue: int | None = None
    """Queue the SYNs of the connections the proxy gets to this netfilter queue, so the app's
    handshake completes only when the remote one did (None: the proxy's handshake completes it
    at once). The queue fails open: with no reader (`--queue-bypass`) or full, a SYN goes on to
    the proxy unheld, which then opens the stream after the handshake, as without a queue; the
    REDIRECT still applies, so nothing bypasses the filter."""
    refuse_mark: int = REFUSE_MARK
    host_unreachable_mark: int = HOST_UNREACHABLE_MARK
    net_unreachable_mark: int = NET_UNREACHABLE_MARK

    @property
    def answer_marks(self) -> tuple[tuple[int, str], ...]:
        """(mark, REJECT's `--reject-with`) of the held SYNs the rules answer."""
        return (
            (self.refuse_mark, "tcp-reset"),
            (self.host_unreachable_mark, "icmp-host-unreachable"),
            (self.net_unreachable_mark, "icmp-net-unreachable"),
        )


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that leads to one of ours; added once per namespace."""

    table: str
    chain: str
    rule: str

    @property
    def line(self) -> str:
        """The rule as iptables-save prints it."""
        return f"-A {self.chain} {self.rule}"


def jumps(plan: Plan) -> list[Jump]:
    """The jumps `plan` needs, by table."""
    needed = [Jump("nat", "OUTPUT", f"-j {CHAIN}")]
    if plan.syn_queue is not None:
        needed += [
            Jump("mangle", "OUTPUT", f"-p tcp -j {SYN_CHAIN}"),
            Jump("filter", "OUTPUT", f"-p tcp -j {CHAIN}"),
        ]
    if plan.udp:
        # Only UDP enters the mangle chains: TCP packets are not slowed by them.
        needed += [
            Jump("mangle", "OUTPUT", f"-p udp -j {CHAIN}"),
            Jump("mangle", "PREROUTING", f"-p udp -j {TPROXY_CHAIN}"),
        ]
    return needed


def render(plan: Plan, *, saved: Mapping[str, str] | None = None) -> str:
    """iptables-restore input for `plan`.

    `saved` is iptables-save's output per table: a jump already there (the sidecar restarted in
    the same namespace) is not added again. Our own chains are flushed by their declaration.
    """
    saved = saved or {}
    missing = [
        jump for jump in jumps(plan) if jump.line not in saved.get(jump.table, "").splitlines()
    ]
    rules = [
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -m mark --mark {plan.mark:#x} -j RETURN",
        # A held SYN that comes back marked is answered by the filter rules, not proxied.
        *(
            f"-A {CHAIN} -m mark --mark {mark:#x} -j RETURN"
            for mark, _ in (plan.answer_marks if plan.syn_queue is not None else ())
        ),
        f"-A {CHAIN} -p udp --dport 53 -j REDIRECT --to-ports {plan.dns_port}",
        f"-A {CHAIN} -p tcp --dport 53 -j REDIRECT --to-ports {plan.dns_port}",
        f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
        *(
            [f"-A {CHAIN} -d {plan.stand_ins} -p tcp -j REDIRECT --to-ports {plan.proxy_port}"]
            if plan.stand_ins
            else []
        ),
        *_skip_direct(plan),
    ]
    if plan.tcp:
        rules.append(f"-A {CHAIN} -p tcp -j REDIRECT --to-ports {plan.proxy_port}")
    rules += _insert(missing, "nat")
    rules.append("COMMIT")
    mangle: list[str] = []
    if plan.syn_queue is not None:
        mangle += _syn_queue_rules(plan)
    if plan.udp:
        mangle += [
            f":{CHAIN} - [0:0]",
            f":{TPROXY_CHAIN} - [0:0]",
            f"-A {CHAIN} -m mark --mark {plan.mark:#x} -j RETURN",
            f"-A {CHAIN} -p udp --dport 53 -j RETURN",
            f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
            *(
                [
                    f"-A {CHAIN} -d {plan.stand_ins} -p udp -j MARK --set-mark {plan.udp_mark:#x}",
                    f"-A {CHAIN} -d {plan.stand_ins} -j RETURN",
                ]
                if plan.stand_ins
                else []
            ),
            *_skip_direct(plan),
            # The namespace's own, broadcast and multicast addresses have no remote side.
            f"-A {CHAIN} -m addrtype --dst-type LOCAL,BROADCAST,MULTICAST -j RETURN",
            # Answers of the app to flows others started (a UDP server in the app) go as they are.
            f"-A {CHAIN} -m conntrack --ctdir REPLY -j RETURN",
            f"-A {CHAIN} -p udp -j MARK --set-mark {plan.udp_mark:#x}",
            f"-A {TPROXY_CHAIN} -p udp -m mark --mark {plan.udp_mark:#x} -j TPROXY "
            f"--on-ip 127.0.0.1 --on-port {plan.udp_port} --tproxy-mark {plan.udp_mark:#x}",
        ]
    if mangle:
        rules += ["*mangle", *mangle, *_insert(missing, "mangle"), "COMMIT"]
    if plan.syn_queue is not None:
        rules += [
            "*filter",
            f":{CHAIN} - [0:0]",
            *(
                f"-A {CHAIN} -p tcp -m mark --mark {mark:#x} -j REJECT --reject-with {reply}"
                for mark, reply in plan.answer_marks
            ),
            *_insert(missing, "filter"),
            "COMMIT",
        ]
    return "\n".join(rules) + "\n"


def route_commands(plan: Plan, rules: str) -> list[list[str]]:
    """`ip` commands that deliver marked packets locally, given `ip -4 rule show` output.

    Idempotent: the route is replaced, the rule is only added when it is not there yet.
    """
    if not plan.udp:
        return []
    commands = [
        [
            "ip",
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            str(plan.table),
        ]
    ]
    if not _has_rule(rules, plan.udp_mark, plan.table):
        commands.append(
            ["ip", "-4", "rule", "add", "fwmark", f"{plan.udp_mark:#x}", "lookup", str(plan.table)]
        )
    return commands


def apply(plan: Plan) -> str:
    """Install the rules; returns the iptables backend used. Raises SidecarError on failure."""
    if plan.udp:
        # The route comes first: a datagram marked before it exists would leave unproxied.
        _route(plan)
    backend = _backend()
    tables = {jump.table for jump in jumps(plan)}
    saved = {table: _run([f"{backend}-save", "-t", table]).stdout for table in tables}
    result = _run([f"{backend}-restore", "--noflush"], stdin=render(plan, saved=saved))
    if result.returncode != 0:
        raise SidecarError(
            f"{backend}-restore failed: {result.stderr.strip()} "
            "(the sidecar needs the NET_ADMIN capability; UDP interception "
            "also needs the kernel's TPROXY support)"
        )
    return backend


def _syn_queue_rules(plan: Plan) -> list[str]:
    """The mangle chain that queues the SYNs the nat chain will redirect to the proxy: its
    conditions, in the same order."""
    queue = f"-j NFQUEUE --queue-num {plan.syn_queue} --queue-bypass"
    return [
        f":{SYN_CHAIN} - [0:0]",
        f"-A {SYN_CHAIN} -p tcp ! --syn -j RETURN",
        f"-A {SYN_CHAIN} -m mark --mark {plan.mark:#x} -j RETURN",
        f"-A {SYN_CHAIN} -p tcp --dport 53 -j RETURN",
        f"-A {SYN_CHAIN} -d 127.0.0.0/8 -j RETURN",
        *([f"-A {SYN_CHAIN} -d {plan.stand_ins} -p tcp {queue}"] if plan.stand_ins else []),
        *(f"-A {SYN_CHAIN} -d {network} -j RETURN" for network in _direct(plan)),
        *([f"-A {SYN_CHAIN} -p tcp {queue}"] if plan.tcp else []),
    ]


def _direct(plan: Plan) -> list[IPNetwork]:
    return [network for network in plan.direct if network.version == 4]


def _skip_direct(plan: Plan) -> list[str]:
    return [f"-A {CHAIN} -d {network} -j RETURN" for network in plan.direct if network.version == 4]


def _insert(missing: Sequence[Jump], table: str) -> list[str]:
    return [f"-I {jump.chain} 1 {jump.rule}" for jump in missing if jump.table == table]


def _has_rule(rules: str, mark: int, table: int) -> bool:
    """Whether `ip rule show` output holds `fwmark MARK lookup TABLE`."""
    for line in rules.splitlines():
        words = line.split()
        pairs = dict(itertools.pairwise(words))
        # ip prints the mark in hex, and its mask only when it is not 0xffffffff.
        if pairs.get("fwmark") == f"{mark:#x}" and pairs.get("lookup") == str(table):
            return True
    return False


def _route(plan: Plan) -> None:
    try:
        listed = _run(["ip", "-4", "rule", "show"])
        for command in route_commands(plan, listed.stdout):
            result = _run(command)
            if result.returncode != 0:
                raise SidecarError(
                    f"`{' '.join(command)}` failed: {result.stderr.strip()} "
                    "(the sidecar needs the NET_ADMIN capability)"
                )
    except FileNotFoundError:
        raise SidecarError(
            "UDP interception needs `ip` (iproute2) in the sidecar image; "
            "install it there, or set x-composemirror.feature.network.outgoing."
            "udp: false"
        ) from None


def _backend() -> str:
    """`iptables-nft` or `iptables-legacy`: the one whose nat table holds Docker's DNS rules."""
    for backend in ("iptables-nft", "iptables-legacy"):
        try:
            if "DOCKER_OUTPUT" in _run([f"{backend}-save", "-t", "nat"]).stdout:
                return backend
        except FileNotFoundError:
            continue
    return "iptables"


def _run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class TableRules:
    """One table's part of what the guard keeps, as iptables-save prints it."""

    chains: Mapping[str, tuple[str, ...]]
    """Each kept chain (ours, Docker's DNS chains) that exists -> its rules (`-A CHAIN ...`)."""
    jumps: tuple[str, ...]
    """Rules of built-in chains that jump to a kept chain (`-A OUTPUT -j COMPOSEMIRROR`), in
    their order; ours come first in their chain."""


def parse_save(text: str) -> tuple[list[str], list[str]]:
    """iptables-save output of one table: (its declared chains, its rules), in order."""
    chains: list[str] = []
    rules: list[str] = []
    for line in text.splitlines():
        if line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line.strip())
    return chains, rules


def snapshot(saved: Mapping[str, str]) -> dict[str, TableRules]:
    """What to keep, per table, from iptables-save's output of each table (taken after
    `apply`)."""
    return {table: _table_rules(text) for table, text in saved.items()}


def _table_rules(text: str) -> TableRules:
    declared, rules = parse_save(text)
    chains = {
        chain: tuple(rule for rule in rules if _chain_of(rule) == chain)
        for chain in KEPT_CHAINS
        if chain in declared
    }
    jumps = tuple(
        rule for rule in rules if _chain_of(rule) in BUILTIN_CHAINS and _target(rule) in chains
    )
    return TableRules(chains=chains, jumps=jumps)


def drift(expected: Mapping[str, TableRules], saved: Mapping[str, str]) -> list[str]:
    """What differs between `expected` and iptables-save's output now, in words; empty when
    everything is in place. Our jumps must lead their built-in chain, as `render` put them."""
    found: list[str] = []
    for table, want in expected.items():
        have = _table_rules(saved.get(table, ""))
        for chain, rules in want.chains.items():
            if chain not in have.chains:
                found.append(f"{table} chain {chain} is gone")
            elif have.chains[chain] != rules:
                found.append(f"{table} chain {chain} lost or changed rules")
        _, current = parse_save(saved.get(table, ""))
        for jump in want.jumps:
            chain, target = _chain_of(jump), _target(jump)
            if jump not in have.jumps:
                found.append(f"{table} {chain} no longer jumps to {target}")
            elif target in OUR_CHAINS and not _leads(jump, want.jumps, current):
                found.append(f"{table} {chain} has rules before the jump to {target}")
    return found


def _leads(jump: str, jumps: Sequence[str], current: Sequence[str]) -> bool:
    """Whether our jumps of `jump`'s chain are that chain's first rules, in order."""
    chain = _chain_of(jump)
    ours = [j for j in jumps if _chain_of(j) == chain and _target(j) in OUR_CHAINS]
    return [r for r in current if _chain_of(r) == chain][: len(ours)] == ours


def repair(expected: Mapping[str, TableRules], saved: Mapping[str, str]) -> str:
    """iptables-restore input (for `--noflush`) that puts `expected` back in the tables that
    drifted, leaving every other rule as it is: kept chains are declared again (which empties
    them) and refilled, their jumps deleted where present and inserted again in order at the
    head of their built-in chain."""
    lines: list[str] = []
    for table, want in expected.items():
        if not drift({table: want}, saved):
            continue
        _, current = parse_save(saved.get(table, ""))
        lines += [f"*{table}", *(f":{chain} - [0:0]" for chain in want.chains)]
        lines += [
            "-D" + rule[2:]
            for rule in current
            if _chain_of(rule) in BUILTIN_CHAINS and _target(rule) in want.chains
        ]
        lines += [rule for rules in want.chains.values() for rule in rules]
        position: dict[str, int] = {}
        for jump in want.jumps:
            chain = _chain_of(jump)
            position[chain] = position.get(chain, 0) + 1
            lines.append(f"-I {chain} {position[chain]}{jump[3 + len(chain) :]}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def _chain_of(rule: str) -> str:
    words = rule.split()
    return words[1] if len(words) > 1 else ""


def _target(rule: str) -> str:
    words = rule.split()
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "--jump"):
            return value
    return ""


class Guard:
    """Keeps the rules `apply` installed: `check()` compares the tables with the snapshot taken
    at start and restores what is missing, and `report()` says what it found.

    Blocking (it runs iptables-save, iptables-restore and ip): call it from a thread.
    """

    def __init__(self, plan: Plan, backend: str, clock: Any = time.time) -> None:
        self.plan = plan
        self.backend = backend
        self.clock = clock
        self.tables = sorted({jump.table for jump in jumps(plan)})
        self.expected = snapshot(self._save())
        self.state = "in place"
        """`in place`, or `failed` when the rules could not be restored."""
        self.checked = self.clock()
        """Unix time of the last check."""
        self.restored = 0
        """How many times something had removed rules and they were put back."""
        self.restored_at: float | None = None
        self.drift: str | None = None
        """What was missing the last time rules were restored (or could not be)."""
        self.error: str | None = None

    def check(self) -> None:
        """Compare the tables with the snapshot; restore what drifted. Never raises for the
        firewall's own failures: they are the report's `failed` state."""
        try:
            saved = self._save()
            found = drift(self.expected, saved)
            missing_route = self.plan.udp and not _has_rule(
                _run(["ip", "-4", "rule", "show"]).stdout, self.plan.udp_mark, self.plan.table
            )
            if missing_route:
                found.append(f"the policy rule for fwmark {self.plan.udp_mark:#x} is gone")
            if found:
                self.drift = "; ".join(found)
                log.warning("interception rules changed by another process: %s", self.drift)
                if missing_route:
                    _route(self.plan)
                text = repair(self.expected, saved)
                if text:
                    result = _run([f"{self.backend}-restore", "--noflush"], stdin=text)
                    if result.returncode != 0:
                        raise SidecarError(f"{self.backend}-restore: {result.stderr.strip()}")
                self.restored += 1
                self.restored_at = self.clock()
                log.warning("interception rules restored")
            self.state, self.error = "in place", None
        except (OSError, subprocess.SubprocessError, SidecarError) as e:
            self.state, self.error = "failed", str(e)
            log.error("cannot restore the interception rules: %s", e)
        self.checked = self.clock()

    def report(self) -> dict[str, Any]:
        """The `rules` part of the sidecar's status report."""
        return {
            "state": self.state,
            "checked": self.checked,
            "restored": self.restored,
            "restored_at": self.restored_at,
            "drift": self.drift,
            "error": self.error,
        }

    def _save(self) -> dict[str, str]:
        return {table: _run([f"{self.backend}-save", "-t", table]).stdout for table in self.tables}
