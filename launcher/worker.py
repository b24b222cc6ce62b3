"""What each rank runs: `python -m stablekd.launcher.worker <stage> <run_dir>` (started by the deepspeed runner)."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

from stablekd.launcher.config import load_config


def main(argv: list[str]) -> None:
    stage, run_dir = argv
    # DeepSpeed 0.19 still calls collectives torch 2.13 deprecated: one warning per call site and rank.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    cfg = load_config(Path(run_dir) / "config.yaml")
    importlib.import_module(f"stablekd.launcher.stages.{stage}").run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
