"""The short version of the kill/resume campaign (benchmarks/faults.py): 2 random kill -9 of the teacher
stage's whole process group, rerun until it finishes, compared with an uninterrupted run."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_group

pytestmark = pytest.mark.distributed


def test_two_random_kills_of_the_teacher_lose_and_repeat_nothing(tmp_path):
    out = tmp_path / "faults.json"
    cmd = [sys.executable, "benchmarks/faults.py", "--stages", "teacher", "--cycles", "2", "--json", str(out),
           "--workdir", str(tmp_path / "runs")]  # fmt: skip
    proc = run_group(cmd, 600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["stages"]
    assert row["stage"] == "teacher" and row["rounds"] >= 1
    assert row["samples_lost"] == row["samples_repeated"] == 0
    assert row["identical_rounds"] == row["rounds"] and row["max_loss_dev"] <= 1e-5
    assert "| teacher | 2 |" in proc.stdout
