"""What each rank runs: `python -m stablekd.launcher.worker <stage> <run_dir>` (started by the deepspeed runner)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from stablekd.launcher.config import load_config


def main(argv: list[str]) -> None:
    stage, run_dir = argv
    cfg = load_config(Path(run_dir) / "config.yaml")
    importlib.import_module(f"stablekd.launcher.stages.{stage}").run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
