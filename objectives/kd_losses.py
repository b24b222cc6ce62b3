"""The training loop's losses on soft-label batches (launcher/rank/engine.py `Loss`): the teacher's tokenizer
(`soft_label_loss`) and another one (`cross_tokenizer_loss`, on batches realigned by
data_pipeline/align.py). Each returns terms "kd" and, when alpha < 1, "ce" as sums; the loop weighs them
alpha and 1 − alpha and divides by the global counts (`soft_label_counts`, `cross_counts`).
`with_on_policy` adds the term of the student's own samples scored by the teacher (data_pipeline/on_policy.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from stablekd.objectives.agreement import AGREEMENT_TOKENS, agreement_observer
from stablekd.objectives.cross_tokenizer import cross_rows, teacher_probs, unmapped_ids
from stablekd.objectives.kd import (
    check_params,
    kd_rows,
    slice_teacher,
    soft_label_targets,
    soft_label_teacher,
    teacher_rows,
)
from stablekd.objectives.lm import IGNORE_INDEX, HeadLoss, Loss, ce_fn, shifted_labels


def _terms(model: torch.nn.Module, batch: dict, loss: HeadLoss) -> torch.Tensor:
    """The model's head computes `loss` from the last hidden state chunk by chunk (model/head.py)."""
    return model(input_ids=batch["input_ids"].long(), head_loss=loss)[0]


def soft_label_loss(
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 1.0,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """Loss on soft-label batches of the student's own tokenizer: terms "kd" (``kd_sum``) and "ce";
    metrics student_topk_mass and top1_agreement; from the last hidden state, one chunk of logits at a time."""
    check_params(kind, temperature, beta, skew)

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        labels = soft_label_targets(batch)  # (B, T); the model predicts position t + 1
        teacher = soft_label_teacher(batch)
        rows = teacher_rows(teacher)
        ce, live = ce_fn(labels)

        def fn(z: torch.Tensor, s: slice) -> torch.Tensor:
            kd = kd_rows(z, slice_teacher(rows, s), live[s], kind, temperature, beta, skew, z.shape[0])
            # a zero-weight CE term would cost a log-softmax and its backward per chunk
            return torch.stack([kd, ce(z, s)]) if alpha < 1.0 else kd[None]

        observe, agree = agreement_observer(teacher[0], labels, max_tokens=AGREEMENT_TOKENS)
        # The loop weighs the terms alpha and 1 − alpha over one count (soft_label_counts): the head takes
        # both terms' gradients in forward along those weights, from one chunk of logits.
        weights = (alpha, 1.0 - alpha) if alpha < 1.0 else None
        terms = _terms(model, batch, HeadLoss(fn, live, observe, weights=weights))
        sums = dict(zip(("kd", "ce"), terms, strict=False))
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
    vmap: torch.Tensor | None = None,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """Loss on realigned batches (data_pipeline/align.py `realign_batch`): terms "kd" (``cross_kd_sum``,
    `mode` uld or hybrid, hybrid with `vmap`) and "ce" on the student's own tokens; metric aligned_share
    (aligned student positions / counted teacher positions)."""
    check_params(kind, temperature, beta, skew)
    if mode == "hybrid" and vmap is None:
        raise ValueError("mode 'hybrid' needs vmap (teacher id -> student id)")

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        head = cross_head_loss(batch, mode, kind, temperature, beta, skew, vmap, alpha)
        terms = _terms(model, batch, head)
        return Loss(
            dict(zip(("kd", "ce"), terms, strict=False)),
            {"aligned_share": (float(batch["aligned"].sum()), float(batch["teacher_positions"].sum()))},
        )

    return loss


def cross_head_loss(
    batch: dict,
    mode: str,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
    vmap: torch.Tensor | None,
    alpha: float = 1.0,
) -> HeadLoss:
    """The head's loss on a realigned batch: per chunk the sum of ``cross_rows`` over its aligned rows
    and, when alpha < 1, CE on the student's learned tokens (`cross_tokenizer_loss`'s terms; the
    contrastive stage's KD anchor across tokenizers is the first alone)."""
    ids, p = (t.reshape(-1, t.shape[-1]) for t in teacher_probs(soft_label_teacher(batch)))
    aligned, exact = batch["aligned"].reshape(-1).bool(), batch["same_next"].reshape(-1)
    ce, counted = ce_fn(batch["labels"])

    def fn(z: torch.Tensor, s: slice) -> torch.Tensor:
        r = aligned[s].nonzero().squeeze(1)  # the chunk's aligned rows
        unmapped = unmapped_ids(vmap, z.shape[-1], z.device)  # (V,): cheap beside the chunk's (n, V)
        kd = cross_rows(
            z[r], ids[s][r], p[s][r], mode, vmap, unmapped, kind, temperature, beta, skew, exact[s][r]
        )
        return torch.stack([kd, ce(z, s)]) if alpha < 1.0 else kd[None]

    return HeadLoss(fn, aligned | counted)


ON_POLICY = "on_policy_kd"  # the loop's term of on-policy micro-batches (data_pipeline/on_policy.py)


def with_on_policy(
    offline: Callable[[torch.nn.Module, dict], Loss],
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Callable[[torch.nn.Module, dict], Loss]:
    """`offline` on soft-label micro-batches; on on-policy ones (a `teacher_hidden` key) the term
    ON_POLICY: ``kd_sum`` of the `kind` divergence between the teacher's full-vocabulary logits and the
    student's on the student's own generated tokens (no CE: a sample is no reference), metrics
    generated_tokens and the seconds spent generating and scoring per on-policy micro-batch.

    Chunk by chunk: within each row chunk of the student's head (model/head.py) the teacher's logits of the
    same rows are made from its last hidden state (`teacher_hidden`, (B, T, H)) by its head
    (`teacher_head`, a `HeadRows`: its cut, bias and logit transform; gathered once under ZeRO-3), so
    neither model's (B·T, V) logits exist. The term is one value, so the head takes its gradients in
    forward and never calls `fn` again in backward, after the teacher's head is released."""
    check_params(kind, temperature, beta, skew)

    def loss(model: torch.nn.Module, batch: dict) -> Loss:
        if "teacher_hidden" not in batch:
            return offline(model, batch)
        hidden = batch["teacher_hidden"]
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (B·T, H)
        _, live = ce_fn(batch["labels"])
        with batch["teacher_head"] as teacher:

            def fn(z: torch.Tensor, s: slice) -> torch.Tensor:
                return kd_rows(z, teacher(hidden[s]), live[s], kind, temperature, beta, skew, z.shape[0])

            kd = _terms(model, batch, HeadLoss(fn, live))
        metrics = {k: (float(batch[k]), 1.0) for k in ("generate_s", "teacher_s")}
        return Loss({ON_POLICY: kd}, {"generated_tokens": (float(live.sum()), 1.0), **metrics})

    return loss


def on_policy_counts(offline: Callable[[dict], dict[str, int]]) -> Callable[[dict], dict[str, int]]:
    """Counts of a mixed source: an on-policy micro-batch counts its generated tokens for ON_POLICY."""

    def count(batch: dict) -> dict[str, int]:
        if "teacher_hidden" not in batch:
            return offline(batch)
        return {ON_POLICY: int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())}

    return count


def cross_counts(batch: dict) -> dict[str, int]:
    """Counted positions of a realigned batch: the aligned ones for "kd", the student's learned tokens for "ce"."""
    ce = int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())
    return {"kd": int(batch["aligned"].sum()), "ce": ce}
