"""Knowledge-distillation losses: a student's logits against a teacher's full logits or top-k soft labels.

Conventions, stated once here (docs/architecture.md, Loss conventions, summarises them):

- Alignment. ``student_logits[:, t]`` (B, T, V) predicts token t+1, and the teacher input at position t
  is the teacher's distribution over that same token t+1. The counted tokens are
  ``shifted_labels(labels) != IGNORE_INDEX`` (objectives/lm.py), exactly the tokens the CE loss counts.
- Teacher input. Either full logits (B, T, V), or soft labels ``(topk_ids, topk_logprobs)``, each
  (B, T, k), ``topk_logprobs = log_softmax(teacher_logits / T)`` at those ids, already at the temperature
  T that the caller passes here (the soft-label stage stores them at its T), or ``SampledLabels`` (the
  `sampled` encoding, data_pipeline/encodings.py). An entry at j > 0 that repeats the row's first id is
  padding (a `topp` position with fewer than k entries) and counts as absent on both sides.
- Sampled soft labels (Anshumann et al., ACL 2025, "Random Sampling KD"): weights w_i with E[w_i] = p_i at
  the drawn ids; the loss is T² · (−Σ_i w_i log q_i), an unbiased estimate of T² · H(p, q), whose gradient
  in the student is an unbiased estimate of the forward-KL gradient (H(p, q) = KL(p‖q) + H(p), and H(p)
  does not depend on the student). Its value is therefore a cross-entropy, not a KL (it does not go to 0);
  only kind "fkl" is defined for it.
- Vocabulary. Ids are the tokenizer's, 0 .. V − 1 with V = len(tokenizer). A model with more embedding
  rows (a padded vocabulary: released checkpoints pad to a multiple of 64 or 128) has logits past V that
  no text can be: the head every built model has cuts them (model/head.py), so padded rows of either
  model are never stored, counted or generated, and a teacher and a student with one tokenizer and
  different padded sizes compare exactly. The functions here take logits already cut.
- Temperature. Both distributions are taken at T (the student's logits are divided by T) and every
  divergence is multiplied by T² (Hinton et al. 2015), so the gradient scale does not shrink as 1/T².
  Other tools differ: torchtune's kd_losses and TRL's ``generalized_jsd_loss`` do not multiply by T².
- Top-k bins. Top-k soft labels are compared on k+1 bins: the k stored ids plus one tail bin holding the
  rest of the vocabulary (teacher tail ``1 − Σ exp(topk_logprobs)``, clamped at 0; student tail
  ``1 − Σ_k q``, computed as a logsumexp over the other ids so it does not cancel). Every divergence is
  then exact on those bins; with k = V the tail is empty and the loss is the full-vocabulary one.
- Zero-probability bins. ``0 · log 0 = 0``. A bin where the distribution on the *right* of a KL has zero
  probability (true value +inf: e.g. reverse KL where the teacher's tail clamped to 0) contributes 0,
  as torchtune's losses mask infinite logits, so a teacher that rules a token out never gives inf/NaN.
  Stored top-k log-probs at or below the float16 floor (−65504) mean −inf (zero probability).
- Precision. Computed in float32 whatever the input dtype (float64 stays float64 so gradcheck works).
- Reduction. ``kd_sum`` and ``agreement_sums`` return *sums* and token counts, because the training loop
  divides by the token count of the whole global batch (all ranks × micro-batches); ``distill_loss`` is
  the mean over the tokens of one call.
- Memory. Rows (token positions) are processed ``chunk_rows(V)`` at a time (objectives/lm.py: ~64 MiB
  of float32 per chunk at any V), as views of the logits: uncounted rows are weighted 0, not gathered
  out, since a gather would copy the logits. Forward KL on top-k labels and sampled labels have their
  gradients written out and keep nothing of size (n, V) but the logits they were given. The traced
  divergences keep each chunk's temporaries unless the batch holds at least ``CHECKPOINT_ELEMENTS``
  values; then every chunk runs under non-reentrant activation checkpointing, so with a 128k vocabulary
  only one chunk's float32 temporaries are alive in forward and in backward. The training stages never
  hand these functions whole logits: the model's head (model/head.py) computes one chunk of logits at a
  time from the last hidden state and calls ``kd_rows`` / ``nll_rows`` on it.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stablekd.objectives.divergences import divergence, student_topk_bins, teacher_topk_bins
from stablekd.objectives.lm import (
    IGNORE_INDEX,
    chunk_rows,
    compute_dtype,
    live_chunks,
    nll_rows,
    nll_sum,
    shifted_labels,
)
from stablekd.objectives.topk_kl import TopkForwardKL

KINDS = ("fkl", "rkl", "gjsd", "tvd", "skl", "mse")


class SampledLabels(NamedTuple):
    """Sampled soft labels: ids (B, T, N) drawn from the teacher (padding: weight 0) and weights (B, T, N)
    with E[w_i] = p_i (data_pipeline/encodings.py)."""

    ids: torch.Tensor
    weights: torch.Tensor


# Teacher input: full logits (B, T, V), (topk_ids, topk_logprobs) each (B, T, k), or SampledLabels.
Teacher = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | SampledLabels


# Chunks of at least this many float32 values (64 MiB) are recomputed in backward instead of kept.
CHECKPOINT_ELEMENTS = 1 << 24


def check_params(kind: str, temperature: float, beta: float, skew: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; expected one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0 <= skew <= 1:
        raise ValueError(f"skew must be in [0, 1], got {skew}")


def check_student(student_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits: expected shape (B, T, V), got {tuple(student_logits.shape)}")
    B, T, _ = student_logits.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"labels: expected shape (B, T) = {(B, T)}, got {tuple(labels.shape)}")


def check_topk_ids(ids: torch.Tensor, student_logits: torch.Tensor) -> None:
    B, T, V = student_logits.shape
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (B, T) or not 1 <= ids.shape[2] <= V:
        raise ValueError(
            f"topk_ids: expected shape (B, T, k) = ({B}, {T}, k) with 1 <= k <= V = {V}, got {tuple(ids.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"topk_ids: expected an integer dtype, got {ids.dtype}")


def _check(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> bool:
    """Raise ValueError on a bad argument; return whether the teacher is top-k."""
    check_params(kind, temperature, beta, skew)
    check_student(student_logits, labels)
    if isinstance(teacher, torch.Tensor):
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits: expected shape (B, T, V) = {tuple(student_logits.shape)} like "
                f"student_logits, got {tuple(teacher.shape)}"
            )
        return False
    if isinstance(teacher, SampledLabels):
        if kind != "fkl":
            raise ValueError(f"kind {kind!r}: sampled soft labels estimate the forward KL only (kind 'fkl')")
        check_topk_ids(teacher.ids, student_logits)
        if teacher.weights.shape != teacher.ids.shape or not teacher.weights.is_floating_point():
            raise ValueError(f"sampled weights: expected a float tensor of shape {tuple(teacher.ids.shape)}")
        return True
    if not (isinstance(teacher, tuple | list) and len(teacher) == 2):
        raise ValueError("teacher: expected a logits tensor (B, T, V) or a tuple (topk_ids, topk_logprobs)")
    if kind == "mse":
        raise ValueError("kind 'mse' needs full teacher logits (B, T, V), not top-k soft labels")
    ids, logprobs = teacher
    check_topk_ids(ids, student_logits)
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"topk_logprobs: expected shape {tuple(ids.shape)} like topk_ids, got {tuple(logprobs.shape)}"
        )
    if not logprobs.is_floating_point():
        raise ValueError(f"topk_logprobs: expected a floating dtype, got {logprobs.dtype}")
    return True


def counted_rows(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> indices (N,) into the flattened (B*T) positions whose next token is counted."""
    return (shifted_labels(labels) != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def _chunk_kd_sum(
    s: torch.Tensor,
    t: torch.Tensor,
    ids: torch.Tensor | None,
    live: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Σ over one chunk of rows of T²·divergence: s (n, V) the student's logits, t (n, V) teacher logits or
    (n, k) top-k log-probs with ids (n, k), live (n,) the counted rows (the others count 0)."""
    dtype = compute_dtype(s)
    s = s.to(dtype) / temperature if temperature != 1 else s.to(dtype)  # (n, V); no copy at fp32, T = 1
    t = t.to(dtype)
    if kind == "mse":
        # mean_V ((s − t)/T)² · T²: the T² scaling cancels the temperature, so mse is T-independent.
        per_row = ((s - t / temperature) ** 2).mean(-1)
    elif ids is None:
        lq, lp = F.log_softmax(s, dim=-1), F.log_softmax(t / temperature, dim=-1)  # (n, V) each
        per_row = divergence(lp, lq, kind, beta, skew)
    else:
        ids = ids.long()
        lp = teacher_topk_bins(t)  # (n, k+1)
        lq = student_topk_bins(F.log_softmax(s, dim=-1), ids)  # (n, k+1)
        per_row = divergence(lp, lq, kind, beta, skew)
    return per_row.masked_fill(~live, 0.0).sum() * temperature**2


def kd_sum(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD divergence over the counted tokens, and the number of counted tokens.

    Args:
        student_logits: (B, T, V); position t predicts token t+1.
        teacher: full teacher logits (B, T, V), or ``(topk_ids, topk_logprobs)`` each (B, T, k) with
            ``topk_logprobs = log_softmax(teacher_logits / temperature)`` at ``topk_ids`` (any integer
            dtype for the ids, any float dtype for the log-probs; values ≤ −65504 mean −inf), or
            ``SampledLabels`` (kind "fkl" only; the module docstring says what the value is).
        labels: (B, T) token ids, IGNORE_INDEX (-100) where nothing is learned; the counted tokens are
            ``shifted_labels(labels) != -100``.
        kind: one of KINDS. Per token, with p the teacher and q the student, both at temperature T:
            "fkl" KL(p‖q); "rkl" KL(q‖p); "gjsd" TRL's generalized JSD (β=0 forward KL, β=1 reverse KL,
            else β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q); "tvd" ½·Σ|p − q|; "skl" skew forward KL
            KL(p ‖ λ·p + (1−λ)·q) with λ = skew (DistiLLM); "mse" (full logits only) the mean over the
            vocabulary of (student_logits/T − teacher_logits/T)², which needs finite logits. Top-k
            teachers use k+1 bins.
        temperature: T > 0. Every divergence, mse included, is multiplied by T² (Hinton scaling;
            torchtune and TRL do not scale). For mse the T² cancels the 1/T², so T has no effect.
        beta: β of "gjsd". skew: λ of "skl".
        chunk_tokens: rows (token positions) per chunk; None = `chunk_rows(V)` (objectives/lm.py), so a
            chunk's float32 temporaries stay near 64 MiB at any vocabulary. With grad enabled and a batch
            of at least CHECKPOINT_ELEMENTS values, a chunk runs under activation checkpointing (its
            temporaries freed in forward, recomputed in backward), except forward KL on top-k labels
            and sampled labels, whose written-out gradients keep none.

    Returns:
        (loss_sum, tokens): loss_sum a float32 scalar (float64 for float64 logits) connected to the
        graph even when nothing is counted; tokens an int64 scalar. An all-masked batch gives (0, 0).
    """
    _check(student_logits, teacher, labels, kind, temperature, beta, skew)
    B, T, V = student_logits.shape
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    live = (shifted_labels(labels) != IGNORE_INDEX).reshape(B * T)  # the counted rows
    # (B*T, V): a view. Uncounted rows are computed and weighted 0 instead of gathered out, which would copy
    # the logits.
    flat = student_logits.reshape(B * T, V)
    kd = kd_rows(flat, teacher_rows(teacher), live, kind, temperature, beta, skew, chunk_tokens)
    return kd, live.sum()


def teacher_rows(teacher: Teacher) -> Teacher:
    """A teacher input (B, T, ...) as rows (B·T, ...) of the flattened positions (views)."""
    if isinstance(teacher, torch.Tensor):
        return teacher.reshape(-1, teacher.shape[-1])
    ids, values = (t.reshape(-1, t.shape[-1]) for t in teacher)
    return SampledLabels(ids, values) if isinstance(teacher, SampledLabels) else (ids, values)


def slice_teacher(teacher: Teacher, rows: slice) -> Teacher:
    """The rows `rows` of a teacher input in rows (``teacher_rows``)."""
    if isinstance(teacher, torch.Tensor):
        return teacher[rows]
    if isinstance(teacher, SampledLabels):
        return SampledLabels(teacher.ids[rows], teacher.weights[rows])
    return teacher[0][rows], teacher[1][rows]


def kd_rows(
    flat: torch.Tensor,
    teacher: Teacher,
    live: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
    rows: int | None = None,
) -> torch.Tensor:
    """``kd_sum`` on rows: Σ over the `live` rows of T²·divergence between the student's logits flat (N, V)
    and the teacher's rows (``teacher_rows``: (N, V) logits, (N, k) top-k or SampledLabels), chunk by chunk
    (`rows` per chunk; None: chunk_rows(V)). Arguments are not checked: ``kd_sum`` checks them. The head
    (model/head.py) calls it on one chunk of logits at a time."""
    rows = rows or chunk_rows(flat.shape[-1])
    if isinstance(teacher, SampledLabels):  # −Σ w log q: a weighted cross-entropy (objectives/lm.py)
        w = teacher.weights.to(compute_dtype(flat)).masked_fill(~live[:, None], 0.0)
        return nll_rows(flat, teacher.ids, w, temperature, rows).sum() * temperature**2
    topk = not isinstance(teacher, torch.Tensor)
    if topk and kind == "fkl" and not teacher[1].requires_grad:  # the gradient written out, for the student
        lp = teacher_topk_bins(teacher[1].to(compute_dtype(flat)))  # (N, k + 1)
        return TopkForwardKL.apply(flat, teacher[0].long(), lp, live, temperature, rows) * temperature**2
    if topk:
        ids_chunks, teacher_flat = teacher[0].split(rows), teacher[1]  # (N, k) each
    else:
        ids_chunks, teacher_flat = itertools.repeat(None), teacher
    fn = functools.partial(_chunk_kd_sum, kind=kind, temperature=temperature, beta=beta, skew=skew)
    grad = torch.is_grad_enabled() and (flat.requires_grad or teacher_flat.requires_grad)
    # The traced divergences keep their chunk's (n, V) temporaries for backward unless recomputed there,
    # which pays once the batch is large (not for one chunk: the head recomputes it already).
    recompute = grad and flat.numel() >= CHECKPOINT_ELEMENTS and flat.shape[0] > rows
    parts = []
    # split() (not slicing) so backward assembles the chunks' gradients in one cat, not one full-size
    # buffer each.
    for alive, s_chunk, t_chunk, i_chunk, l_chunk in zip(
        live_chunks(live, rows),
        flat.split(rows),
        teacher_flat.split(rows),
        ids_chunks,
        live.split(rows),
        strict=False,
    ):
        if not alive:
            continue
        if recompute:  # no RNG inside, so skip saving/restoring it
            part = checkpoint(
                fn, s_chunk, t_chunk, i_chunk, l_chunk, use_reentrant=False, preserve_rng_state=False
            )
        else:
            part = fn(s_chunk, t_chunk, i_chunk, l_chunk)
        parts.append(part)
    if not parts:
        # 0, yet in the graph, so an all-masked micro-batch can backward.
        return flat[:0].to(compute_dtype(flat)).sum()
    return torch.stack(parts).sum()


def distill_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """α·KD + (1 − α)·CE, each the mean over this call's counted tokens; 0 (not NaN) if none is counted.

    KD is ``kd_sum`` (T²-scaled, see there for shapes and kinds); CE is the next-token cross-entropy of
    the raw student logits (T = 1) against labels (``nll_sum``). A term whose weight is 0 is not
    computed. For training across ranks use ``kd_sum``/``nll_sum`` and divide by the global count.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check(student_logits, teacher, labels, kind, temperature, beta, skew)
    dtype = compute_dtype(student_logits)
    tokens = (shifted_labels(labels) != IGNORE_INDEX).sum()
    loss = student_logits.new_zeros((), dtype=dtype)
    if alpha > 0:
        loss = loss + alpha * kd_sum(student_logits, teacher, labels, kind, temperature, beta, skew)[0]
    if alpha < 1:
        loss = loss + (1 - alpha) * nll_sum(student_logits, labels)[0].to(dtype)
    # clamp: an all-masked call is 0 / 1 = 0, not 0 / 0.
    return loss / tokens.clamp(min=1)


def soft_label_targets(batch: dict) -> torch.Tensor:
    """(B, T) labels of a soft-label batch: its input_ids, IGNORE_INDEX where `loss_mask` (when the batch
    has one) says a token is context, not learned (the prompt of a task record)."""
    ids = batch["input_ids"].long()
    mask = batch.get("loss_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)


def soft_label_teacher(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | SampledLabels:
    """The teacher input ``kd_sum`` takes from a decoded soft-label batch (data_pipeline/encodings.decode):
    SampledLabels for the sampled encoding, else (topk_ids, topk_logprobs); ids as int64."""
    if "sample_ids" in batch:
        return SampledLabels(batch["sample_ids"].long(), batch["sample_weights"])
    return batch["topk_ids"].long(), batch["topk_logprobs"]


def soft_label_counts(batch: dict) -> dict[str, int]:
    """Counted tokens of a soft-label batch for the terms "kd" and "ce": the positions whose next token
    is learned (every position but the last of each row, without a loss_mask)."""
    n = int((shifted_labels(soft_label_targets(batch)) != IGNORE_INDEX).sum())
    return {"kd": n, "ce": n}


def soft_label_weights(alpha: float) -> dict[str, float]:
    """The loop's term weights for ``soft_label_loss``: alpha · KD + (1 − alpha) · CE (no CE term at alpha 1)."""
    return {"kd": alpha, **({"ce": 1.0 - alpha} if alpha < 1.0 else {})}
