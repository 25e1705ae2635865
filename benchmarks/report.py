"""Figures, targets and tables: the pure part of the benchmarks.

A `Figure` is one measurement through composemirror beside its baseline from the same run; a
`Target` is the issue's bound on it. Rendering (the console table, RESULTS.md) turns data into
text; nothing here measures, runs a process or reads a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Quantity = Literal["value", "ratio", "added"]

SECTIONS = ("throughput", "latency", "dns", "concurrency", "startup", "memory", "soak")
"""The benchmarks, in the order they are shown (and `--only` names them)."""
SOAK = "soak"
"""The soak benchmark: its figures have their own section of RESULTS.md (`soak_document`)."""
SOAK_HEADING = "## Soak: 1,000 connections and 10,000 DNS queries a second"

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A bound from the issue on one quantity of a figure."""

    text: str
    """How the table states it, e.g. `>= 1/3 of direct`."""
    on: Quantity
    """`value` (through composemirror), `ratio` (value / baseline) or `added` (value - baseline)."""
    at_least: float | None = None
    at_most: float | None = None

    def met(self, quantity: float) -> bool:
        if self.at_least is not None and quantity < self.at_least:
            return False
        return self.at_most is None or quantity <= self.at_most


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    """One measured quantity: through composemirror, and its baseline from the same run."""

    section: str
    """One of SECTIONS."""
    name: str
    unit: str
    value: float | None
    """Through composemirror; None when it could not be measured."""
    baseline: float | None = None
    """The same measurement without composemirror; None where there is none (memory)."""
    target: Target | None = None
    note: str = ""
    """Shown after the verdict: errors, what failed, what the baseline is."""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def added(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    def quantity(self, which: Quantity) -> float | None:
        return {"value": self.value, "ratio": self.ratio, "added": self.added}[which]

    @property
    def verdict(self) -> str:
        """PASS or MISS against the target; empty without one."""
        if self.target is None:
            return ""
        quantity = self.quantity(self.target.on)
        if quantity is None:
            return "MISS (not measured)"
        verdict = "PASS" if self.target.met(quantity) else "MISS"
        if self.target.on == "added":
            return f"{verdict} ({quantity:+.3g} {self.unit})"
        return verdict


@dataclass(slots=True)
class Usage:
    """Resident memory peaks and CPU time of the sidecar and the agent during one load."""

    rss_peak: dict[str, int] = field(default_factory=dict)
    """Role (`sidecar`, `agent`) -> highest resident set seen, bytes."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """Role -> CPU time (user + system) spent while the load ran."""
    wall_seconds: float = 0.0
    """How long the load ran (the sum of its watched periods)."""
    host_busy: float = 0.0
    """CPU time the whole machine spent busy meanwhile, in core-seconds (0 when unknown)."""
    host_capacity: float = 0.0
    """Core-seconds the machine had meanwhile: busy / capacity is how loaded it was."""

    def add(
        self,
        rss: Mapping[str, int],
        cpu: Mapping[str, float],
        wall: float,
        host: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        for role, value in rss.items():
            self.rss_peak[role] = max(self.rss_peak.get(role, 0), value)
        for role, seconds in cpu.items():
            self.cpu_seconds[role] = self.cpu_seconds.get(role, 0.0) + seconds
        self.wall_seconds += wall
        self.host_busy += host[0]
        self.host_capacity += host[1]

    def host_percent(self) -> float | None:
        """How busy the machine's CPUs were, all of them together, while the load ran."""
        return 100.0 * self.host_busy / self.host_capacity if self.host_capacity > 0 else None

    def cpu_percent(self, role: str) -> float | None:
        if role not in self.cpu_seconds or self.wall_seconds <= 0:
            return None
        return 100.0 * self.cpu_seconds[role] / self.wall_seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    """Where the figures were measured."""

    cpus: int
    memory_bytes: int
    kernel: str
    engine: str
    compose: str
    python: str
    composemirror: str
    """Version and commit of the code measured."""
    date: str
    load: str
    """Load averages (1, 5, 15 min) as the run began: how much else the machine was doing."""


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 0.5)


def number(value: float | None, unit: str = "") -> str:
    """A figure with about three significant digits, and its unit."""
    if value is None:
        return "-"
    size = abs(value)
    if size >= 1000 or (value.is_integer() and not unit):
        text = f"{value:,.0f}"
    elif size >= 100:
        text = f"{value:.0f}"
    elif size >= 10:
        text = f"{value:.1f}"
    elif size >= 1 or size == 0:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


HEADER = ("benchmark", "composemirror", "baseline", "ratio", "target", "result")


def rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    """The table's cells, section by section, in SECTIONS order."""
    table: list[tuple[str, ...]] = []
    for section in SECTIONS:
        for figure in (f for f in figures if f.section == section):
            ratio = figure.ratio
            result = "; ".join(part for part in (figure.verdict, figure.note) if part)
            table.append(
                (
                    f"{section}: {figure.name}",
                    number(figure.value, figure.unit),
                    number(figure.baseline, figure.unit) if figure.baseline is not None else "-",
                    number(ratio) + "x" if ratio is not None else "-",
                    figure.target.text if figure.target else "-",
                    result or "-",
                )
            )
    return table


def text_table(cells: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain table for the terminal, columns padded to their widest cell."""
    everything = [tuple(header), *(tuple(row) for row in cells)]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    lines = []
    for n, row in enumerate(everything):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(cells: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in cells)])


USAGE_HEADER = (
    "load",
    "sidecar RSS peak",
    "agent RSS peak",
    "sidecar CPU",
    "agent CPU",
    "machine CPU busy",
)


def usage_rows(usage: Mapping[str, Usage]) -> list[tuple[str, ...]]:
    """Resource use per load: peak resident memory, CPU as % of one core while it ran, and how
    busy all the machine's cores were meanwhile (a shared machine may be busy with other work)."""
    table = []
    for load, use in usage.items():
        cells = [load]
        for role in ("sidecar", "agent"):
            peak = use.rss_peak.get(role)
            cells.append(number(peak / MIB, "MiB") if peak is not None else "-")
        for role in ("sidecar", "agent"):
            cells.append(number(use.cpu_percent(role), "%"))
        cells.append(number(use.host_percent(), "%"))
        table.append(tuple(cells))
    return table


def summary(figures: Sequence[Figure]) -> str:
    """One line: how many targets passed, and which missed."""
    targeted = [
        f for section in SECTIONS for f in figures if f.section == section and f.target is not None
    ]
    missed = [f"{f.section}: {f.name}" for f in targeted if not f.verdict.startswith("PASS")]
    line = f"targets: {len(targeted) - len(missed)} of {len(targeted)} PASS"
    return line + (f"; MISS: {'; '.join(missed)}" if missed else "")


METHOD = """\
- **Throughput**: the load generator (`benchmarks/loadgen.c`, static musl binary) in the mirrored
  app sends bulk TCP for {seconds:g} s per round to a server container on the sandbox network; the
  server counts what arrived, so bytes buffered on the way are not counted. Tunnelled: app →
  sidecar proxy → tunnel → agent → server. Direct (the baseline): a container on the same bridge
  as the server. {rounds} alternating rounds each; download (server → app) is shown without a
  target.
- **Connection latency**: a new TCP connection, a 64-byte request and its 64-byte echo, then close;
  {latency_count} samples per side ({rounds} alternating rounds), after a warm-up.
- **DNS**: raw UDP A queries from the app container to its resolver (which the sidecar intercepts),
  one at a time for latency and {dns_concurrency} outstanding for queries/s, {dns_seconds:g} s
  each. The baseline is Docker's embedded DNS answering a compose name in a container without a
  sidecar. The uncached remote name is new for every query (NXDOMAIN after the agent has tried
  the target's search list, as a pod's resolver does).
- **Concurrency**: {connections} connections opened at once, then each echoes {hold_size} bytes
  back and forth for {hold_seconds:g} s; all stay open until every one is done. Direct is the same
  load from the container on the server's bridge.
- **Start-up**: wall time of `composemirror up -d` (which also checks the sandbox cluster is up)
  and of plain `docker compose up -d` on the same file, images present, each followed by its own
  `down`; alternating, median of {startup_repeats}.
- **Memory**: VmRSS of PID 1 of the sidecar and the agent containers, sampled every 0.2 s; CPU is
  user + system time of the same processes while each load ran, as % of one core, and "machine
  CPU busy" is the share of all cores that were busy meanwhile (from /proc/stat: the load
  generator, the servers, the kernel's network stack, and anything else running on the machine).
"""


def results_document(
    *,
    figures: Sequence[Figure],
    usage: Mapping[str, Usage],
    machine: Machine,
    command: str,
    parameters: Mapping[str, float],
) -> str:
    """RESULTS.md: the machine, the tables, how to rerun, what is measured."""
    memory_gib = machine.memory_bytes / (1024 * MIB)
    parts = [
        "# composemirror benchmarks",
        "",
        f"Measured on {machine.date} by `{command}` (written by the program; do not edit).",
        "Rerun: `make bench`, or `.venv/bin/python -m benchmarks [--only throughput,dns]"
        " [--write-results]` from the repository root, with the Docker engine running.",
        "Each figure is measured beside its baseline in the same run on the same engine;"
        " on a shared machine the ratios are steadier than the absolute numbers.",
        "",
        "## Machine",
        "",
        f"- {machine.cpus} CPUs, {memory_gib:.1f} GiB memory, Linux {machine.kernel}",
        f"- Docker engine {machine.engine}, Compose {machine.compose}, Python {machine.python}",
        f"- load average {machine.load} (1, 5, 15 min) as the run began",
        f"- composemirror {machine.composemirror}",
        "",
        "## Results",
        "",
        markdown_table(rows(figures), HEADER),
        "",
        summary(figures),
        "",
        "## Sidecar and agent resources per load",
        "",
        markdown_table(usage_rows(usage), USAGE_HEADER),
        "",
        "## What is measured",
        "",
        METHOD.format(**parameters),
    ]
    return "\n".join(parts)


SOAK_METHOD = """\
The load generator in the mirrored app holds {soak_connections:,} TCP connections to the echo
server (each echoing {hold_size} bytes back and forth) and, at the same time, sends
{soak_rate:,} DNS A queries a second to its resolver (open loop: queries leave at that rate
whatever the answers do), half for a cluster name (`orders.shop.svc.cluster.local`, cached by
the sidecar) and half for names that do not exist, each new (`soak-N.nx.test`, NXDOMAIN from the
cluster DNS, each one a lookup in the agent), for {soak_seconds:g} s through one sidecar. RSS
is VmRSS of the sidecar's and the agent's PID 1: idle before, the peak sampled every 0.2 s
during the load, and {soak_settle:g} s after it ended ("final")."""


def soak_document(
    *, figures: Sequence[Figure], machine: Machine, command: str, parameters: Mapping[str, float]
) -> str:
    """The soak's section of RESULTS.md: its figures, when and how they were measured."""
    return "\n".join(
        [
            SOAK_HEADING,
            "",
            f"Measured on {machine.date} by `{command}` (load average {machine.load} as the run"
            f" began; composemirror {machine.composemirror}).",
            "",
            markdown_table(rows(figures), HEADER),
            "",
            SOAK_METHOD.format(**parameters),
            "",
        ]
    )


def merge_documents(old: str, new: str) -> str:
    """RESULTS.md after writing `new` over `old`, section by section (`## ` headings).

    `new` with a preamble (the title and machine) is a whole document: its sections, then the
    sections of `old` it does not have (written by other programs: the Kubernetes link, the
    soak). `new` with only sections updates those in `old` and keeps everything else.
    """
    old_preamble, old_sections = _split(old)
    new_preamble, new_sections = _split(new)
    if new_preamble.strip():
        merged = {
            **new_sections,
            **{h: t for h, t in old_sections.items() if h not in new_sections},
        }
        preamble = new_preamble
    else:
        merged = {**old_sections, **new_sections}
        preamble = old_preamble
    parts = [preamble.rstrip("\n"), *(text.rstrip("\n") for text in merged.values())]
    return "\n\n".join(part for part in parts if part) + "\n"


def _split(document: str) -> tuple[str, dict[str, str]]:
    """(text before the first `## ` heading, heading -> the section's text, in order)."""
    preamble: list[str] = []
    sections: dict[str, list[str]] = {}
    current = preamble
    for line in document.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line.strip(), [])
        current.append(line)
    return "\n".join(preamble), {h: "\n".join(lines) for h, lines in sections.items()}
