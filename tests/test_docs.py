"""The documentation ships with the repository and stays true to it:

- docs/configuration.md is what `python -m stablekd.launcher.config.docs` generates from the schema now;
- every relative Markdown link in README.md, CONTRIBUTING.md and docs/*.md leads to a file of the
  repository, and its `#anchor` to a heading of that file;
- no tracked file refers to the internal notes outside the repository the code once cited.

The link checker is also run on planted broken links, so the check can fail.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from stablekd.launcher.config.docs import markdown
from tests.conftest import REPO, benchmark_module

PAGES = [
    "README.md",
    "CONTRIBUTING.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (`_` and `-` kept), spaces -> `-`."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks); a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, root: Path) -> list[str]:
    """`page: target (why)` for each relative link of `page` (outside code) that leads nowhere in `root`."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    out = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page.resolve()
        name = page.relative_to(root)
        if not dest.is_relative_to(root.resolve()):
            out.append(f"{name}: {target} (outside the repository)")
        elif not dest.exists():
            out.append(f"{name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{name}: {target} (no heading with that anchor)")
    return out


def test_configuration_page_is_generated_from_the_schema():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == markdown(), (
        "docs/configuration.md is stale: run `python -m stablekd.launcher.config.docs > docs/configuration.md`"
    )


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    assert broken_links(REPO / page, REPO) == []


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## The run's `directory`\n\ntext\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#the-runs-directory) [self](#top) [web](https://example.org/x.md)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#nowhere) [out](../elsewhere.md)\n"
        "`[in code](docs/c.md)`\n\n```\n[in a block](docs/d.md)\n```\n\n# Top\n"
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#nowhere (no heading with that anchor)",
        "README.md: ../elsewhere.md (outside the repository)",
    ]


# Built from pieces, so that this file does not hold what it looks for.
_OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "DESIGN" + r"\.md", "DESIGN" + " §", "STYLE" + r" \d"]))


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [REPO / n for n in names if n and (REPO / n).is_file()]


def test_no_file_refers_outside_the_repository():
    hits = []
    for path in tracked_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for m in _OUTSIDE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{path.relative_to(REPO)}:{line}: {m.group()}")
    assert hits == []


def test_the_outside_reference_check_can_fail():
    planted = "see " + "DESIGN" + " §5 and ../" + "shared/x and " + "STYLE" + " 7"
    assert [m.group() for m in _OUTSIDE.finditer(planted)] == [
        "DESIGN" + " §",
        "../" + "shared",
        "STYLE" + " 7",
    ]


def test_ci_runs_the_readmes_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = 'pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert f"{setup} && stablekd quickstart\n" in readme
    assert f"{setup} && python -m pytest -q\n" in readme
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "python -m pip install --quiet torch==2.13.0" in ci
    assert "python -m pytest -q" in ci


def test_the_quickstart_table_is_the_committed_json():
    """The README's and docs/results.md's quickstart table is benchmarks/quickstart.py's table of the
    committed benchmarks/results/quickstart.json: a re-measurement changes the JSON and the pages together."""
    result = json.loads((REPO / "benchmarks" / "results" / "quickstart.json").read_text())
    assert set(result) >= {"commit", "cpu", "command", "models", "ratios", "sizes"}
    assert set(result["models"]) == {"teacher", "student", "contrastive"}
    table = benchmark_module("quickstart").table(result)
    assert "| cross-sample contradiction, trained people |" in table
    for page in ("README.md", "docs/results.md"):
        assert table in (REPO / page).read_text(encoding="utf-8"), page
