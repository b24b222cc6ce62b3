"""Stage `distill`: a smaller student learns from the teacher's soft labels.

    stablekd stage distill configs/quickstart.yaml run.out_dir=runs/quickstart

Runs on ranks with its own DeepSpeed JSON (`distill.ds_config`, any ZeRO stage; `ds/distill.json`).
Soft labels come from (`artifacts.open_soft_labels`, one interface):
- the shards of soft_labels/ (default), in epochs of equal length on every rank;
- the same shards while the soft_labels stage still writes them (`distill.follow=true`);
- the sharded ZeRO-3 teacher in this job (`distill.online=true`), loaded from its checkpoint as the
  soft_labels stage loads it, labelling the looping training stream with the same encoding and T.
Loss (objectives/kd_losses.py): alpha · KD + (1 − alpha) · CE, each the mean over the counted tokens of the
global batch (terms "kd" and "ce" of the shared loop); KD is at temperature T, × T²: on `sampled` soft
labels (the default encoding) an unbiased estimate of the forward KL (kind fkl only), on `topk` / `topp`
the `distill.kind` divergence on the kept ids + one tail bin. Eval loss: next-token cross-entropy on
held-out text.
A student with another tokenizer (`distill.cross_tokenizer=uld|hybrid`, student.model a directory with its
own) reads the same soft labels realigned by text (data_pipeline/align.py: its own tokens and labels, the
teacher's entries at the positions where token boundaries coincide) and learns ULD or the hybrid there
(objectives/cross_tokenizer.py), CE on its own tokens; it is exported with its own tokenizer.

Leaves student/ckpt/<tag> (resumable, with each rank's reader position), student/hf (Hugging Face model +
tokenizer) and student/DONE.json. TensorBoard tb/distill: train/loss, train/kd, train/ce (alpha < 1),
train/student_topk_mass, train/top1_agreement (train/aligned_share across tokenizers), perf/tokens_per_s, perf/mfu (student FLOPs only).
"""

from __future__ import annotations

import json

from transformers.integrations import HfDeepSpeedConfig

from stablekd.data_pipeline.stream import eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.ds_configs.resolve import zero_stage
from stablekd.launcher import done, models, rundir
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.rank import artifacts, distill_parts, engine
from stablekd.model.build import build_model


def run(cfg: ExperimentConfig) -> None:
    rank, world = engine.setup_distributed(cfg.launch.threads_per_rank, cfg.launch.timeout_s)
    engine.seed_rng(cfg.run.seed)  # runs of one config draw the same (dropout, any sampling)
    d, run_dir, seq_len = cfg.distill, cfg.run_dir, cfg.data.seq_len
    # The online teacher first: its HfDeepSpeedConfig must not be alive while the student is built.
    teacher = artifacts.sharded_teacher(cfg) if d.online or d.on_policy else None
    ds = json.loads(rundir.ds_path(cfg, "distill").read_text())
    zero3 = zero_stage(ds) == 3
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841  (student built inside zero.Init)
    tok_dir = models.student_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tok_dir)
    student = build_model(cfg.student.model, tokenizer, seq_len, cfg.run.seed)
    micro = ds["train_micro_batch_size_per_gpu"]
    batches, aligner = distill_parts.student_batches(
        cfg, rank, world, micro, tokenizer, teacher, student, zero3
    )
    evals = eval_batches(rundir.eval_files(cfg), tok_dir, seq_len, micro, d.eval_batches, rank, world)
    stage = distill_parts.build_stage(cfg, student, tokenizer, batches, evals, aligner)
    result = engine.train(stage, d, ds, run_dir, done.stage_hash(cfg, "distill"), cfg.run.trace_samples)

    produced = {"source": "online teacher" if d.online else str(rundir.stage_dir(cfg, "soft_labels"))}
    if aligner is not None:
        produced["cross_tokenizer"] = d.cross_tokenizer
    if d.on_policy:
        produced["on_policy"] = d.on_policy
    if teacher is not None:
        produced["teacher_checkpoint"] = teacher.checkpoint_id
    artifacts.finish_training(
        cfg, "distill", result, result.engine.module, tokenizer, ds, produced,
        {"tokenizer_hash": tokenizer_hash(models.tokenizer_dir(cfg)), "student_tokenizer_hash": tokenizer_hash(tok_dir),
         "student": cfg.student.model},
    )  # fmt: skip
