"""Divergences between a teacher's and a student's log-probabilities on shared bins (objectives/kd.py
states the conventions): KL, reverse KL, generalized JSD, TVD, skew KL, in the log domain and NaN-free
in forward and backward where bins hold −inf (zero probability); and the k + 1 top-k + tail bins.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")
# float16 has no finite value below this; a writer that avoids storing -inf stores this instead.
FP16_FLOOR = torch.finfo(torch.float16).min  # -65504.0


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)), elementwise, for log-masses x; x ≥ 0 (mass ≥ 1 after rounding) gives −inf.

    Two branches (Mächler 2012): log(−expm1(x)) near 0 where 1 − e^x cancels, log1p(−e^x) further out.
    Each branch only ever sees safe inputs, so the unused one cannot put NaN into the gradient.
    """
    x = x.clamp(max=0.0)
    near = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    b = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, a, b)


def log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·e^la + (1 − w)·e^lb) elementwise; −inf where both are −inf (no NaN in the gradient)."""
    if w == 1:
        return la
    if w == 0:
        return lb
    a = la + math.log(w)
    b = lb + math.log1p(-w)
    shift = torch.maximum(a, b).detach()  # the usual logsumexp shift; its value does not change the result
    dead = torch.isneginf(shift)
    shift = shift.masked_fill(dead, 0.0)
    total = (a - shift).exp() + (b - shift).exp()
    return (shift + total.masked_fill(dead, 1.0).log()).masked_fill(dead, NEG_INF)


def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_bins e^la · (la − lb) over the last dim, from log-probs (n, bins) -> (n,).

    A bin where either side is −inf contributes 0 (see the module docstring): both sides are set to 0
    there, so its term is e^0·(0 − 0) = 0. Replacing them before the arithmetic (not masking the result
    after) keeps 0·inf NaN out of the backward pass.
    """
    dead = torch.isneginf(la) | torch.isneginf(lb)
    la = la.masked_fill(dead, 0.0)
    lb = lb.masked_fill(dead, 0.0)
    return (la.exp() * (la - lb)).sum(-1)


def divergence(lp: torch.Tensor, lq: torch.Tensor, kind: str, beta: float, skew: float) -> torch.Tensor:
    """Per-row divergence between teacher log-probs lp and student log-probs lq, both (n, bins) -> (n,)."""
    if kind == "fkl" or (kind == "gjsd" and beta == 0):
        return kl(lp, lq)
    if kind == "rkl" or (kind == "gjsd" and beta == 1):
        return kl(lq, lp)
    if kind == "gjsd":
        # TRL's generalized_jsd_loss: m = β·p + (1 − β)·q, β·KL(p‖m) + (1 − β)·KL(q‖m).
        lm = log_mix(lp, lq, beta)
        return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "skl":
        # DistiLLM (Ko et al. 2024) skew forward KL: KL(p ‖ λ·p + (1 − λ)·q).
        return kl(lp, log_mix(lp, lq, skew))
    raise AssertionError(kind)  # mse and unknown kinds never get here


def topk_entries(ids: torch.Tensor) -> torch.Tensor:
    """(n, k) ids -> bool (n, k): a real entry, not padding (a repeat of the row's first id at j > 0)."""
    real = ids != ids[:, :1]
    real[:, 0] = True
    return real


def student_topk_bins(s_lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs (n, V) -> log-probs on k+1 bins (n, k+1): the k ids, then the tail.

    The tail is a logsumexp over the ids *not* in the top-k rather than log(1 − Σ_k q), which cancels
    when the top-k hold almost all the mass. With k = V it is logsumexp(all −inf) = −inf; the NaN its
    backward makes on those entries is overwritten with 0 by scatter's backward (every entry is an id).
    """
    top = s_lp.gather(-1, ids).masked_fill(~topk_entries(ids), NEG_INF)  # (n, k); padding: absent
    tail = s_lp.scatter(-1, ids, NEG_INF).logsumexp(-1, keepdim=True)  # (n, 1)
    return torch.cat([top, tail], dim=-1)


def teacher_topk_bins(logprobs: torch.Tensor) -> torch.Tensor:
    """Stored teacher log-probs (n, k) -> log-probs on k+1 bins (n, k+1): the k ids, then the tail.

    Tail mass 1 − Σ exp(logprobs), clamped at 0 (float16 rounding can make the sum exceed 1), as a log.
    """
    logprobs = logprobs.masked_fill(logprobs <= FP16_FLOOR, NEG_INF)  # the storage floor means −inf
    tail = log1mexp(logprobs.logsumexp(-1, keepdim=True))  # (n, 1)
    return torch.cat([logprobs, tail], dim=-1)
