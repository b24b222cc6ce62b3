"""Forward KL on top-k + tail bins with its gradient written out, over the whole (N, V) logits in row chunks
(objectives/kd.py `kd_sum` calls it for kind fkl on top-k labels)."""

from __future__ import annotations

import torch

from stablekd.objectives.divergences import NEG_INF, kl, topk_entries
from stablekd.objectives.lm import compute_dtype, exp_shifted, live_chunks, scaled

# The student's tail log-mass comes from log(1 − Σ_K q) while that stays above this; below it the
# subtraction would cancel, and the row's tail is a logsumexp over the ids off K instead.
_EXACT_TAIL = 1e-2


class TopkForwardKL(torch.autograd.Function):
    """Σ over counted rows of KL(p ‖ q) on the k + 1 bins, from the student's logits x (N, V) at
    temperature T: the same value as ``kl(lp, student_topk_bins(log_softmax(x / T), ids))``, chunk by
    chunk, with the gradient written out instead of traced through log_softmax, gather, scatter and
    logsumexp.

    With q = softmax(u), u = x / T, K the row's real ids and P the teacher's mass on the live bins (a bin
    is dead, and contributes 0, where either side has zero probability): ∂/∂u_i = q_i·P − p_i for i ∈ K,
    and q_i·P − p_tail·q_i/q_tail off K, = e^{u_i − ℓ_tail}·(P·q_tail − p_tail) with ℓ_tail the log-sum
    of e^u off K, so e^{u_i − ℓ_tail} ≤ 1 and no ratio p_tail/q_tail overflows for a student sure of its
    top-k. Per chunk: forward one logsumexp pass (plus an exact tail for the rows where 1 − Σ_K q
    < _EXACT_TAIL would cancel), backward three passes written into the gradient buffer, K overwritten
    after. Kept for backward: x itself (no copy) and (N, k + 1) values. Rows where `counted` is False
    count 0 and get no gradient.
    """

    @staticmethod
    def forward(ctx, x, ids, lp, counted, temperature: float, rows: int) -> torch.Tensor:
        dtype = compute_dtype(x)
        real = topk_entries(ids)  # (N, k)
        n = x.shape[0]
        lse = torch.zeros(n, dtype=dtype, device=x.device)
        tail = torch.full((n,), NEG_INF, dtype=dtype, device=x.device)
        top = torch.full(ids.shape, NEG_INF, dtype=dtype, device=x.device)
        alive = live_chunks(counted, rows)
        for c, s in enumerate(range(0, n, rows)):
            if not alive[c]:
                continue
            u = scaled(x[s : s + rows], dtype, temperature)  # (rows, V)
            i = ids[s : s + rows]
            lse_c = u.logsumexp(-1)  # (rows,)
            top_c = u.gather(-1, i).masked_fill(~real[s : s + rows], NEG_INF)  # (rows, k)
            rest = 1.0 - (top_c - lse_c[:, None]).exp().sum(-1)  # q's mass off K
            tail_c = lse_c + rest.clamp_min(torch.finfo(dtype).tiny).log()
            exact = (rest < _EXACT_TAIL).nonzero().squeeze(1)
            if exact.numel():  # no cancellation: the log-sum over the ids off K itself
                tail_c[exact] = u[exact].scatter(-1, i[exact], NEG_INF).logsumexp(-1)
            lse[s : s + rows], tail[s : s + rows], top[s : s + rows] = lse_c, tail_c, top_c
        lq = torch.cat([top, tail[:, None]], dim=-1) - lse[:, None]  # (N, k + 1)
        ctx.save_for_backward(x, ids, real, lp, lq, lse, tail, counted)
        ctx.temperature, ctx.rows, ctx.alive = temperature, rows, alive
        return kl(lp, lq).masked_fill(~counted, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, ids, real, lp, lq, lse, tail, counted = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        live = ~(torch.isneginf(lp) | torch.isneginf(lq))  # (N, k + 1)
        p = lp.exp().masked_fill(~live, 0.0)
        P = p.sum(-1)  # (N,)
        scale = (grad / T) * counted.to(P.dtype)  # (N,): ∂/∂x = ∂/∂u / T
        # Off K: e^{u − shift}·coef; a row without a tail (k = V, or q_tail underflowed) has no live tail bin
        # and no mass off K worth a gradient: shift by lse there, where e^{u − lse} = q stays finite.
        has_tail = torch.isfinite(tail)
        shift = torch.where(has_tail, tail, lse)
        coef = torch.where(has_tail, P * (tail - lse).exp() - p[:, -1], P) * scale  # (N,)
        on_k = (lq[:, :-1].exp() * P[:, None] - p[:, :-1]) * scale[:, None]  # (N, k)
        on_k = torch.where(real, on_k, on_k[:, :1])  # padding repeats the first id: write its value again
        g = torch.zeros_like(x, memory_format=torch.contiguous_format)
        for c, s in enumerate(range(0, x.shape[0], rows)):
            if not ctx.alive[c]:
                continue
            gs = exp_shifted(x[s : s + rows], shift[s : s + rows], T, g[s : s + rows])
            gs.mul_(coef[s : s + rows, None].to(gs.dtype))
            gs.scatter_(-1, ids[s : s + rows], on_k[s : s + rows].to(gs.dtype))
        return g, None, None, None, None, None
