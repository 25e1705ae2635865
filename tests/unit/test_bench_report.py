"""RESULTS.md is written section by section: a program rewrites its own sections and keeps the
others' (the Kubernetes link, the soak)."""

from __future__ import annotations

from benchmarks.report import SOAK_HEADING, merge_documents

OLD = """# composemirror benchmarks

Measured on day 1.

## Results

old table

## Kubernetes link

k8s table
"""


def test_a_whole_document_keeps_the_sections_other_programs_wrote() -> None:
    new = "# composemirror benchmarks\n\nMeasured on day 2.\n\n## Results\n\nnew table\n"
    merged = merge_documents(OLD, new)
    assert "Measured on day 2." in merged and "new table" in merged
    assert "old table" not in merged and "Measured on day 1." not in merged
    assert merged.endswith("## Kubernetes link\n\nk8s table\n")


def test_a_section_alone_replaces_its_own_and_keeps_the_rest() -> None:
    soak = f"{SOAK_HEADING}\n\nsoak table 1\n"
    once = merge_documents(OLD, soak)
    assert once.startswith("# composemirror benchmarks\n\nMeasured on day 1.")
    assert "old table" in once and "k8s table" in once and "soak table 1" in once
    twice = merge_documents(once, f"{SOAK_HEADING}\n\nsoak table 2\n")
    assert "soak table 1" not in twice and twice.count(SOAK_HEADING) == 1
    # The Kubernetes program's own update keeps the soak too.
    third = merge_documents(twice, "## Kubernetes link\n\nk8s table 2\n")
    assert "soak table 2" in third and "k8s table 2" in third and "k8s table\n" not in third
