"""`python -m benchmarks`: run the benchmarks, print the table, optionally rewrite RESULTS.md.

Exit code 0 when every selected benchmark ran (a MISS is a result, not a failure), 1 when one
could not run, 2 for bad arguments. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

from benchmarks import suite
from benchmarks.lab import HERE, BenchError, Lab, machine
from benchmarks.report import (
    HEADER,
    SECTIONS,
    SOAK,
    USAGE_HEADER,
    Figure,
    Usage,
    merge_documents,
    results_document,
    rows,
    soak_document,
    summary,
    text_table,
    usage_rows,
)

log = logging.getLogger("benchmarks")
RESULTS = HERE / "RESULTS.md"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    selected = _selection(args.only)
    settings = suite.Settings.quick() if args.quick else suite.Settings()
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds)
    started = time.monotonic()
    load = os.getloadavg()
    figures: list[Figure] = []
    failed: list[str] = []
    usage: dict[str, Usage] = {}

    def attempt(section: str, benchmark: Callable[[], list[Figure]]) -> None:
        try:
            figures.extend(benchmark())
        except BenchError as e:
            log.error("%s failed: %s", section, e)
            failed.append(section)
            figures.append(
                Figure(
                    section=section,
                    name="could not run",
                    unit="",
                    value=None,
                    note=str(e).splitlines()[0],
                )
            )

    try:
        with Lab.open(against=args.against, own_target=args.own_target) as lab:
            if "startup" in selected:
                attempt("startup", lambda: suite.startup(lab, settings))
            if set(selected) - {"startup"}:
                stack = lab.up()
                suite.idle(lab, settings)
                loads: dict[str, Callable[[], list[Figure]]] = {
                    "throughput": lambda: suite.throughput(lab, stack, settings),
                    "latency": lambda: suite.latency(lab, stack, settings),
                    "dns": lambda: suite.dns(lab, stack, settings),
                    "concurrency": lambda: suite.concurrency(lab, stack, settings),
                    "memory": lambda: suite.memory(lab),
                    # Last: its flood must not count in "memory after the loads".
                    SOAK: lambda: suite.soak(lab, stack, settings),
                }
                for section, benchmark in loads.items():
                    if section in selected:
                        attempt(section, benchmark)
            usage = dict(lab.monitor.usage)
    except BenchError as e:
        log.error("%s", e)
        return 1
    log.info("done in %.0f s", time.monotonic() - started)

    print(text_table(rows(figures), HEADER))
    print()
    print(summary(figures))
    if usage:
        print()
        print("sidecar and agent, per load (CPU: % of one core while the load ran)")
        print(text_table(usage_rows(usage), USAGE_HEADER))
    if args.write_results:
        command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
        measured_on = machine(load)
        document = RESULTS.read_text() if RESULTS.exists() else ""
        main_figures = [f for f in figures if f.section != SOAK]
        if main_figures:
            document = merge_documents(
                document,
                results_document(
                    figures=main_figures,
                    usage={load: use for load, use in usage.items() if load != SOAK},
                    machine=measured_on,
                    command=command,
                    parameters=asdict(settings),
                ),
            )
        soak_figures = [f for f in figures if f.section == SOAK]
        if soak_figures:
            document = merge_documents(
                document,
                soak_document(
                    figures=soak_figures,
                    machine=measured_on,
                    command=command,
                    parameters=asdict(settings),
                ),
            )
        RESULTS.write_text(document)
        log.info("wrote %s", RESULTS)
    return 1 if failed else 0


def _selection(only: str | None) -> tuple[str, ...]:
    if not only:
        return SECTIONS
    chosen = tuple(name.strip() for name in only.split(",") if name.strip())
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        _parser().error(
            f"--only: unknown benchmark {', '.join(unknown)} (choose from {', '.join(SECTIONS)})"
        )
    return chosen


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of rounds >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure composemirror's tunnel, DNS, start-up and memory against their "
        "baselines, side by side in one run, and print a table with the targets.",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated benchmarks to run: {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--write-results",
        action="store_true",
        help=f"rewrite {RESULTS.relative_to(HERE.parent)} with the table and "
        "the machine's description",
    )
    parser.add_argument(
        "--against",
        metavar="COMMIT",
        help="also run the throughput loads through composemirror as of this git commit, "
        "in the same rounds, and print the ratios to it (e.g. --against 77b5d41)",
    )
    parser.add_argument(
        "--own-target",
        action="store_true",
        help="the agent joins a container of the suite's (docker://) instead of the sandbox's "
        "checkout: the same path for the bytes, without needing the sandbox's workloads "
        "(the DNS benchmark's cluster names then do not resolve)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        metavar="N",
        help="alternating rounds of throughput and latency (default 2; more give steadier "
        "medians on a busy machine)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter runs (for trying the suite out; noisier figures)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
