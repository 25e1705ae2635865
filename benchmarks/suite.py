"""The six benchmarks: each runs its load through composemirror and its baseline, side by side.

Every function returns `Figure`s with the issue's targets; the load generator in the containers
does the timing, `lab` runs it, and the tunnelled runs are watched so that the sidecar's and the
agent's memory and CPU are known per load. Nothing here talks to Docker directly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from benchmarks.lab import ECHO_PORT, SERVER_IP, SINK_PORT, SOURCE_PORT, Lab, Mirrored, Stack
from benchmarks.report import GIB, MIB, Figure, Target, median, percentile

log = logging.getLogger(__name__)
T = TypeVar("T")

CLUSTER_NAME = "orders.shop.svc.cluster.local"
"""A name the sandbox's cluster DNS knows (with a 5 s TTL)."""
SOAK_NAMES = "soak-%d.nx.test"
"""Names the cluster DNS does not know, a new one for every query (NXDOMAIN)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How long and how hard each benchmark runs (the defaults fit a full run in ~6 minutes)."""

    seconds: float = 4.0
    """Length of one bulk transfer."""
    rounds: int = 2
    """Alternating rounds of tunnel and direct for throughput and latency."""
    latency_count: int = 2000
    """Connections timed per side, over all rounds."""
    dns_seconds: float = 3.0
    dns_concurrency: int = 32
    """Queries outstanding at once when measuring queries per second."""
    connections: int = 1000
    hold_seconds: float = 5.0
    hold_size: int = 1024
    """Bytes each held connection echoes per round trip."""
    startup_repeats: int = 3
    idle_seconds: float = 3.0
    soak_seconds: float = 60.0
    """Length of the soak: connections held and DNS queries sent all along."""
    soak_connections: int = 1000
    soak_rate: int = 10_000
    """DNS queries a second during the soak, half for names that do not exist."""
    soak_settle: float = 10.0
    """Seconds after the soak before the final memory is read."""

    @classmethod
    def quick(cls) -> Settings:
        """Shorter runs of the same benchmarks, for trying the suite out; figures are noisier."""
        return cls(
            seconds=1.5,
            rounds=1,
            latency_count=300,
            dns_seconds=1.0,
            hold_seconds=2.0,
            startup_repeats=1,
            idle_seconds=1.0,
            soak_seconds=10.0,
            soak_settle=3.0,
        )


def _measure(
    lab: Lab, side: str, container: str, load: str | None, *args: object, timeout: float
) -> dict[str, Any]:
    """Run the load generator on one side; a tunnelled run is watched under `load` (if any).

    A tunnelled run waits for the agent link first: an earlier load may have dropped it, and it
    should cost that load, not this one.
    """
    watch: AbstractContextManager[None] = nullcontext()
    if side == "tunnel":
        lab.await_link()
        if load is not None:
            watch = lab.monitor.watch(load)
    with watch:
        return lab.loadgen(container, *args, timeout=timeout)


def _sides(stack: Stack, round_: int) -> list[tuple[str, str]]:
    """(side, container) in the order of this round: alternate, so neither always goes first."""
    sides = [("direct", stack.direct), ("tunnel", stack.app)]
    return sides if round_ % 2 == 0 else sides[::-1]


def _errors_note(errors: dict[str, int]) -> str:
    if not any(errors.values()):
        return ""
    return f"errors: tunnel {errors['tunnel']}, direct {errors['direct']}"


def idle(lab: Lab, settings: Settings) -> None:
    """Let the freshly started sidecar and agent settle, and record them doing nothing."""
    time.sleep(1.0)
    with lab.monitor.watch("idle"):
        time.sleep(settings.idle_seconds)


def throughput(lab: Lab, stack: Stack, settings: Settings) -> list[Figure]:
    """Bulk TCP, one stream and eight, app to server (targets) and back (for information).

    With a reference stack (`--against`), its app runs the same loads in the same rounds, the
    three sides in turn, and each case gets two more figures against it: the median of the
    rounds' throughputs (with the median and spread of the per-round ratios in the note), and
    the CPU time the sidecar and the agent spent per GiB moved, which a busy machine disturbs
    less than throughput.
    """
    cases = [
        ("upload", SINK_PORT, 1, Target(text=">= 1/3 of direct", on="ratio", at_least=1 / 3)),
        ("upload", SINK_PORT, 8, Target(text=">= 1/2 of direct", on="ratio", at_least=1 / 2)),
        ("download", SOURCE_PORT, 1, None),
        ("download", SOURCE_PORT, 8, None),
    ]
    sides = [("direct", stack.direct), ("tunnel", stack.app)]
    if stack.reference is not None:
        sides.append(("reference", stack.reference.app))
    figures = []
    for mode, port, streams, target in cases:
        moved = dict.fromkeys(("tunnel", "direct", "reference"), 0)
        took = dict.fromkeys(("tunnel", "direct", "reference"), 0.0)
        errors = dict.fromkeys(("tunnel", "direct", "reference"), 0)
        rates: dict[str, list[float]] = {"tunnel": [], "reference": []}
        cpu_per_gib: dict[str, list[float]] = {"tunnel": [], "reference": []}
        for round_ in range(settings.rounds):
            shift = round_ % len(sides)
            for side, container in sides[shift:] + sides[:shift]:
                log.info("throughput: %s, %d stream(s), %s", mode, streams, side)
                mirrored = _mirrored(stack, side)
                if mirrored is not None:
                    lab.await_link(mirrored.sidecar)
                    cpu_before = lab.cpu_of(mirrored)
                report = _measure(
                    lab,
                    "direct" if side == "reference" else side,
                    container,
                    "throughput",
                    mode,
                    SERVER_IP,
                    port,
                    streams,
                    settings.seconds,
                    timeout=settings.seconds + 120,
                )
                moved[side] += int(report["bytes"])
                took[side] += float(report["seconds"])
                errors[side] += int(report["errors"])
                if mirrored is not None and report["bytes"] and report["seconds"]:
                    rates[side].append(int(report["bytes"]) / float(report["seconds"]) / MIB)
                    cpu = lab.cpu_of(mirrored) - cpu_before
                    cpu_per_gib[side].append(cpu / (int(report["bytes"]) / GIB))
        rate = {side: moved[side] / took[side] / MIB if took[side] else None for side in moved}
        what = "app to server" if mode == "upload" else "server to app"
        name = f"{mode} ({what}), {streams} stream{'s' if streams > 1 else ''}"
        figures.append(
            Figure(
                section="throughput",
                name=name,
                unit="MiB/s",
                value=rate["tunnel"],
                baseline=rate["direct"],
                target=target,
                note=_errors_note(errors),
            )
        )
        if stack.reference is not None:
            figures += _against(name, stack.reference.label, rates, cpu_per_gib, errors)
    return figures


def _mirrored(stack: Stack, side: str) -> Mirrored | None:
    """The sidecar and agent a side's traffic goes through (none for direct)."""
    if side == "tunnel":
        return stack.mirrored
    return stack.reference if side == "reference" else None


def _against(
    name: str,
    label: str,
    rates: dict[str, list[float]],
    cpu_per_gib: dict[str, list[float]],
    errors: dict[str, int],
) -> list[Figure]:
    """A case's figures against the reference commit: median throughput and CPU per GiB."""

    def spread(values: dict[str, list[float]]) -> str:
        ratios = [a / b for a, b in zip(values["tunnel"], values["reference"], strict=False) if b]
        if not ratios:
            return ""
        return (
            f"per round {median(ratios):.3f}x median, {min(ratios):.3f}-{max(ratios):.3f}x "
            f"over {len(ratios)}"
        )

    def mid(values: list[float]) -> float | None:
        return median(values) if values else None

    lost = f"errors: {label} {errors['reference']}" if errors["reference"] else ""
    return [
        Figure(
            section="throughput",
            name=f"{name}, against {label}",
            unit="MiB/s",
            value=mid(rates["tunnel"]),
            baseline=mid(rates["reference"]),
            note="; ".join(part for part in (spread(rates), lost) if part),
        ),
        Figure(
            section="throughput",
            name=f"{name}, sidecar + agent CPU per GiB, against {label}",
            unit="s",
            value=mid(cpu_per_gib["tunnel"]),
            baseline=mid(cpu_per_gib["reference"]),
            note=spread(cpu_per_gib),
        ),
    ]


def latency(lab: Lab, stack: Stack, settings: Settings) -> list[Figure]:
    """A new connection, a 64-byte request and its response: p50 and p99 of each side.

    With a reference stack (`--against`), its app runs the same connections in the same rounds,
    the three sides in turn, and p50 and p99 get a figure against it too.
    """
    samples: dict[str, list[float]] = {"tunnel": [], "direct": [], "reference": []}
    errors = {"tunnel": 0, "direct": 0, "reference": 0}
    per_round = max(1, settings.latency_count // settings.rounds)
    sides = [("direct", stack.direct), ("tunnel", stack.app)]
    if stack.reference is not None:
        sides.append(("reference", stack.reference.app))
    for round_ in range(settings.rounds):
        shift = round_ % len(sides)
        for side, container in sides[shift:] + sides[:shift]:
            log.info("latency: %d connections, %s", per_round, side)
            mirrored = _mirrored(stack, side)
            if mirrored is not None:
                lab.await_link(mirrored.sidecar)
            report = _measure(
                lab,
                "direct" if side == "reference" else side,
                container,
                "latency",
                "latency",
                SERVER_IP,
                ECHO_PORT,
                per_round,
                50,
                64,
                timeout=300,
            )
            samples[side] += [float(us) / 1000 for us in report["samples_us"]]
            errors[side] += int(report["errors"])

    def at(side: str, q: float) -> float | None:
        return percentile(samples[side], q) if samples[side] else None

    note = _errors_note(errors)
    against = []
    if stack.reference is not None:
        label = stack.reference.label
        lost = f"errors: {label} {errors['reference']}" if errors["reference"] else ""
        against = [
            Figure(
                section="latency",
                name=f"connect + 64 B request/response, p{round(q * 100)}, against {label}",
                unit="ms",
                value=at("tunnel", q),
                baseline=at("reference", q),
                note=lost,
            )
            for q in (0.5, 0.99)
        ]
    return [
        Figure(
            section="latency",
            name="connect + 64 B request/response, p50",
            unit="ms",
            value=at("tunnel", 0.5),
            baseline=at("direct", 0.5),
            target=Target(text="added <= 0.5 ms", on="added", at_most=0.5),
            note=note,
        ),
        Figure(
            section="latency",
            name="connect + 64 B request/response, p99",
            unit="ms",
            value=at("tunnel", 0.99),
            baseline=at("direct", 0.99),
            target=Target(text="added <= 2 ms", on="added", at_most=2.0),
            note=note,
        ),
        *against,
    ]


def dns(lab: Lab, stack: Stack, settings: Settings) -> list[Figure]:
    """Queries through the sidecar for three kinds of name, against Docker's DNS for a compose one.

    The sidecar's cache answers both cached kinds, so both carry the cached-answer targets.
    """
    app_server = lab.nameserver(stack.app)
    peer_server = lab.nameserver(stack.peer)
    unique = f"u{secrets.token_hex(3)}-%d.shop.svc.cluster.local"
    cases = [
        ("docker", "Docker's DNS, compose name", stack.peer, peer_server, "client", False),
        ("local", "compose name via the sidecar", stack.app, app_server, "peer", True),
        ("cached", "remote name, cached", stack.app, app_server, CLUSTER_NAME, True),
        ("uncached", "remote name, uncached", stack.app, app_server, unique, False),
    ]
    latency_of: dict[str, dict[str, Any]] = {}
    rate_of: dict[str, dict[str, Any]] = {}
    for key, label, container, server, name, _ in cases:
        side = "direct" if key == "docker" else "tunnel"
        # Queries first: the cached kinds are then answered from the cache.
        _measure(lab, side, container, None, "dns", server, name, 1, 0.2, timeout=60)
        log.info("dns: %s, latency", label)
        latency_of[key] = _measure(
            lab,
            side,
            container,
            "dns",
            "dns",
            server,
            name,
            1,
            settings.dns_seconds,
            timeout=settings.dns_seconds + 60,
        )
        log.info("dns: %s, queries per second", label)
        rate_of[key] = _measure(
            lab,
            side,
            container,
            "dns",
            "dns",
            server,
            name,
            settings.dns_concurrency,
            settings.dns_seconds,
            timeout=settings.dns_seconds + 60,
        )

    def qps(report: dict[str, Any]) -> float:
        return float(report["answered"]) / float(report["seconds"])

    def ms(report: dict[str, Any], field: str) -> float | None:
        return float(report[field]) / 1000 if report["answered"] else None

    docker_latency, docker_rate = latency_of["docker"], rate_of["docker"]
    figures = []
    for key, label, _, _, _, cached in cases[1:]:
        lost = sum(int(r["timeouts"]) + int(r["failures"]) for r in (latency_of[key], rate_of[key]))
        note = f"{lost} queries unanswered or failed" if lost else ""
        figures += [
            Figure(
                section="dns",
                name=f"{label}, p50",
                unit="ms",
                value=ms(latency_of[key], "p50_us"),
                baseline=ms(docker_latency, "p50_us"),
                target=Target(text="<= 2x Docker's DNS", on="ratio", at_most=2.0)
                if cached
                else None,
                note=note,
            ),
            Figure(
                section="dns",
                name=f"{label}, p99",
                unit="ms",
                value=ms(latency_of[key], "p99_us"),
                baseline=ms(docker_latency, "p99_us"),
            ),
            Figure(
                section="dns",
                name=f"{label}, queries/s ({settings.dns_concurrency} at once)",
                unit="q/s",
                value=qps(rate_of[key]),
                baseline=qps(docker_rate),
                target=Target(text=">= 5,000 q/s", on="value", at_least=5000) if cached else None,
            ),
        ]
    return figures


def concurrency(lab: Lab, stack: Stack, settings: Settings) -> list[Figure]:
    """Many connections open at once, traffic on all: errors, throughput, sidecar/agent memory."""
    n = settings.connections
    reports = {}
    for side, container in _sides(stack, 0):
        log.info("concurrency: %d connections, %s", n, side)
        reports[side] = _measure(
            lab,
            side,
            container,
            "concurrency",
            "hold",
            SERVER_IP,
            ECHO_PORT,
            n,
            settings.hold_seconds,
            settings.hold_size,
            timeout=settings.hold_seconds + 300,
        )

    def errors(side: str) -> float:
        return float(reports[side]["connect_errors"]) + float(reports[side]["io_errors"])

    def rate(side: str) -> float:
        return float(reports[side]["bytes"]) / float(reports[side]["seconds"]) / MIB

    use = lab.monitor.usage["concurrency"]
    count = f"{n:,} connections"
    return [
        Figure(
            section="concurrency",
            name=f"errors, {count}",
            unit="",
            value=errors("tunnel"),
            baseline=errors("direct"),
            target=Target(text="= 0", on="value", at_most=0),
        ),
        Figure(
            section="concurrency",
            name=f"echo throughput, {count}",
            unit="MiB/s",
            value=rate("tunnel"),
            baseline=rate("direct"),
        ),
        Figure(
            section="concurrency",
            name=f"sidecar RSS peak, {count}",
            unit="MiB",
            value=use.rss_peak["sidecar"] / MIB,
            target=Target(text="<= 150 MiB", on="value", at_most=150),
        ),
        Figure(
            section="concurrency",
            name=f"agent RSS peak, {count}",
            unit="MiB",
            value=use.rss_peak["agent"] / MIB,
        ),
    ]


def startup(lab: Lab, settings: Settings) -> list[Figure]:
    """`composemirror up -d` against plain `docker compose up -d`, images present; medians."""
    log.info("start-up: one untimed round first (it builds any image that is missing)")
    lab.composemirror("up", "-d")
    lab.composemirror("down")
    lab.compose("up", "-d")
    lab.compose("down")
    plain: list[float] = []
    mirrored: list[float] = []
    for repeat in range(settings.startup_repeats):
        log.info("start-up: round %d of %d", repeat + 1, settings.startup_repeats)
        plain.append(_timed(lambda: lab.compose("up", "-d"))[0])
        lab.compose("down")
        for _ in range(3):
            seconds, result = _timed(lambda: lab.composemirror("up", "-d"))
            lab.composemirror("down")
            # Someone changed composemirror's code meanwhile: that up built images; time again.
            if "building " not in result.stderr:
                break
            log.warning("start-up: composemirror built an image during a timed up; repeating")
        mirrored.append(seconds)
    name = f"up -d (baseline: docker compose up -d), median of {settings.startup_repeats}"
    return [
        Figure(
            section="startup",
            name=name,
            unit="s",
            value=median(mirrored),
            baseline=median(plain),
            target=Target(text="added <= 3 s", on="added", at_most=3.0),
        )
    ]


def memory(lab: Lab) -> list[Figure]:
    """The sidecar's and the agent's resident memory idle, and after all the loads ran."""
    idle_peak = lab.monitor.usage["idle"].rss_peak
    after = lab.monitor.snapshot()
    return [
        Figure(
            section="memory",
            name="sidecar RSS, idle",
            unit="MiB",
            value=idle_peak["sidecar"] / MIB,
            target=Target(text="<= 50 MiB", on="value", at_most=50),
        ),
        Figure(
            section="memory", name="agent RSS, idle", unit="MiB", value=idle_peak["agent"] / MIB
        ),
        Figure(
            section="memory",
            name="sidecar RSS after the loads",
            unit="MiB",
            value=after["sidecar"] / MIB,
        ),
        Figure(
            section="memory",
            name="agent RSS after the loads",
            unit="MiB",
            value=after["agent"] / MIB,
        ),
    ]


def soak(lab: Lab, stack: Stack, settings: Settings) -> list[Figure]:
    """Many connections and a DNS flood (half names that do not exist) through one sidecar at
    once, for a while: errors, rates, and the sidecar's and agent's memory idle, at peak and
    after (does it come back?)."""
    lab.await_link()
    idle = lab.monitor.snapshot()
    server = lab.nameserver(stack.app)
    n, seconds = settings.soak_connections, settings.soak_seconds
    log.info("soak: %d connections and %d DNS queries/s for %g s", n, settings.soak_rate, seconds)
    hold = (stack.app, "hold", SERVER_IP, ECHO_PORT, n, seconds, settings.hold_size)
    flood = (stack.app, "dnsrate", server, settings.soak_rate, seconds, CLUSTER_NAME, SOAK_NAMES)
    with lab.monitor.watch("soak"), ThreadPoolExecutor(2) as pool:
        held = pool.submit(lambda: lab.loadgen(*hold, timeout=seconds + 300))
        time.sleep(1.0)  # the connections open first; the flood then meets them established
        asked = pool.submit(lambda: lab.loadgen(*flood, timeout=seconds + 60))
        connections, queries = held.result(), asked.result()
    time.sleep(settings.soak_settle)
    final = lab.monitor.snapshot()
    peak = lab.monitor.usage["soak"].rss_peak
    errors = float(connections["connect_errors"]) + float(connections["io_errors"])
    sent = float(queries["sent"])
    answered = float(queries["answered"])
    count = f"{n:,} connections"
    figures = [
        Figure(
            section="soak",
            name=f"errors, {count} for {seconds:g} s",
            unit="",
            value=errors,
            target=Target(text="= 0", on="value", at_most=0),
        ),
        Figure(
            section="soak",
            name=f"echo throughput, {count}",
            unit="MiB/s",
            value=float(connections["bytes"]) / float(connections["seconds"]) / MIB,
        ),
        Figure(
            section="soak",
            name="DNS queries sent",
            unit="q/s",
            value=sent / float(queries["seconds"]),
            # The load generator's own pace: it must not be what limits the load.
            target=Target(
                text=f">= 99 % of {settings.soak_rate:,} q/s",
                on="value",
                at_least=0.99 * settings.soak_rate,
            ),
        ),
        Figure(
            section="soak",
            name="DNS queries answered",
            unit="%",
            value=100.0 * answered / sent if sent else None,
            note=f"NOERROR {queries['noerror']}, NXDOMAIN {queries['nxdomain']}, "
            f"SERVFAIL {queries['servfail']}, none {int(sent - answered)}",
        ),
    ]
    for role in ("sidecar", "agent"):
        figures += [
            Figure(section="soak", name=f"{role} RSS, idle", unit="MiB", value=idle[role] / MIB),
            Figure(section="soak", name=f"{role} RSS, peak", unit="MiB", value=peak[role] / MIB),
            Figure(
                section="soak",
                name=f"{role} RSS, final ({settings.soak_settle:g} s after)",
                unit="MiB",
                value=final[role] / MIB,
            ),
        ]
    return figures


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    """Wall time of `action()`, and what it returned."""
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result
