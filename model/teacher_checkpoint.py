"""The teacher's ZeRO checkpoint on disk: which tag a job of some world size loads, and the one-time
conversion to a universal checkpoint for another world size (model/sharded_teacher.py loads it).

No torch, DeepSpeed or transformers here (~2.5 s to import): the launching process checks the checkpoint
before any rank starts.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from stablekd.data_pipeline.errors import ConfigError
from stablekd.data_pipeline.files import read_marker

UNIVERSAL_SUFFIX = "_universal"


def checkpoint_source(ckpt_dir: Path, world_size: int) -> tuple[dict, str, bool]:
    """(marker, tag to load, universal?) for a job of `world_size` ranks; ConfigError says what to do otherwise.

    Same world size as training: the tag complete.json names, loaded rank by rank. Another world size:
    `<tag>_universal` if `ds_to_universal` made it, else an error with the exact command.
    """
    marker = read_marker(ckpt_dir)
    if marker is None:
        raise ConfigError(f"{ckpt_dir}/complete.json: missing: no complete teacher checkpoint")
    tag, saved = marker["tag"], int(marker["world_size"])
    if not (ckpt_dir / tag).is_dir():
        raise ConfigError(f"{ckpt_dir / tag}: named in complete.json but missing")
    if saved == world_size:
        return marker, tag, False
    universal = tag + UNIVERSAL_SUFFIX
    if (ckpt_dir / universal / "zero").is_dir():
        return marker, universal, True
    raise ConfigError(
        f"{ckpt_dir / tag} holds the ZeRO shards of {saved} ranks but this job has {world_size} ranks. "
        f"Start the stage through `stablekd run` or `stablekd stage`, which converts it once to {universal} "
        f"(DeepSpeed's ds_to_universal) before the ranks start, or run with {saved} ranks in all"
    )


def make_universal(ckpt_dir: Path, world_size: int) -> Path | None:
    """Convert the teacher checkpoint complete.json names into `<tag>_universal` when a job of `world_size`
    ranks needs it (training had another world size) and it is not there yet; returns what was made.

    DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`, an argument list) writes into a
    scratch directory that is renamed into place once it has finished: a killed conversion leaves no
    `<tag>_universal` that `checkpoint_source` would take as complete (its scratch is redone next time).
    Run it in one process (the launching one, node 0), before any rank starts.
    """
    marker = read_marker(ckpt_dir)
    if marker is None or int(marker["world_size"]) == world_size or not (ckpt_dir / marker["tag"]).is_dir():
        return None  # same world: loaded rank by rank; no checkpoint: checkpoint_source says so
    out = ckpt_dir / (marker["tag"] + UNIVERSAL_SUFFIX)
    if (out / "zero").is_dir():
        return None
    scratch = ckpt_dir / ".universal.partial"
    shutil.rmtree(scratch, ignore_errors=True)  # a conversion killed earlier
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt_dir / marker["tag"]), "--output_folder", str(scratch / out.name),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (scratch / out.name / "zero").is_dir():
        raise SystemExit(
            f"stablekd: {ckpt_dir / marker['tag']}: converting to a universal checkpoint for {world_size} ranks "
            f"failed (exit {proc.returncode}) running {shlex.join(cmd)}:\n{proc.stderr[-2000:]}"
        )
    (scratch / out.name).rename(out)
    shutil.rmtree(scratch)  # and the converter's latest_universal file beside its output
    return out
