"""The measured tables are their committed results: each benchmarks/results/<script>[-<tag>].json carries where
it was measured (benchmarks/provenance.py `header`), and docs/results.md shows benchmarks/<script>.py's
`table()` of it verbatim, so a re-measurement changes the JSON and the page together."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, benchmark_module

RESULTS = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "results.md"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_a_committed_result_is_its_table_in_the_docs(path):
    result = json.loads(path.read_text(encoding="utf-8"))
    assert {"commit", "cpu", "command"} <= set(result), f"{path.name}: no provenance (commit, cpu, command)"
    script = path.stem.split("-")[0]
    table = benchmark_module(script).table(result)
    assert table.count("\n") >= 2, table  # a header, its rule and at least one row
    assert table in PAGE.read_text(encoding="utf-8"), (
        f"docs/results.md lacks benchmarks/{script}.py's table of {path.name}"
    )


def test_every_results_file_the_pages_name_is_committed():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {
        (page.name, name)
        for page in pages
        for name in re.findall(r"benchmarks/results/([\w.-]+\.json)", page.read_text(encoding="utf-8"))
    }
    assert named, "the pages name no results file"
    missing = [f"{page}: {name}" for page, name in sorted(named) if not (RESULTS / name).is_file()]
    assert not missing, missing
