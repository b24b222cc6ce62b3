"""A stage's config hash, its DONE.json and the upstream checks (docs/architecture.md, The run directory).

A stage whose DONE.json carries the hash it would have now is done (skipped); a training stage finished
with another config is refused (its checkpoints would mix); a stage starts only when every stage it reads
(registry `needs`/`uses`) has finished with the config it would have now.
"""

from __future__ import annotations

import json
import time

from stablekd.data_pipeline.files import atomic_write
from stablekd.launcher import hints, rundir
from stablekd.launcher.config import HASH_SCHEMA, ConfigError, ExperimentConfig, changed, config_hash
from stablekd.launcher.stages import NAMES, spec

# Section fields that do not change what a stage computes: logging/saving cadence may change on resume, and
# where the job runs (distill.include) is no training choice (its world size is in the DeepSpeed JSON).
_NOT_HASHED = {
    "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "export_hf", "include",
}  # fmt: skip


def _data_hashed(cfg: ExperimentConfig) -> dict:
    data = {k: v for k, v in changed(cfg.data).items() if k not in ("text_unit", "eval_fraction")}
    return {**data, **rundir.new_reading(cfg)}


def stage_hash(cfg: ExperimentConfig, stage: str, ds: dict | None = None) -> str:
    """What a stage's result depends on: its section (and the registry's `sections`), data, tokenizer, seed,
    DeepSpeed JSON, and the hashes in the DONE.json of every earlier stage present (a retrained teacher
    makes its soft labels stale); for a stage it follows while that runs, the hash that one will have.
    `ds`: the stage's resolved DeepSpeed JSON when it is not written yet (a dry run); else ds/<stage>.json.
    Config sections count by the values that differ from their defaults (`config.changed`), so an upgrade
    that adds a key with a default keeps the hashes of runs in progress."""
    section = {k: v for k, v in changed(getattr(cfg, stage)).items() if k not in _NOT_HASHED}
    extra = [changed(getattr(cfg, name)) for name in spec(stage).sections]
    ds_path = rundir.ds_path(cfg, stage)
    if ds is None:
        ds = json.loads(ds_path.read_text()) if ds_path.exists() else {}
    ds = {k: v for k, v in ds.items() if k != "tensorboard"}  # the run directory's path: no training choice
    # A stage read while it still runs (distill.follow: soft_labels) counts with the hash it will finish
    # with: the follower's checkpoints must keep their hash once it has (check_upstream holds it to that).
    following = {s for s, required in upstream(cfg, stage).items() if not required}
    earlier = {
        s: stage_hash(cfg, s) if s in following else done_hash(cfg, s) for s in NAMES[: NAMES.index(stage)]
    }
    earlier = {s: h for s, h in earlier.items() if h is not None}
    return config_hash(
        HASH_SCHEMA, section, *extra, _data_hashed(cfg), changed(cfg.tokenizer), cfg.run.seed, ds, earlier
    )


def done_hash(cfg: ExperimentConfig, stage: str) -> str | None:
    """The config hash in a stage's DONE.json; None when it has none (not finished, or unreadable)."""
    try:
        return json.loads(rundir.done_path(cfg, stage).read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):  # missing, not JSON / not UTF-8, not a mapping
        return None


def is_done(cfg: ExperimentConfig, stage: str, ds: dict | None = None) -> bool:
    """DONE.json matches the current config (`ds`: see stage_hash); a training stage that finished with
    another config is a ConfigError (its checkpoints would mix), an in-process one just runs again."""
    path = rundir.done_path(cfg, stage)
    if not path.exists():
        return False
    done, now = done_hash(cfg, stage), stage_hash(cfg, stage, ds)
    if done != now:
        if not spec(
            stage
        ).on_ranks:  # no checkpoint to mix up: cheap to redo (e.g. evaluate after a new model)
            rundir.say(f"{stage}: inputs or config changed since {path}, running it again")
            return False
        raise ConfigError(
            f"{path}: stage {stage} finished with another config (hash {done}, now {now}); use a new "
            f"run.out_dir, or {hints.redo(cfg, stage, hints.SAME_COMMAND)}"
        )
    return True


def upstream(cfg: ExperimentConfig, stage: str) -> dict[str, bool]:
    """The earlier stages `stage` reads (registry `needs` and `uses`) -> whether each must be finished.

    A `uses` stage counts only once its directory exists. distill.online reads the teacher instead of
    soft_labels/; distill.follow reads soft_labels/ while it is still written (required only to match
    when it has finished); distill.on_policy scores the student's samples with the teacher too;
    contrastive.init_from starts from a student of its own instead of distill's."""
    row = spec(stage)
    needs = {s: True for s in row.needs}
    needs |= {s: True for s in row.uses if rundir.stage_dir(cfg, s).is_dir()}
    if stage == "distill" and cfg.distill.online:
        needs = {"teacher": True}
    elif stage == "distill" and cfg.distill.follow:
        needs["soft_labels"] = False
    if stage == "distill" and cfg.distill.on_policy:
        needs["teacher"] = True
    if stage == "contrastive" and cfg.contrastive.init_from:
        del needs["distill"]  # its student comes from elsewhere: this run's distill stage is not read
    return needs


def check_upstream(cfg: ExperimentConfig, stage: str) -> None:
    """In the launching process, before any rank starts: every stage `stage` reads has finished with the
    config it would have now (its DONE.json carries `stage_hash`), as the driver judges a stage done. A
    checkpoint alone is not enough: a stage killed (or still running) after its last checkpoint has no
    DONE.json. A ConfigError names the DONE.json and the command that finishes or redoes that stage."""
    for s, required in upstream(cfg, stage).items():
        path = rundir.done_path(cfg, s)
        if not path.exists():
            if not required:
                continue
            raise ConfigError(
                f"{stage}: {path} missing: stage {s} has not finished (killed, still running or never "
                f"started); {hints.finish(cfg, s)}"
            )
        done, now = done_hash(cfg, s), stage_hash(cfg, s)
        if done != now:
            raise ConfigError(
                f"{stage}: {path} has config hash {done}, but stage {s} would have {now} with this config "
                f"(its section, data, tokenizer, seed, DeepSpeed JSON or an earlier stage changed): use the "
                f"config it finished with, or {hints.redo(cfg, s)}"
            )


def write_done(cfg: ExperimentConfig, stage: str, produced: dict, inputs: dict) -> None:
    """The stage's last act: what it produced, its config hash, and hashes of what it read."""
    done = {
        "stage": stage,
        "config_hash": stage_hash(cfg, stage),
        "produced": produced,
        "inputs": inputs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = rundir.done_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(done, indent=2))
