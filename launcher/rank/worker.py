"""What each rank runs: `python -m stablekd.launcher.rank.worker <stage> <run_dir>` (started by the deepspeed runner),
or `python -u .../worker.py <stage> <run_dir>` where the runner's slurm backend starts it through srun."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file (the runner's slurm backend): Python put launcher/ first on sys.path, where config/,
    # models.py, status.py ... would shadow any top-level module of those names.
    sys.path.pop(0)

import importlib  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from contextlib import suppress  # noqa: E402
from pathlib import Path  # noqa: E402

from stablekd.launcher import diskfull, hints, rundir
from stablekd.launcher.config import load_config
from stablekd.launcher.rank_status import RankStatus


def slurm_rank_env(env: dict[str, str]) -> dict[str, str]:
    """The variables DeepSpeed's per-node launcher would have set, from Slurm's, for a rank srun started
    itself (the runner's slurm backend): {} where RANK is set already or this is no Slurm task. Slots are
    even across hosts (the runner's slurm backend refuses others), so local size = tasks / nodes."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    local = str(
        int(env["SLURM_NTASKS"]) // int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    )
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_SIZE": local,
        "LOCAL_WORLD_SIZE": local,
    }


def main(argv: list[str]) -> None:
    stage, run_dir = argv
    os.environ.update(slurm_rank_env(dict(os.environ)))
    # DeepSpeed 0.19 still calls collectives torch 2.13 deprecated: one warning per call site and rank.
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    cfg = load_config(Path(run_dir) / "config.yaml")
    status = None
    try:
        status = RankStatus(
            cfg.run_dir, stage, int(os.environ["RANK"])
        )  # set by DeepSpeed's launcher or from Slurm's
        importlib.import_module(f"stablekd.launcher.stages.{stage}").run(cfg)
    except BaseException as e:
        full = diskfull.disk_full(e, rundir.stage_dir(cfg, stage))
        if full:  # the launching process shows the first such line of any rank, once (console.py)
            # one write(): print's separate "\n" lets another rank's line land in the middle of this one
            sys.stderr.write(diskfull.full_line(stage, full) + "\n")
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
