"""Shared test helpers: tiny runs launched through the real `stablekd` CLI and DeepSpeed runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"

# A teacher small enough that a 2-rank DeepSpeed step takes well under a second on 2 CPU cores.
TINY = [
    "teacher.model=tiny",
    "data.bios.people=20",
    "data.bios.unseen_people=4",
    "tokenizer.vocab_size=400",
    "data.seq_len=32",
    "teacher.micro_batch_size=4",
    "teacher.warmup_steps=2",
    "teacher.log_every=1",
    "teacher.eval_every=0",
    "teacher.eval_batches=2",
    "teacher.export_hf=false",
]


def stablekd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stablekd.launcher.cli", *args]


def run_stablekd(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        stablekd_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"stablekd {' '.join(args)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc
