"""What the distill stage is made of, shared with the benchmarks that train its arms: the student's soft-label
batches (realigned for a student with another tokenizer, or mixed with its own samples scored by the
teacher) and the stage for the shared loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from stablekd.data_pipeline.align import TOKEN_BYTES_FILE, Aligner, Realign, TokenBytes
from stablekd.data_pipeline.contexts import document_contexts
from stablekd.data_pipeline.on_policy import OnPolicy, TaskPrompts
from stablekd.launcher import models, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig
from stablekd.launcher.rank import artifacts, engine
from stablekd.model.build import flops_per_token, generation_config
from stablekd.objectives.kd import soft_label_counts, soft_label_weights
from stablekd.objectives.kd_losses import (
    ON_POLICY,
    cross_counts,
    cross_tokenizer_loss,
    on_policy_counts,
    soft_label_loss,
    with_on_policy,
)
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


class GumbelSampling:
    """A logits processor that makes greedy decoding draw from softmax(scores / temperature), cut to its
    top_p nucleus, with a torch.Generator of its own (Gumbel-max: argmax(log p + G) is a draw from p),
    seeded with `seed` on the scores' device at the first step.

    Why not generate's own sampling: it draws with torch.multinomial from the global RNG, which only
    reseeding can make reproducible, and torch.manual_seed reseeds every CUDA generator too (fork_rng
    with devices=[] restores none of them): the training RNG would be changed. With this, generate runs
    greedy and touches no global generator. Padded rows and other ids earlier processors set to −inf stay
    out."""

    def __init__(self, seed: int, temperature: float, top_p: float = 1.0) -> None:
        self.seed, self.temperature, self.top_p = seed, temperature, top_p
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        lp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:  # the smallest set of most likely ids whose mass reaches top_p (generate's rule)
            top, order = lp.sort(dim=-1, descending=True)
            before = top.exp().cumsum(-1) - top.exp()  # the mass of the ids ranked above each
            outside = before >= self.top_p  # in ranked order; scattered back to the ids' own places
            lp = lp.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
        # Exponential(1) draws E: −log E is Gumbel(0, 1); argmax(lp − log E) is a draw from exp(lp).
        race = torch.empty_like(lp).exponential_(generator=self.generator)
        return lp - race.log()


def sampler(
    student: torch.nn.Module,
    tokenizer: Any,
    new_tokens: int,
    temperature: float,
    synced: bool,
    top_p: float = 1.0,
) -> Callable:
    """(prompts (B, P), seed, attention_mask (B, P) or None for none padded) -> the student's sampled
    continuations (B, P + new_tokens): softmax at `temperature` cut to its `top_p` nucleus, drawn with a
    generator of its own seeded by `seed` (GumbelSampling: the global and CUDA RNGs are neither used nor
    reseeded), in eval mode (no dropout); `synced` (a ZeRO-3 student on several ranks): every rank
    forwards until all have finished. Left-padded prompts need their attention mask."""
    config = generation_config(tokenizer, max_new_tokens=new_tokens, do_sample=False)

    def sample(prompts: torch.Tensor, seed: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers import LogitsProcessorList

        device = next(student.parameters()).device
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
        was_training = student.training
        student.eval()
        try:
            return student.generate(
                input_ids=prompts.to(device), attention_mask=mask.to(device), synced_gpus=synced,
                generation_config=config,
                logits_processor=LogitsProcessorList([GumbelSampling(seed, temperature, top_p)]),
            )  # fmt: skip
        finally:
            student.train(was_training)

    return sample


def task_prompts(cfg: ExperimentConfig, tokenizer: Any) -> TaskPrompts:
    """distill.on_policy_prompts=tasks: the prompts of the first distill.on_policy_task_prompts task records
    of the run's training files, each [EOS] + its last on_policy_prompt_tokens − 1 ids."""
    d, files = cfg.distill, rundir.train_files(cfg)
    contexts = document_contexts(
        files, tokenizer, d.on_policy_task_prompts, d.on_policy_prompt_tokens - 1, True
    )
    if not contexts:
        raise ConfigError(
            f"distill.on_policy_prompts=tasks: no task record (prompt + response, or messages) in "
            f"data.paths {', '.join(map(str, files))}; use on_policy_prompts=records"
        )
    return TaskPrompts([c.context for c in contexts])


def student_batches(
    cfg: ExperimentConfig,
    rank: int,
    world: int,
    micro: int,
    tokenizer: Any,
    teacher: Any = None,
    student: torch.nn.Module | None = None,
    zero3: bool = False,
) -> tuple[Any, Aligner | None]:
    """The student's micro-batches and, across tokenizers, the Aligner that realigned them (else None).

    Soft labels come from artifacts.open_soft_labels (online from `teacher` with distill.online); across
    tokenizers they are realigned for its `tokenizer` (data_pipeline/align.py); with distill.on_policy a
    share of them become `student`'s own samples scored by `teacher` (data_pipeline/on_policy.py; `zero3`:
    the student is partitioned, so its generate runs in lockstep)."""
    d = cfg.distill
    batches = artifacts.open_soft_labels(cfg, rank, world, micro, teacher if d.online else None)
    if models.cross_tokenizer(cfg):
        aligner = Aligner(
            teacher_token_bytes(cfg, teacher if d.online else None), tokenizer, cfg.data.seq_len
        )
        return Realign(batches, aligner), aligner
    if d.on_policy:
        sample = sampler(
            student, tokenizer, d.on_policy_new_tokens, d.on_policy_temperature, zero3 and world > 1
        )
        batches = OnPolicy(
            batches, sample, teacher, d.on_policy, d.on_policy_prompt_tokens, cfg.run.seed, rank,
            tokenizer.eos_token_id, d.on_policy_warmup_steps * d.grad_accum,
            task_prompts(cfg, tokenizer) if d.on_policy_prompts == "tasks" else None,
        )  # fmt: skip
    return batches, None


def cross_vmap(cfg: ExperimentConfig, aligner: Aligner) -> torch.Tensor | None:
    """Teacher id -> student id of the same bytes for distill.cross_tokenizer=hybrid (its exact part), else
    None (uld compares sorted probabilities only)."""
    return torch.from_numpy(aligner.vocab_map) if cfg.distill.cross_tokenizer == "hybrid" else None


def build_stage(
    cfg: ExperimentConfig,
    student: torch.nn.Module,
    tokenizer: Any,
    batches: Any,
    evals: list[dict],
    aligner: Aligner | None = None,
) -> engine.Stage:
    """The distill stage for the shared loop: `student` learning from `batches` with alpha · KD + (1 − alpha)
    · CE over its tokenizer's ids (across tokenizers when `aligner` realigned them), plus the on-policy
    term (weight 1) on its own samples with distill.on_policy; eval loss on `evals`."""
    d = cfg.distill
    if aligner is None:
        loss = soft_label_loss(d.kind, d.temperature, d.beta, d.skew, d.alpha)
        count = soft_label_counts
    else:
        vmap = cross_vmap(cfg, aligner)
        loss = cross_tokenizer_loss(d.cross_tokenizer, d.kind, d.temperature, d.beta, d.skew, d.alpha, vmap)
        count = cross_counts
    weights = soft_label_weights(d.alpha)
    if d.on_policy:
        loss = with_on_policy(loss, d.on_policy_kind or d.kind, d.temperature, d.beta, d.skew)
        count = on_policy_counts(count)
        weights[ON_POLICY] = 1.0
    return engine.Stage(
        "distill", student, batches, loss, evals, flops_per_token(student, cfg.data.seq_len),
        weights=weights, count=count, eval_loss=lm_loss,
    )  # fmt: skip
