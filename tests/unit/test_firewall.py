"""Tests of composemirror.sidecar.firewall: the rules and routes a sidecar installs, as text."""

from __future__ import annotations

import ipaddress

import pytest

from composemirror.sidecar.firewall import Plan, render, route_commands

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
