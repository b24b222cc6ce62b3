"""What each rank runs: `python -m stablekd.launcher.worker <stage> <run_dir>` (started by the deepspeed runner)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings
from contextlib import suppress
from pathlib import Path

from stablekd.launcher import diskspace, hints, rundir
from stablekd.launcher.config import load_config
from stablekd.launcher.ranks import RankStatus


def main(argv: list[str]) -> None:
    stage, run_dir = argv
    # DeepSpeed 0.19 still calls collectives torch 2.13 deprecated: one warning per call site and rank.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    cfg = load_config(Path(run_dir) / "config.yaml")
    status = None
    try:
        status = RankStatus(cfg.run_dir, stage, int(os.environ["RANK"]))  # set by DeepSpeed's launcher
        importlib.import_module(f"stablekd.launcher.stages.{stage}").run(cfg)
    except BaseException as e:
        full = diskspace.disk_full(e, rundir.stage_dir(cfg, stage))
        if full:  # the launching process shows the first such line of any rank, once (console.py)
            # one write(): print's separate "\n" lets another rank's line land in the middle of this one
            sys.stderr.write(diskspace.full_line(stage, full) + "\n")
            sys.stderr.flush()
        # the component's message shortened, then the command that repairs the artifact it refuses, if any
        why = f"{type(e).__name__}: {hints.repair(cfg, e, limit=400)}"
        with suppress(OSError):  # a full disk refuses the status file too: the line above said it
            if status:
                status.end(f"failed: {why}")
        traceback.print_exc()
        # Leave at once: an ordinary exit would wait for the broken process group's pending work, one
        # launch.timeout_s per queued collective, before the launcher can end the job.
        leave(1)
    with suppress(OSError):  # done, whatever the status file: the job's exit status says it
        status.end("done")
    leave(0)


def leave(code: int) -> None:
    """Exit without the interpreter's teardown: every rank has finished (stages end on a barrier) and written
    what it writes; destroying gloo's threads at teardown aborted a rank now and then ("terminate called
    without an active exception", seen in 3 of ~8 suite runs)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
