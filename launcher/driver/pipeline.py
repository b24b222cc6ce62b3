"""Stage order, run-directory layout, preparation (corpus, tokenizer, DeepSpeed JSON), DONE.json skip/resume.

Layout: runs/<name>/{config.yaml, ds/<stage>.json, data/, tokenizer/, teacher/, tb/<stage>/,
logs/<stage>.log}. A stage whose DONE.json carries the current config hash is skipped; one with a
checkpoint but no DONE.json resumes (the training loop finds its last complete checkpoint); a stage
starts only when every stage it reads (registry `needs`/`uses`) has such a DONE.json. `run` says
one line when a stage starts and one when it ends (wall time, headline figures of its DONE.json);
`dry_run` lists what `run` would start, starting and writing nothing.
"""

from __future__ import annotations

import errno
import importlib
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.shards.format import ShardError
from stablekd.launcher import diskfull, done, hints, models, placement, rundir
from stablekd.launcher.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    to_dict,
)
from stablekd.launcher.driver import diskspace, nodes, preflight, prepare, runlock
from stablekd.launcher.driver.status import headline, wall
from stablekd.launcher.stages import spec

if TYPE_CHECKING:  # annotations only: the driver process does not import torch/DeepSpeed to plan a run
    pass

# Section fields that do not change what a stage computes: logging/saving cadence may change on resume, and
# where the job runs (distill.include) is no training choice (its world size is in the DeepSpeed JSON).


def _run_hash(cfg: ExperimentConfig) -> str:
    """The config every node must share: all but `launch` (node_rank differs per node)."""
    return config_hash({k: v for k, v in to_dict(cfg).items() if k != "launch"})


def _wait_for(path: Path, what: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise ConfigError(
                f"waited {timeout_s:.0f}s (launch.timeout_s) for {what} ({path} missing): is node 0 running?"
            )
        time.sleep(0.5)


def _in_process(cfg: ExperimentConfig, stage: str) -> bool:
    """The stage runs in the launching process: not on ranks, and not an in-process stage whose
    `needs_ranks(cfg)` says True (evaluate of a teacher in ZeRO-3 shards starts ranks too)."""
    if spec(stage).on_ranks:
        return False  # its module is not imported here: the ranks import it (seconds of DeepSpeed and models)
    module = importlib.import_module(spec(stage).module)
    return not (hasattr(module, "needs_ranks") and module.needs_ranks(cfg))


def run(cfg: ExperimentConfig, stages: list[str], verbose: bool = False) -> None:
    """Prepare, then launch each stage not already done (DeepSpeed's launcher, one job per stage).

    `verbose`: every line of DeepSpeed, PyTorch and the ranks on the terminal; else those go only to
    logs/<stage>.log (this process's own to logs/pipeline.log) and the terminal gets our own lines and
    the progress bar (console.ConsoleFilter).
    """
    from stablekd.launcher.driver.console import driver_log

    # One run per directory: node 0 (the one that prepares it) holds the run directory's lock until its
    # last stage has ended; the other nodes of a no_ssh launch write only what node 0's launch told them to.
    at = {"stage": "prepare"}  # what this process was doing, for a full disk's one line
    try:
        with ExitStack() as stack:
            if not rundir.follower(cfg):
                stack.enter_context(runlock.hold(cfg.run_dir))
            stack.enter_context(driver_log(cfg, "pipeline", verbose))
            _run(cfg, stages, verbose, at)
    except (
        OSError
    ) as e:  # this process's own writes: config.yaml, corpus, tokenizer, data_order.json, DONE.json
        if e.errno != errno.ENOSPC:
            raise
        raise SystemExit(diskfull.full_line(at["stage"], e.filename or cfg.run_dir)) from None


def _groups(cfg: ExperimentConfig, stages: list[str]) -> list[list[str]]:
    """The stages in the jobs that start together: each alone, but distill beside soft_labels when
    distill.include and distill.follow place it on slots of its own (launcher/placement.py)."""
    together = placement.concurrent(cfg) and {"soft_labels", "distill"} <= set(stages)
    return [
        ["soft_labels", "distill"] if together and s == "soft_labels" else [s]
        for s in stages
        if not (together and s == "distill")
    ]


def _run(cfg: ExperimentConfig, stages: list[str], verbose: bool, at: dict) -> None:
    from stablekd.launcher.driver import data_order
    from stablekd.launcher.driver.console import driver_log

    # With launch.no_ssh every node runs this command; node 0 prepares, the others wait for it
    from stablekd.launcher.driver.supervise import run_stages

    # With launch.no_ssh every node runs this command; node 0 prepares, the others wait for it
    # (the run directory is on a filesystem every node sees) and never run in-process stages.
    follower = rundir.follower(cfg)
    if follower:
        nodes.follow(cfg, _run_hash(cfg))  # node 0 has prepared this launch, with this config
    else:
        for stage in stages:  # before anything is written: a resume on other data is refused
            if spec(stage).on_ranks:
                data_order.check(cfg, stage)
        prepare.prepare(cfg, stages)
        if cfg.launch.no_ssh:
            nodes.lead(cfg, _run_hash(cfg))  # the other nodes read the run directory from here on

    def ready(stage: str) -> bool:
        """The checks of a stage that must run, before any job of its group starts; False: skipped."""
        if follower and _in_process(cfg, stage):
            return False
        if done.is_done(cfg, stage):
            rundir.say(f"{stage}: done already ({rundir.done_path(cfg, stage)}), skipped")
            return False
        # what it reads finished with this config (DONE.json), before any rank
        done.check_upstream(cfg, stage)
        if not follower:  # node 0 checks the shared run directory's filesystem for every node
            diskspace.check(cfg, stage)
        if check := getattr(preflight, stage, None):
            try:  # what the previous stage left, checked before any rank starts
                check(cfg)
            except ShardError as e:  # a shard or manifest it refuses: the command that redoes it
                raise ConfigError(hints.repair(cfg, e)) from None
        return True

    for group in _groups(cfg, stages):
        at["stage"] = group[0]
        todo = [stage for stage in group if ready(stage)]
        if not todo:
            continue
        for stage in todo:
            if spec(stage).on_ranks and not follower:
                data_order.record(cfg, stage)  # what it starts on, for the check of a later resume
            marker = read_marker(rundir.ckpt_dir(cfg, stage))
            where = f" on {placement.include_arg(placed)}" if (placed := placement.slots(cfg, stage)) else ""
            rundir.say(
                f"[{stage}] started{where}" + (f", resuming from step {marker['step']}" if marker else "")
            )
        t0 = time.perf_counter()
        if _in_process(cfg, todo[0]):
            with driver_log(cfg, todo[0], verbose):
                importlib.import_module(spec(todo[0]).module).run(cfg)
            walls = {todo[0]: time.perf_counter() - t0}
        else:
            walls = run_stages(cfg, todo, verbose)
        for stage in todo:
            if follower:  # global rank 0, on node 0, writes DONE.json after this node's ranks may have exited
                _wait_for(
                    rundir.done_path(cfg, stage), f"node 0 to finish stage {stage}", cfg.launch.timeout_s
                )
            if not rundir.done_path(cfg, stage).exists():
                raise RuntimeError(f"stage {stage} exited without writing {rundir.done_path(cfg, stage)}")
            record = json.loads(rundir.done_path(cfg, stage).read_text())
            rundir.say(
                f"[{stage}] done in {wall(walls[stage])}: "
                f"{headline(stage, record, rundir.stage_dir(cfg, stage))} -> {rundir.stage_dir(cfg, stage)}"
            )


def dry_run(cfg: ExperimentConfig, stages: list[str]) -> list[str]:
    """What `run` would do with the run directory as it stands: a `#` line per step and each job's command
    as one shell line (its environment, then the launcher's argument list, shell-quoted).

    Starts nothing and writes nothing: the DeepSpeed JSONs are resolved and checked in memory. Stages are
    judged as the directory is now; one after a stage that would run may be judged again once it has.
    """
    from stablekd.launcher.driver.console import diverted

    with diverted(sys.stderr, python_warnings=False):  # stdout: only the plan
        return _dry_run(cfg, stages)


def _dry_run(cfg: ExperimentConfig, stages: list[str]) -> list[str]:
    from stablekd.launcher.driver import data_order
    from stablekd.launcher.driver.launch import display_command

    prepare.check_files(cfg)
    lines = [f"# stablekd dry run of {cfg.run_dir}: nothing is started or written"]
    follower = rundir.follower(cfg)
    if follower:
        lines.append(
            f"# node {cfg.launch.node_rank}: wait for node 0 to prepare {cfg.run_dir} (handshake on master_port + 1)"
        )
    else:
        todo = ["config.yaml"]
        if not cfg.data.paths and not prepare.is_current(cfg.run_dir / "data", to_dict(cfg.data.bios)):
            todo.append("data/ (bios corpus)")
        if models.trains_tokenizer(cfg) and not prepare.is_current(
            models.tokenizer_dir(cfg), prepare.tokenizer_params(cfg)
        ):
            todo.append("tokenizer/ (SentencePiece)")
        todo += [f"ds/{s}.json" for s in stages if spec(s).trains]
        lines.append(f"# prepare {cfg.run_dir}: " + ", ".join(todo))
    ds = {s: placement.resolve_ds_config(cfg, s) for s in stages if spec(s).trains}
    for stage in stages:
        in_process = _in_process(cfg, stage)
        if follower and in_process:
            lines.append(f"# {stage}: runs on node 0 only")
            continue
        if done.is_done(cfg, stage, ds.get(stage)):
            lines.append(f"# {stage}: done already ({rundir.done_path(cfg, stage)}), would be skipped")
            continue
        if spec(stage).on_ranks:
            data_order.check(cfg, stage)
        marker = read_marker(rundir.ckpt_dir(cfg, stage))
        resume = f", resuming from step {marker['step']}" if marker else ""
        if in_process:
            lines.append(f"# {stage}: would run in this process{resume} (no command)")
        else:
            placed = placement.slots(cfg, stage)
            where = f" ({placement.include_arg(placed)})" if placed else ""
            group = next(g for g in _groups(cfg, stages) if stage in g)
            beside = "".join(
                f", beside {other} (distill.follow)"
                for other in group
                if other != stage and not done.is_done(cfg, other, ds.get(other))
            )
            lines.append(
                f"# {stage}: would run on {placement.world_size(cfg, stage)} ranks{where}{beside}{resume}"
            )
            lines.append(display_command(cfg, stage))
    return lines
