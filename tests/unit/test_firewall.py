"""Tests of composemirror.sidecar.firewall: the rules and routes a sidecar installs, as text."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from composemirror.sidecar import firewall
from composemirror.sidecar.firewall import (
    Guard,
    Plan,
    drift,
    render,
    repair,
    route_commands,
    snapshot,
)

MARK = 0x434D
UDP_MARK = 0x434E
PROJECT = ipaddress.ip_network("172.20.0.0/16")
SECOND = ipaddress.ip_network("10.5.0.0/24")
IPV6 = ipaddress.ip_network("fd00:1::/64")

NAT_HEAD = [
    "*nat",
    ":COMPOSEMIRROR - [0:0]",
    "-A COMPOSEMIRROR -m mark --mark 0x434d -j RETURN",
    "-A COMPOSEMIRROR -p udp --dport 53 -j REDIRECT --to-ports 53",
    "-A COMPOSEMIRROR -p tcp --dport 53 -j REDIRECT --to-ports 53",
    "-A COMPOSEMIRROR -d 127.0.0.0/8 -j RETURN",
]
TCP_TO_PROXY = "-A COMPOSEMIRROR -p tcp -j REDIRECT --to-ports 15001"
NAT_JUMP = "-I OUTPUT 1 -j COMPOSEMIRROR"
MANGLE_HEAD = [
    "*mangle",
    ":COMPOSEMIRROR - [0:0]",
    ":COMPOSEMIRROR_TPROXY - [0:0]",
    "-A COMPOSEMIRROR -m mark --mark 0x434d -j RETURN",
    "-A COMPOSEMIRROR -p udp --dport 53 -j RETURN",
    "-A COMPOSEMIRROR -d 127.0.0.0/8 -j RETURN",
]
MANGLE_TAIL = [
    "-A COMPOSEMIRROR -m addrtype --dst-type LOCAL,BROADCAST,MULTICAST -j RETURN",
    "-A COMPOSEMIRROR -m conntrack --ctdir REPLY -j RETURN",
    "-A COMPOSEMIRROR -p udp -j MARK --set-mark 0x434e",
    "-A COMPOSEMIRROR_TPROXY -p udp -m mark --mark 0x434e -j TPROXY"
    " --on-ip 127.0.0.1 --on-port 15002 --tproxy-mark 0x434e",
]
MANGLE_JUMPS = [
    "-I OUTPUT 1 -p udp -j COMPOSEMIRROR",
    "-I PREROUTING 1 -p udp -j COMPOSEMIRROR_TPROXY",
]
# What iptables-save prints once the jumps are in place (a sidecar restarted in its namespace).
SAVED_NAT = (
    "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j COMPOSEMIRROR\n"
    "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT\nCOMMIT\n"
)
SAVED_MANGLE = (
    "*mangle\n-A PREROUTING -p udp -j COMPOSEMIRROR_TPROXY\n"
    "-A OUTPUT -p udp -j COMPOSEMIRROR\nCOMMIT\n"
)


def plan(
    *,
    tcp: bool = True,
    udp: bool = False,
    direct: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
) -> Plan:
    return Plan(
        mark=MARK, dns_port=53, proxy_port=15001, tcp=tcp, udp=udp, udp_port=15002, direct=direct
    )


def skip(*networks: str) -> list[str]:
    return [f"-A COMPOSEMIRROR -d {network} -j RETURN" for network in networks]


@pytest.mark.parametrize(
    ("given", "saved", "expected"),
    [
        pytest.param(
            plan(),
            None,
            [*NAT_HEAD, TCP_TO_PROXY, NAT_JUMP, "COMMIT"],
            id="tcp only, first run: the rules as they always were",
        ),
        pytest.param(
            plan(tcp=False),
            None,
            [*NAT_HEAD, NAT_JUMP, "COMMIT"],
            id="tcp off: only DNS is redirected",
        ),
        pytest.param(
            plan(direct=(PROJECT, IPV6, SECOND)),
            None,
            [*NAT_HEAD, *skip("172.20.0.0/16", "10.5.0.0/24"), TCP_TO_PROXY, NAT_JUMP, "COMMIT"],
            id="direct networks skip the proxy; IPv6 ones are left out",
        ),
        pytest.param(
            plan(),
            {"nat": SAVED_NAT},
            [*NAT_HEAD, TCP_TO_PROXY, "COMMIT"],
            id="restart: the OUTPUT jump is not added twice",
        ),
        pytest.param(
            plan(udp=True),
            None,
            [
                *NAT_HEAD,
                TCP_TO_PROXY,
                NAT_JUMP,
                "COMMIT",
                *MANGLE_HEAD,
                *MANGLE_TAIL,
                *MANGLE_JUMPS,
                "COMMIT",
            ],
            id="udp: datagrams are marked in OUTPUT and handed to TPROXY in PREROUTING",
        ),
        pytest.param(
            plan(udp=True, tcp=False, direct=(PROJECT,)),
            None,
            [
                *NAT_HEAD,
                *skip("172.20.0.0/16"),
                NAT_JUMP,
                "COMMIT",
                *MANGLE_HEAD,
                *skip("172.20.0.0/16"),
                *MANGLE_TAIL,
                *MANGLE_JUMPS,
                "COMMIT",
            ],
            id="udp without tcp, direct networks skipped in both tables",
        ),
        pytest.param(
            plan(udp=True),
            {"nat": SAVED_NAT, "mangle": SAVED_MANGLE},
            [*NAT_HEAD, TCP_TO_PROXY, "COMMIT", *MANGLE_HEAD, *MANGLE_TAIL, "COMMIT"],
            id="udp restart: no jump is added twice",
        ),
        pytest.param(
            plan(udp=True),
            {"nat": SAVED_NAT, "mangle": "*mangle\nCOMMIT\n"},
            [
                *NAT_HEAD,
                TCP_TO_PROXY,
                "COMMIT",
                *MANGLE_HEAD,
                *MANGLE_TAIL,
                *MANGLE_JUMPS,
                "COMMIT",
            ],
            id="udp turned on in a namespace that had only tcp: the mangle jumps are added",
        ),
    ],
)
def test_render(given: Plan, saved: dict[str, str] | None, expected: list[str]) -> None:
    assert render(given, saved=saved).splitlines() == expected


def test_udp_rules_never_catch_the_sidecars_own_datagrams_or_dns() -> None:
    rules = render(plan(udp=True)).split("*mangle")[1].splitlines()
    marking = rules.index("-A COMPOSEMIRROR -p udp -j MARK --set-mark 0x434e")
    returns = rules[:marking]
    assert "-A COMPOSEMIRROR -m mark --mark 0x434d -j RETURN" in returns
    assert "-A COMPOSEMIRROR -p udp --dport 53 -j RETURN" in returns


def test_marks_and_ports_come_from_the_plan() -> None:
    text = render(
        Plan(
            mark=0x10, dns_port=5353, proxy_port=1, tcp=True, udp=True, udp_port=2000, udp_mark=0x20
        )
    )
    assert "-A COMPOSEMIRROR -m mark --mark 0x10 -j RETURN" in text
    assert "-A COMPOSEMIRROR -p udp --dport 53 -j REDIRECT --to-ports 5353" in text
    assert "-A COMPOSEMIRROR -p udp -j MARK --set-mark 0x20" in text
    assert "--on-port 2000 --tproxy-mark 0x20" in text


ROUTE = ["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]
RULE = ["ip", "-4", "rule", "add", "fwmark", "0x434e", "lookup", "100"]
FRESH_RULES = (
    "0:\tfrom all lookup local\n32766:\tfrom all lookup main\n32767:\tfrom all lookup default\n"
)


@pytest.mark.parametrize(
    ("given", "rules", "expected"),
    [
        pytest.param(plan(), FRESH_RULES, [], id="no udp: no routing"),
        pytest.param(plan(udp=True), FRESH_RULES, [ROUTE, RULE], id="first run"),
        pytest.param(
            plan(udp=True),
            FRESH_RULES + "32765:\tfrom all fwmark 0x434e lookup 100\n",
            [ROUTE],
            id="restart: the rule is there already",
        ),
        pytest.param(
            plan(udp=True),
            "32765:\tfrom all fwmark 0x434e lookup 200\n",
            [ROUTE, RULE],
            id="a rule for another table does not count",
        ),
        pytest.param(
            plan(udp=True),
            "32765:\tfrom all fwmark 0x434d lookup 100\n",
            [ROUTE, RULE],
            id="a rule for another mark does not count",
        ),
    ],
)
def test_route_commands(given: Plan, rules: str, expected: list[list[str]]) -> None:
    assert route_commands(given, rules) == expected


# -- the guard: what is kept, what drifted, how it is put back ----------------------------------

AFTER_APPLY = {
    "nat": """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:COMPOSEMIRROR - [0:0]
:DOCKER_OUTPUT - [0:0]
:DOCKER_POSTROUTING - [0:0]
-A OUTPUT -j COMPOSEMIRROR
-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT
-A POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING
-A COMPOSEMIRROR -m mark --mark 0x434d -j RETURN
-A COMPOSEMIRROR -p udp -m udp --dport 53 -j REDIRECT --to-ports 53
-A COMPOSEMIRROR -p tcp -j REDIRECT --to-ports 15001
-A DOCKER_OUTPUT -d 127.0.0.11/32 -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.11:36004
-A DOCKER_POSTROUTING -s 127.0.0.11/32 -p udp -m udp --sport 36004 -j SNAT --to-source :53
COMMIT
""",
    "mangle": """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:COMPOSEMIRROR - [0:0]
:COMPOSEMIRROR_TPROXY - [0:0]
-A PREROUTING -p udp -j COMPOSEMIRROR_TPROXY
-A OUTPUT -p udp -j COMPOSEMIRROR
-A COMPOSEMIRROR -p udp -j MARK --set-xmark 0x434e/0xffffffff
-A COMPOSEMIRROR_TPROXY -p udp -m mark --mark 0x434e -j TPROXY --on-port 15002
COMMIT
""",
}
"""What iptables-nft-save printed in a sidecar's namespace after `apply` (shortened)."""
FLUSHED_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:COMPOSEMIRROR - [0:0]
:DOCKER_OUTPUT - [0:0]
:DOCKER_POSTROUTING - [0:0]
COMMIT
"""
"""The nat table after `iptables -t nat -F` in the app (chains stay, empty)."""


def test_the_snapshot_keeps_our_chains_dockers_dns_chains_and_their_jumps() -> None:
    kept = snapshot(AFTER_APPLY)
    assert list(kept["nat"].chains) == ["COMPOSEMIRROR", "DOCKER_OUTPUT", "DOCKER_POSTROUTING"]
    assert kept["nat"].jumps == (
        "-A OUTPUT -j COMPOSEMIRROR",
        "-A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT",
        "-A POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING",
    )
    assert len(kept["nat"].chains["COMPOSEMIRROR"]) == 3
    assert kept["mangle"].jumps == (
        "-A PREROUTING -p udp -j COMPOSEMIRROR_TPROXY",
        "-A OUTPUT -p udp -j COMPOSEMIRROR",
    )


def test_nothing_drifted_right_after_apply_and_others_rules_do_not_count() -> None:
    assert drift(snapshot(AFTER_APPLY), AFTER_APPLY) == []
    assert repair(snapshot(AFTER_APPLY), AFTER_APPLY) == ""
    # The app adds rules of its own after ours: still in place.
    added = AFTER_APPLY["nat"].replace("COMMIT", "-A POSTROUTING -o wg0 -j MASQUERADE\nCOMMIT")
    assert drift(snapshot(AFTER_APPLY), {**AFTER_APPLY, "nat": added}) == []


@pytest.mark.parametrize(
    ("nat", "expected"),
    [
        (
            FLUSHED_NAT,
            [
                "nat chain COMPOSEMIRROR lost or changed rules",
                "nat chain DOCKER_OUTPUT lost or changed rules",
                "nat chain DOCKER_POSTROUTING lost or changed rules",
                "nat OUTPUT no longer jumps to COMPOSEMIRROR",
                "nat OUTPUT no longer jumps to DOCKER_OUTPUT",
                "nat POSTROUTING no longer jumps to DOCKER_POSTROUTING",
            ],
        ),
        (
            AFTER_APPLY["nat"].replace(
                "-A OUTPUT -j COMPOSEMIRROR\n",
                "-A OUTPUT -p tcp -j ACCEPT\n-A OUTPUT -j COMPOSEMIRROR\n",
            ),
            ["nat OUTPUT has rules before the jump to COMPOSEMIRROR"],
        ),
        (
            "\n".join(
                line for line in AFTER_APPLY["nat"].splitlines() if "COMPOSEMIRROR" not in line
            ),
            ["nat chain COMPOSEMIRROR is gone", "nat OUTPUT no longer jumps to COMPOSEMIRROR"],
        ),
    ],
    ids=["flushed", "bypassed", "deleted"],
)
def test_drift_says_what_went(nat: str, expected: list[str]) -> None:
    assert drift(snapshot(AFTER_APPLY), {**AFTER_APPLY, "nat": nat}) == expected


def test_repair_refills_the_chains_and_puts_our_jumps_first_again() -> None:
    bypassed = AFTER_APPLY["nat"].replace(
        "-A OUTPUT -j COMPOSEMIRROR\n", "-A OUTPUT -p tcp -j ACCEPT\n-A OUTPUT -j COMPOSEMIRROR\n"
    )
    text = repair(snapshot(AFTER_APPLY), {**AFTER_APPLY, "nat": bypassed})
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"  # mangle did not drift: untouched
    assert lines[1:4] == [
        ":COMPOSEMIRROR - [0:0]",
        ":DOCKER_OUTPUT - [0:0]",
        ":DOCKER_POSTROUTING - [0:0]",
    ]
    assert lines[4:7] == [
        "-D OUTPUT -j COMPOSEMIRROR",
        "-D OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT",
        "-D POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING",
    ]
    assert "-A COMPOSEMIRROR -p tcp -j REDIRECT --to-ports 15001" in lines
    assert lines[-4:-1] == [
        "-I OUTPUT 1 -j COMPOSEMIRROR",
        "-I OUTPUT 2 -d 127.0.0.11/32 -j DOCKER_OUTPUT",
        "-I POSTROUTING 1 -d 127.0.0.11/32 -j DOCKER_POSTROUTING",
    ]
    assert "ACCEPT" not in text  # the app's own rule stays where it is


def test_repair_of_a_flushed_table_deletes_no_jump_that_is_not_there() -> None:
    text = repair(snapshot(AFTER_APPLY), {**AFTER_APPLY, "nat": FLUSHED_NAT})
    assert not [line for line in text.splitlines() if line.startswith("-D")]
    assert "-I OUTPUT 1 -j COMPOSEMIRROR" in text


class FakeTables:
    """iptables-save/-restore and ip over in-memory tables, for the Guard."""

    def __init__(self) -> None:
        self.saved = dict(AFTER_APPLY)
        self.restored: list[str] = []
        self.fail = False

    def run(self, command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if command[0].endswith("-save"):
            return subprocess.CompletedProcess(command, 0, self.saved[command[-1]], "")
        if command[0].endswith("-restore"):
            assert stdin is not None
            self.restored.append(stdin)
            if self.fail:
                return subprocess.CompletedProcess(command, 1, "", "Permission denied")
            self.saved = dict(AFTER_APPLY)
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 0, "0: from all fwmark 0x434e lookup 100\n", "")


def test_the_guard_restores_a_flushed_table_and_reports_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tables = FakeTables()
    monkeypatch.setattr(firewall, "_run", tables.run)
    clock = iter(range(100, 200)).__next__
    guard = Guard(plan(udp=True), "iptables-nft", clock=clock)
    guard.check()
    assert guard.report() == {
        "state": "in place",
        "checked": 101,
        "restored": 0,
        "restored_at": None,
        "drift": None,
        "error": None,
    }
    tables.saved["nat"] = FLUSHED_NAT
    guard.check()
    report = guard.report()
    assert (report["state"], report["restored"], report["restored_at"]) == ("in place", 1, 102)
    assert report["drift"].startswith("nat chain COMPOSEMIRROR lost or changed rules")
    assert tables.restored[-1].startswith("*nat\n")
    tables.saved["nat"] = FLUSHED_NAT
    tables.fail = True
    guard.check()
    assert guard.report()["state"] == "failed"
    assert "Permission denied" in guard.report()["error"]


# -- the held SYNs' rules (issue 10, fault 2) ---------------------------------------------------

SYN_PLAN = Plan(
    mark=MARK,
    dns_port=53,
    proxy_port=15001,
    tcp=True,
    direct=(PROJECT,),
    stand_ins=ipaddress.ip_network("198.18.0.0/15"),
    syn_queue=7,
)
QUEUE = "-j NFQUEUE --queue-num 7 --queue-bypass"
ANSWER = "-A COMPOSEMIRROR -p tcp -m mark --mark"


def test_syns_are_queued_under_the_nat_chains_own_conditions_and_answers_are_rejected() -> None:
    lines = render(SYN_PLAN).splitlines()
    nat = lines[: lines.index("COMMIT") + 1]
    # A SYN that comes back with an answer's mark is not proxied.
    assert nat[3:6] == [f"-A COMPOSEMIRROR -m mark --mark {mark} -j RETURN" for mark in (
        "0x4350", "0x4351", "0x4352")]  # fmt: skip
    rest = lines[len(nat) :]
    assert rest == [
        "*mangle",
        ":COMPOSEMIRROR_SYN - [0:0]",
        "-A COMPOSEMIRROR_SYN -p tcp ! --syn -j RETURN",
        "-A COMPOSEMIRROR_SYN -m mark --mark 0x434d -j RETURN",
        "-A COMPOSEMIRROR_SYN -p tcp --dport 53 -j RETURN",
        "-A COMPOSEMIRROR_SYN -d 127.0.0.0/8 -j RETURN",
        f"-A COMPOSEMIRROR_SYN -d 198.18.0.0/15 -p tcp {QUEUE}",
        "-A COMPOSEMIRROR_SYN -d 172.20.0.0/16 -j RETURN",
        f"-A COMPOSEMIRROR_SYN -p tcp {QUEUE}",
        "-I OUTPUT 1 -p tcp -j COMPOSEMIRROR_SYN",
        "COMMIT",
        "*filter",
        ":COMPOSEMIRROR - [0:0]",
        f"{ANSWER} 0x4350 -j REJECT --reject-with tcp-reset",
        f"{ANSWER} 0x4351 -j REJECT --reject-with icmp-host-unreachable",
        f"{ANSWER} 0x4352 -j REJECT --reject-with icmp-net-unreachable",
        "-I OUTPUT 1 -p tcp -j COMPOSEMIRROR",
        "COMMIT",
    ]


def test_with_udp_too_the_mangle_table_is_declared_once_with_both_chains() -> None:
    text = render(Plan(mark=MARK, dns_port=53, proxy_port=15001, tcp=True, udp=True,
                       udp_port=15002, syn_queue=7))  # fmt: skip
    assert text.count("*mangle") == 1
    mangle = text[text.index("*mangle") : text.index("*filter")]
    assert ":COMPOSEMIRROR_SYN - [0:0]" in mangle and ":COMPOSEMIRROR_TPROXY - [0:0]" in mangle
    assert "-I OUTPUT 1 -p tcp -j COMPOSEMIRROR_SYN" in mangle
    assert "-I OUTPUT 1 -p udp -j COMPOSEMIRROR" in mangle


def test_without_tcp_only_stand_in_syns_are_queued() -> None:
    text = render(
        Plan(mark=MARK, dns_port=53, proxy_port=15001, tcp=False, syn_queue=7,
             stand_ins=ipaddress.ip_network("198.18.0.0/15"))
    )  # fmt: skip
    assert [line for line in text.splitlines() if "NFQUEUE" in line] == [
        f"-A COMPOSEMIRROR_SYN -d 198.18.0.0/15 -p tcp {QUEUE}"
    ]


SYN_SAVED = {
    "mangle": """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:COMPOSEMIRROR_SYN - [0:0]
-A OUTPUT -p tcp -j COMPOSEMIRROR_SYN
-A COMPOSEMIRROR_SYN -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -j RETURN
-A COMPOSEMIRROR_SYN -m mark --mark 0x434d -j RETURN
-A COMPOSEMIRROR_SYN -p tcp -m tcp --dport 53 -j RETURN
-A COMPOSEMIRROR_SYN -d 127.0.0.0/8 -j RETURN
-A COMPOSEMIRROR_SYN -d 198.18.0.0/15 -p tcp -j NFQUEUE --queue-num 7 --queue-bypass
-A COMPOSEMIRROR_SYN -d 172.20.0.0/16 -j RETURN
-A COMPOSEMIRROR_SYN -p tcp -j NFQUEUE --queue-num 7 --queue-bypass
COMMIT
""",
    "filter": """*filter
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:COMPOSEMIRROR - [0:0]
-A OUTPUT -p tcp -j COMPOSEMIRROR
-A COMPOSEMIRROR -p tcp -m mark --mark 0x4350 -j REJECT --reject-with tcp-reset
-A COMPOSEMIRROR -p tcp -m mark --mark 0x4351 -j REJECT --reject-with icmp-host-unreachable
-A COMPOSEMIRROR -p tcp -m mark --mark 0x4352 -j REJECT --reject-with icmp-net-unreachable
COMMIT
""",
}
"""What iptables-nft-save printed after `apply` of `SYN_PLAN`'s mangle and filter parts."""


def test_the_guard_keeps_the_syn_queue_and_the_answers() -> None:
    kept = snapshot(SYN_SAVED)
    assert kept["mangle"].jumps == ("-A OUTPUT -p tcp -j COMPOSEMIRROR_SYN",)
    assert kept["filter"].jumps == ("-A OUTPUT -p tcp -j COMPOSEMIRROR",)
    assert drift(kept, SYN_SAVED) == []
    flushed = {
        "mangle": "*mangle\n:OUTPUT ACCEPT [0:0]\n:COMPOSEMIRROR_SYN - [0:0]\nCOMMIT\n",
        "filter": "*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
    }
    assert drift(kept, flushed) == [
        "mangle chain COMPOSEMIRROR_SYN lost or changed rules",
        "mangle OUTPUT no longer jumps to COMPOSEMIRROR_SYN",
        "filter chain COMPOSEMIRROR is gone",
        "filter OUTPUT no longer jumps to COMPOSEMIRROR",
    ]
    text = repair(kept, flushed)
    assert "-A COMPOSEMIRROR_SYN -p tcp -j NFQUEUE --queue-num 7 --queue-bypass" in text
    assert "-I OUTPUT 1 -p tcp -j COMPOSEMIRROR_SYN" in text
    assert "-A COMPOSEMIRROR -p tcp -m mark --mark 0x4350 -j REJECT --reject-with tcp-reset" in text
    # Rules put before the queue's jump let SYNs pass unheld: that is drift too.
    bypassed = SYN_SAVED["mangle"].replace(
        "-A OUTPUT -p tcp -j COMPOSEMIRROR_SYN\n",
        "-A OUTPUT -p tcp -j ACCEPT\n-A OUTPUT -p tcp -j COMPOSEMIRROR_SYN\n",
    )
    assert drift(kept, {**SYN_SAVED, "mangle": bypassed}) == [
        "mangle OUTPUT has rules before the jump to COMPOSEMIRROR_SYN"
    ]


def test_the_guard_reads_every_table_the_plan_uses() -> None:
    assert sorted({jump.table for jump in firewall.jumps(SYN_PLAN)}) == ["filter", "mangle", "nat"]
