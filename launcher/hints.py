"""What to run to repair an artifact a stage refuses: every refusal about a run directory's artifacts
(a corrupted or mismatched shard, a DONE.json or data_order.json of another config, a missing or
incomplete checkpoint, an unfinished upstream stage) ends with the command that redoes or resumes it.

Components (data_pipeline/, model/) name what is wrong and never import the launcher; the launcher, where
it raises or catches their errors, appends the command. A command runs another stage with the run
directory's own config.yaml: the launch that refuses has just written it (or, on the ranks, read it), so
it holds exactly this launch's values and overrides.
"""

from __future__ import annotations

from stablekd.data_pipeline.shards.format import ShardError
from stablekd.launcher import rundir
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.stages import REGISTRY

SAME_COMMAND = "rerun the same command"


def command(cfg: ExperimentConfig, stage: str) -> str:
    """`stablekd stage <stage> <run_dir>/config.yaml`, e.g. stablekd stage teacher runs/quickstart/config.yaml."""
    return f"stablekd stage {stage} {cfg.run_dir / 'config.yaml'}"


def finish(cfg: ExperimentConfig, stage: str) -> str:
    """For a stage not finished (killed, never started): running it resumes from its last checkpoint."""
    return f"run `{command(cfg, stage)}` to finish it"


def redo(cfg: ExperimentConfig, stage: str, how: str | None = None) -> str:
    """For a stage whose result cannot be used: delete its directory, run it again (`how`: another
    command, e.g. SAME_COMMAND when the refused launch is the one to repeat)."""
    return f"to redo it: delete {rundir.stage_dir(cfg, stage)} and {how or f'run `{command(cfg, stage)}`'}"


def producer(cfg: ExperimentConfig, text: str) -> str | None:
    """The stage whose directory a message names first (soft_labels/candidates/... -> soft_labels)."""
    found = [
        (text.find(f"{cfg.run_dir / s.out_dir}/"), s.name)
        for s in REGISTRY
        if f"{cfg.run_dir / s.out_dir}/" in text
    ]
    return min(found)[1] if found else None


def repair(cfg: ExperimentConfig, e: BaseException, limit: int | None = None) -> str:
    """`e`'s message on one line (its first `limit` characters), ending with the command that redoes the
    artifact it refuses when it is a shard or manifest of this run (a ShardError names the file: its stage
    wrote it); else the message alone."""
    msg = " ".join(str(e).split())[:limit]
    stage = producer(cfg, msg) if isinstance(e, ShardError) else None
    return f"{msg}; {redo(cfg, stage)}" if stage else msg
