"""What the launching process checks before a stage's ranks start (pipeline.run, after the upstream and
disk checks): what the stage will read exists and fits, refused in one line that names the file or key and
the command that fixes it, instead of a traceback from every rank.

Kept apart from the stage modules on purpose: those import DeepSpeed, the model code and transformers'
models (seconds in a fresh process), which this module does not, so neither a launch nor a refusal waits
for them. Only the paths that need them pay: a teacher checkpoint of another world size to convert, a
student directory whose embedding rows are counted. One function per stage, named like it (a stage
without one has nothing to check).
"""

from __future__ import annotations

import json
from pathlib import Path

from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.shards.format import CANDIDATES, SOFT_LABELS
from stablekd.data_pipeline.shards.manifest import read_manifest
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.ds_configs.resolve import zero_stage
from stablekd.launcher import hints, models, placement, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig


def teacher_checkpoint(cfg: ExperimentConfig, stage: str) -> None:
    """A complete teacher checkpoint that a job of `stage`'s world size can load (soft_labels, and distill
    with an online teacher). When training saved its shards on another number of ranks (distill.include
    placed the job on fewer), node 0 converts it to a universal checkpoint once; the other nodes' ranks
    meet node 0's, which start after it, so they neither convert nor check."""
    from stablekd.model.teacher_checkpoint import checkpoint_source, make_universal

    if rundir.follower(cfg):
        return
    ckpt, world = rundir.ckpt_dir(cfg, "teacher"), placement.world_size(cfg, stage)
    if made := make_universal(ckpt, world):
        rundir.say(
            f"{stage}: the teacher's ZeRO shards are of another world size; made {made} for {world} ranks"
        )
    try:
        checkpoint_source(ckpt, world)
    except ConfigError as e:  # no complete checkpoint: train (resume) it; one named but gone: train it anew
        fix = hints.finish(cfg, "teacher") if read_marker(ckpt) is None else hints.redo(cfg, "teacher")
        raise ConfigError(f"{e}; {fix}") from None


def teacher(cfg: ExperimentConfig) -> None:
    """A previous run to start from must have been trained as this one trains: same ZeRO stage and dtype
    (DeepSpeed lays out and names its checkpoint files by both)."""
    init = models.teacher_init_checkpoint(cfg)
    if init is None:
        return
    theirs_path = init.parent.parent / "ds" / "teacher.json"
    if not theirs_path.is_file():
        raise ConfigError(
            f"teacher.init_from: {theirs_path} missing (the previous run's resolved DeepSpeed JSON)"
        )
    theirs, ours = json.loads(theirs_path.read_text()), placement.resolve_ds_config(cfg, "teacher")
    for what, a, b in (
        ("ZeRO stage", zero_stage(theirs), zero_stage(ours)),
        ("bf16", theirs.get("bf16", {}).get("enabled"), ours.get("bf16", {}).get("enabled")),
    ):
        if a != b:
            raise ConfigError(
                f"teacher.init_from: {init} was saved with {what} {a}, this run has {b}; use the same "
                f"teacher.ds_config / teacher.dtype, or start from the exported model "
                f"(teacher.model={init.parent / 'hf'})"
            )


def soft_labels(cfg: ExperimentConfig) -> None:
    """The teacher's checkpoint and its resolved DeepSpeed JSON."""
    teacher_checkpoint(cfg, "soft_labels")
    if not rundir.ds_path(cfg, "teacher").is_file():
        raise ConfigError(
            f"{rundir.ds_path(cfg, 'teacher')}: missing (written when the teacher stage starts); "
            f"{hints.finish(cfg, 'teacher')}"
        )


def _student(cfg: ExperimentConfig) -> None:
    """Refuse a student that cannot read the soft labels: fewer embedding rows than its tokenizer has ids,
    soft labels of another tokenizer than the run's, another T. (A student directory with another tokenizer
    of its own and distill.cross_tokenizer=off is refused earlier, by models.check_models; more rows than
    ids, a padded vocabulary, is fine.)"""
    d, sl = cfg.distill, cfg.soft_labels
    if d.temperature != sl.temperature:
        raise ConfigError(
            f"distill.temperature {d.temperature} != soft_labels.temperature {sl.temperature}: the soft "
            "labels hold the teacher's log-probs at soft_labels.temperature; set both to the same T"
        )
    tok_dir, student_tok = models.tokenizer_dir(cfg), models.student_tokenizer_dir(cfg)
    if Path(cfg.student.model).is_dir():
        from transformers import AutoConfig

        from stablekd.model.build import rows as embedding_rows  # transformers' models

        rows, ids = (
            embedding_rows(AutoConfig.from_pretrained(cfg.student.model)),
            len(load_tokenizer(student_tok)),
        )
        if rows < ids:
            raise ConfigError(
                f"student.model {cfg.student.model}: {rows} embedding rows, but its tokenizer "
                f"{models.describe_tokenizer(student_tok)} has {ids} ids: every id needs a row"
            )
    if d.online:
        return  # the teacher in this job labels with the run's tokenizer
    out = rundir.stage_dir(cfg, "soft_labels")
    if d.follow and not (out / "manifest.json").is_file():
        return  # the writer may not have started: the reader checks every rank manifest as it comes
    meta = read_manifest(out, SOFT_LABELS)["meta"]
    # The hash of the tokenizer's files: the same files have the same ids, so the vocabulary is not loaded
    # (transformers and torch: ~2.5 s of every launch)
    if meta["tokenizer_hash"] != tokenizer_hash(tok_dir):
        raise ConfigError(
            f"{out / 'manifest.json'}: soft labels of a tokenizer with {meta['vocab_size']} ids (hash "
            f"{meta['tokenizer_hash'][:12]}), but the run's tokenizer is {models.describe_tokenizer(tok_dir)}: "
            "relabel with `stablekd stage soft_labels` after changing the tokenizer"
        )


def distill(cfg: ExperimentConfig) -> None:
    """The teacher checkpoint of an online teacher, and a student that can read the soft labels."""
    if cfg.distill.online or cfg.distill.on_policy:
        teacher_checkpoint(cfg, "distill")
    _student(cfg)


def contrastive(cfg: ExperimentConfig) -> None:
    """The distilled student and the candidate groups exist and match this run's tokenizer."""
    hf = rundir.contrastive_start(cfg)
    if cfg.contrastive.init_from and not (hf / "config.json").is_file():
        raise ConfigError(f"contrastive.init_from: {hf} is no Hugging Face model directory (no config.json)")
    if not (hf / "config.json").is_file():
        raise ConfigError(
            f"{hf}: missing (distill exports it with distill.export_hf=true); "
            + hints.redo(cfg, "distill", f"run `{hints.command(cfg, 'distill')} distill.export_hf=true`")
        )
    cand = rundir.stage_dir(cfg, "soft_labels") / "candidates"
    meta = read_manifest(cand, CANDIDATES, {"tokenizer_hash": tokenizer_hash(models.tokenizer_dir(cfg))})[
        "meta"
    ]
    if meta["ctx_len"] + meta["max_new_tokens"] > cfg.data.seq_len:
        raise ConfigError(
            f"{cand}: contexts of {meta['ctx_len']} + continuations of {meta['max_new_tokens']} tokens exceed "
            f"data.seq_len {cfg.data.seq_len}, the positions the student was trained on"
        )
    if cfg.contrastive.lm == "kd":
        read_manifest(rundir.stage_dir(cfg, "soft_labels"), SOFT_LABELS)
    if cfg.contrastive.labels == "truth" and cfg.data.paths:
        raise ConfigError(
            "contrastive.labels=truth: the ground truth exists for the built-in bios corpus only; this run "
            "trains on data.paths (use auto, reference or majority)"
        )


def evaluate(cfg: ExperimentConfig) -> None:
    """A model to evaluate, a coherence encoder that is a model directory, the bios corpus's ground truth."""
    models.find_models(cfg.run_dir)
    if cfg.evaluate.coherence_encoder:
        models.encoder_dir(cfg.evaluate.coherence_encoder)
    if not cfg.data.paths and not (cfg.run_dir / "data" / "truth.json").is_file():
        raise ConfigError(
            f"evaluate: {cfg.run_dir / 'data' / 'truth.json'} missing (the bios corpus's ground truth)"
        )
