"""The training loop's losses on soft-label batches (launcher/rank/engine.py `Loss`): the teacher's tokenizer
(`soft_label_loss`) and another one (`cross_tokenizer_loss`, on batches realigned by
data_pipeline/align.py). Each returns terms "kd" and, when alpha < 1, "ce" as sums; the loop weighs them
alpha and 1 − alpha and divides by the global counts (`soft_label_counts`, `cross_counts`).
`with_on_policy` adds the term of the student's own samples scored by the teacher (data_pipeline/on_policy.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from stablekd.objectives.agreement import AGREEMENT_TOKENS, agreement_sums
from stablekd.objectives.cross_tokenizer import cross_kd_sum
from stablekd.objectives.kd import (
    check_params,
    kd_sum,
    soft_label_targets,
    soft_label_teacher,
)
from stablekd.objectives.lm import IGNORE_INDEX, Loss, nll_sum, shifted_labels


def soft_label_loss(
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 1.0,
    vocab: int | None = None,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """Loss on soft-label batches of the student's own tokenizer: terms "kd" (``kd_sum``) and "ce";
    metrics student_topk_mass and top1_agreement. `vocab`: the tokenizer's size V; the student's logits
    past it (padded rows) are cut off (objectives/kd.py, Vocabulary)."""
    check_params(kind, temperature, beta, skew)

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        labels = soft_label_targets(batch)  # (B, T); the model predicts position t + 1
        logits = model(input_ids=batch["input_ids"].long()).logits[..., :vocab]  # (B, T, V): a view
        teacher = soft_label_teacher(batch)
        kd, _ = kd_sum(logits, teacher, labels, kind, temperature, beta, skew)
        sums = {"kd": kd}
        if alpha < 1.0:  # a zero-weight CE term would cost a full log-softmax and its backward per step
            sums["ce"] = nll_sum(logits, labels)[0]
        agree = agreement_sums(logits.detach(), teacher[0], labels, max_tokens=AGREEMENT_TOKENS)
        seen = float(agree["tokens"])
        return Loss(sums, {k: (float(agree[k]), seen) for k in ("student_topk_mass", "top1_agreement")})

    return loss


def cross_tokenizer_loss(
    mode: str,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 1.0,
    vocab: int | None = None,
    vmap: torch.Tensor | None = None,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """Loss on realigned batches (data_pipeline/align.py `realign_batch`): terms "kd" (``cross_kd_sum``,
    `mode` uld or hybrid, hybrid with `vmap`) and "ce" on the student's own tokens; metric aligned_share
    (aligned student positions / counted teacher positions). `vocab`: the student tokenizer's size."""
    check_params(kind, temperature, beta, skew)

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        logits = model(input_ids=batch["input_ids"].long()).logits[..., :vocab]
        teacher, aligned = soft_label_teacher(batch), batch["aligned"]
        kd, n = cross_kd_sum(
            logits, teacher, aligned, mode, vmap, kind, temperature, beta, skew, batch["same_next"]
        )
        sums = {"kd": kd}
        if alpha < 1.0:
            sums["ce"] = nll_sum(logits, batch["labels"])[0]
        return Loss(sums, {"aligned_share": (float(n), float(batch["teacher_positions"].sum()))})

    return loss


ON_POLICY = "on_policy_kd"  # the loop's term of on-policy micro-batches (data_pipeline/on_policy.py)


def with_on_policy(
    offline: Callable[[torch.nn.Module, dict], Loss],
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    vocab: int | None = None,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """`offline` on soft-label micro-batches; on on-policy ones (a `teacher_logits` key) the term
    ON_POLICY: ``kd_sum`` of the `kind` divergence between the teacher's full logits and the student's on
    the student's own generated tokens (no CE: a sample is no reference), metrics generated_tokens and
    the seconds spent generating and scoring per on-policy micro-batch."""
    check_params(kind, temperature, beta, skew)

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        if "teacher_logits" not in batch:
            return offline(model, batch)
        logits = model(input_ids=batch["input_ids"].long()).logits[..., :vocab]
        kd, n = kd_sum(logits, batch["teacher_logits"], batch["labels"], kind, temperature, beta, skew)
        metrics = {k: (float(batch[k]), 1.0) for k in ("generate_s", "teacher_s")}
        return Loss({ON_POLICY: kd}, {"generated_tokens": (float(n), 1.0), **metrics})

    return loss


def on_policy_counts(offline: Callable[[dict], dict[str, int]]) -> Callable[[dict], dict[str, int]]:
    """Counts of a mixed source: an on-policy micro-batch counts its generated tokens for ON_POLICY."""

    def count(batch: dict) -> dict[str, int]:
        if "teacher_logits" not in batch:
            return offline(batch)
        return {ON_POLICY: int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())}

    return count


def cross_counts(batch: dict) -> dict[str, int]:
    """Counted positions of a realigned batch: the aligned ones for "kd", the student's learned tokens for "ce"."""
    ce = int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())
    return {"kd": int(batch["aligned"].sum()), "ce": ce}
