"""What the distill stage is made of, shared with the benchmarks that train its arms: the student's soft-label
batches (realigned for a student with another tokenizer) and the stage for the shared loop."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from stablekd.data_pipeline.align import TOKEN_BYTES_FILE, Aligner, Realign, TokenBytes
from stablekd.launcher import artifacts, engine, models, rundir
from stablekd.launcher.config import ExperimentConfig
from stablekd.model.build import flops_per_token
from stablekd.objectives.distill import soft_label_counts, soft_label_weights
from stablekd.objectives.kd_losses import cross_counts, cross_tokenizer_loss, soft_label_loss
from stablekd.objectives.lm import lm_loss


def teacher_token_bytes(cfg: ExperimentConfig, teacher: Any = None) -> TokenBytes:
    """The bytes of the teacher's ids: from the online teacher's tokenizer, else soft_labels/token_bytes
    (written before the first shard; with distill.follow awaited like a shard)."""
    if teacher is not None:
        return TokenBytes.from_tokenizer(teacher.tokenizer)
    path = rundir.stage_dir(cfg, "soft_labels") / TOKEN_BYTES_FILE
    deadline = time.monotonic() + (
        min(cfg.distill.follow_timeout_s, cfg.launch.timeout_s) if cfg.distill.follow else 0
    )
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    return TokenBytes.load(path)


def student_batches(
    cfg: ExperimentConfig, rank: int, world: int, micro: int, tokenizer: Any, teacher: Any = None
) -> tuple[Any, Aligner | None]:
    """Soft-label batches for the student (artifacts.open_soft_labels) and, across tokenizers, the Aligner
    that realigns them for its `tokenizer` (data_pipeline/align.py), else None."""
    batches = artifacts.open_soft_labels(cfg, rank, world, micro, teacher)
    if not models.cross_tokenizer(cfg):
        return batches, None
    aligner = Aligner(teacher_token_bytes(cfg, teacher), tokenizer, cfg.data.seq_len)
    return Realign(batches, aligner), aligner


def build_stage(
    cfg: ExperimentConfig,
    student: torch.nn.Module,
    tokenizer: Any,
    batches: Any,
    evals: list[dict],
    aligner: Aligner | None = None,
) -> engine.Stage:
    """The distill stage for the shared loop: `student` learning from `batches` with alpha · KD + (1 − alpha)
    · CE over its tokenizer's ids (across tokenizers when `aligner` realigned them), eval loss on `evals`."""
    d, vocab = cfg.distill, len(tokenizer)
    if aligner is None:
        loss = soft_label_loss(d.kind, d.temperature, d.beta, d.skew, d.alpha, vocab)
        count = soft_label_counts
    else:
        vmap = torch.from_numpy(aligner.vocab_map) if d.cross_tokenizer == "hybrid" else None
        loss = cross_tokenizer_loss(
            d.cross_tokenizer, d.kind, d.temperature, d.beta, d.skew, d.alpha, vocab, vmap
        )
        count = cross_counts
    return engine.Stage(
        "distill", student, batches, loss, evals, flops_per_token(student, cfg.data.seq_len),
        weights=soft_label_weights(d.alpha), count=count, eval_loss=functools.partial(lm_loss, vocab=vocab),
    )  # fmt: skip
