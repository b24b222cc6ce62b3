"""What every results JSON records about where it was measured: the commit, the kind of CPU, the command and
the date (`header`). benchmarks/results/<script>[-<tag>].json is written by benchmarks/<script>.py, whose
`table(result)` makes the Markdown table docs/results.md shows (tests/test_results.py holds them together)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_kind() -> dict:
    """The CPU's model name and whether it has AMX / AVX512-BF16 (bf16 fast): figures compare within a kind."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return {
        "model": name or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
    }


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("+changes" if dirty else "")


STARTED_AT = commit()  # at import: when the benchmark started


def header(command: list[str] | None = None) -> dict:
    """The keys a results JSON starts with; `command` defaults to this process's own, as typed in the repo.
    The commit is the one the benchmark started from (edits made while it ran are not its code)."""
    argv = command or ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]
    return {
        "commit": STARTED_AT,
        "cpu": cpu_kind(),
        "command": shlex.join(argv),
        "date": time.strftime("%Y-%m-%d"),
    }


def cell(v, fmt: str) -> str:
    """A table cell: `v` formatted, or – when missing."""
    return "–" if v is None else format(v, fmt)


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A Markdown table of cells; `align` one letter per column (l or r), default the first column left and the
    others right (numbers)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])
