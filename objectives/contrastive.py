"""Contrastive objectives on candidate groups (docs/architecture.md): multi-positive InfoNCE and its scorers.

A batch holds B contexts × G teacher-sampled continuations each (`data_pipeline/candidates.py`,
`candidate_batch`: [B, G, W] teacher-forced rows, flattened here to N = B·G rows). Each row is an anchor;
its positives are the other continuations of the same context, its negatives the continuations of every
other context in the *global* batch. Two scorers produce the (A, N) score matrix `supcon_sum` consumes:

    embedding:  f(x, y) = normalize(head(mean_{t in y} h_t)),  s_ij = f_i · f_j (cosine)
                -> `pool_continuation`, `ProjectionHead`, `embedding_scores` (gathers every rank's rows)
    likelihood: s(x, y) = mean_{t in y} log p(y_t | y_<t, x)
                -> `continuation_logprob` (the caller lays out x_i with every candidate y_j)

`simctg_sum` is the token-level SimCTG term (a separate regulariser on one sequence's hidden states).

Reduction, as everywhere in objectives/: every loss returns a (sum, count) pair; the training loop divides
the sum by the count all-reduced over ranks and micro-batches, so world size and accumulation do not
change the loss scale. Math runs in fp32 (float64 inputs stay float64, for gradcheck).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from stablekd.objectives.lm import nll_rows


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 to fp32; keep float64 (tests run gradcheck in float64)."""
    return x if x.dtype == torch.float64 else x.float()


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def supcon_sum(
    scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-positive InfoNCE, supervised-contrastive "L_out" form (Khosla et al. 2020), summed over anchors.

    Args:
        scores: (A, N) float, s_ia = score of candidate a for anchor i (cosine sims or log-likelihoods).
        positive: (A, N) bool, P(i) = {a : positive[i, a]}.
        valid: (A, N) bool, the candidates in anchor i's denominator: False on the anchor itself and on
            masked false negatives. Positives are always counted as valid (valid | positive is used).
        tau: temperature τ > 0.

    Per anchor i with |P(i)| >= 1:

        L_i = -(1/|P(i)|) Σ_{p in P(i)} [ s_ip/τ - log Σ_{a valid} exp(s_ia/τ) ]

    i.e. the mean over positives of a softmax cross-entropy whose denominator holds every valid candidate
    (the other positives included: "L_out", the form SupCon found better than averaging inside the log).

    Returns:
        loss_sum: Σ_i L_i over anchors with >= 1 positive (0-dim, differentiable).
        count: number of such anchors (0-dim int64).
        stats: SUMS over those anchors, no grad — divide by the all-reduced count like the loss:
            "pos_sim": mean raw score over the anchor's positives,
            "neg_sim": mean raw score over its valid non-positives (0 for an anchor with none),
            "neg_anchors": anchors with >= 1 valid non-positive (the divisor for "neg_sim"),
            "acc1": 1 if the argmax over valid candidates is a positive,
            "anchors": = count.
        No anchor with a positive gives (0, 0), not NaN.

    The sum is always a function of *every* score (rows without a positive enter with weight 0), so the
    backward reaches the all_gather of `embedding_scores` on every rank, even one whose rows have no
    positive: a rank that skipped that collective backward would hang the others.
    """
    if scores.shape != positive.shape or scores.shape != valid.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {scores.shape}, positive {positive.shape}, valid {valid.shape}: need (A, N)"
        )
    s = _fp32(scores)
    positive = positive.bool()
    n_pos = positive.sum(1)  # (A,)
    has_pos = n_pos > 0  # (A,)
    # Rows without a positive get an all-True denominator: their loss is discarded, but an all -inf row
    # would make logsumexp's backward 0 * exp(-inf + inf) = NaN.
    denom = valid.bool() | positive | ~has_pos[:, None]  # (A, N)
    logits = s / tau
    lse = torch.logsumexp(logits.masked_fill(~denom, float("-inf")), dim=1)  # (A,)
    pos_logit_sum = torch.where(positive, logits, torch.zeros_like(logits)).sum(1)  # (A,) Σ_p s_ip/τ
    per_anchor = -(pos_logit_sum - n_pos * lse) / n_pos.clamp_min(1)  # (A,)
    loss_sum = torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor)).sum()
    count = has_pos.sum()

    with torch.no_grad():
        sd = s.detach()
        zero = torch.zeros_like(sd)
        pos_sim = torch.where(positive, sd, zero).sum(1) / n_pos.clamp_min(1)
        neg = valid.bool() & ~positive
        n_neg = neg.sum(1)
        neg_sim = torch.where(neg, sd, zero).sum(1) / n_neg.clamp_min(1)
        top = sd.masked_fill(~denom, float("-inf")).argmax(1, keepdim=True) if sd.shape[1] else None
        hit = positive.gather(1, top).squeeze(1) if top is not None else has_pos
        stats = {
            "pos_sim": (pos_sim * has_pos).sum(),
            "neg_sim": (neg_sim * has_pos).sum(),
            "neg_anchors": (has_pos & (n_neg > 0)).sum().to(sd.dtype),
            "acc1": (hit & has_pos).sum().to(sd.dtype),
            "anchors": count.to(sd.dtype),
        }
    return loss_sum, count, stats


# --------------------------------------------------------------------------------------------------
# Gathering every rank's rows
# --------------------------------------------------------------------------------------------------


def hardest_negatives(
    scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, n: int
) -> torch.Tensor:
    """`valid` with each anchor's negatives cut to the `n` it scores highest: model-scored hard-negative
    mining (the continuations the model finds most plausible while they contradict the truth are the ones
    whose probability the loss should push down; the rest add little but noise to the denominator).
    Positives are untouched; n = 0 keeps every negative. Chosen on the detached scores."""
    if n <= 0 or n >= scores.shape[1]:
        return valid
    negative = valid.bool() & ~positive.bool()
    ranked = scores.detach().float().masked_fill(~negative, float("-inf"))
    top = ranked.topk(n, dim=1).indices
    keep = torch.zeros_like(negative).scatter_(1, top, True) & negative
    return (valid.bool() & positive.bool()) | keep


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(t) for t in sizes]


def _gather_padded(x: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, int]:
    """all_gather of x (n_r, ...) with per-rank n_r: pad to max n_r, gather, drop the padding."""
    rank, world = _world()
    if world == 1:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)  # every collective needs equal shapes
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    if differentiable:
        # Backward: an all-to-all + sum (gloo) / reduce-scatter (NCCL) that hands each rank the sum, over
        # all ranks' losses, of the gradients w.r.t. the rows it owns. Padding rows get gradients that go
        # nowhere (the slice below does not select them).
        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])  # (Σ_r n_r, ...)
    return gathered, sum(sizes[:rank])


def global_width(x: torch.Tensor) -> torch.Tensor:
    """x [..., W] right-padded with zeros to the widest W of any rank (equal shapes for a gather); x itself
    on one process or when every rank's W is the same."""
    if _world()[1] == 1:
        return x
    width = torch.tensor([x.shape[-1]], dtype=torch.long, device=x.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = int(width) - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate x (n_r, ...) of every rank along dim 0, autograd-aware.

    Returns (gathered (Σ_r n_r, ...), offset of this rank's rows in it). Ranks may hold different n_r.
    The backward sums the gradients that every rank's loss sends to a row into the rank that owns it, so
    after the usual gradient all-reduce the parameters see d(Σ_r loss_r): the global batch's gradient.
    Without an initialised process group, or with world size 1: (x, 0).
    """
    return _gather_padded(x, differentiable=True)


def gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """As `gather_with_grad` for tensors that need no gradient (ids, keys; any dtype)."""
    return _gather_padded(x.detach(), differentiable=False)


# --------------------------------------------------------------------------------------------------
# Embedding scorer
# --------------------------------------------------------------------------------------------------


def false_negative_mask(
    group_a: torch.Tensor, keys_a: torch.Tensor, group_b: torch.Tensor, keys_b: torch.Tensor
) -> torch.Tensor:
    """(n_a, n_b) bool: True where rows of *different* contexts carry the same known answer key.

    group_*: (n_*,) int64 context ids; keys_*: (n_*,) int64 answer keys, -1 = unknown (never matches).
    Two contexts whose continuations state the same answer (e.g. the same birth year of two people) are
    not negatives of each other; pushing them apart would teach the model to distort the answer.
    """
    same_key = (keys_a[:, None] == keys_b[None, :]) & (keys_a[:, None] >= 0)  # (n_a, n_b)
    return same_key & (group_a[:, None] != group_b[None, :])


def embedding_scores(
    features: torch.Tensor, group_ids: torch.Tensor, answer_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score matrix of the `embedding` scorer: this rank's rows against the global batch.

    Args:
        features: (n, D) L2-normalised f(x, y) of THIS rank's rows.
        group_ids: (n,) int64 context ids, unique across ranks (rows of one context are positives).
        answer_keys: optional (n,) int64, -1 = unknown; rows of different contexts with the same key are
            masked out of each other's denominators (`false_negative_mask`).

    Returns (A = n anchors, N = Σ_r n_r gathered candidates):
        scores: (A, N) cosine similarities local @ global.T (fp32; float64 stays float64); gradients
            flow to the rows of every rank through `gather_with_grad`.
        positive: (A, N) same context id, not the anchor itself.
        valid: (A, N) not the anchor itself, not a false negative.
    """
    local = _fp32(features)
    glob, offset = gather_with_grad(local)  # (N, D)
    gids, _ = gather_no_grad(group_ids)  # (N,)
    n, N = local.shape[0], glob.shape[0]
    scores = local @ glob.T  # (A, D) @ (D, N) -> (A, N)
    cols = torch.arange(N, device=local.device)
    rows = torch.arange(n, device=local.device) + offset  # the anchors' own columns
    not_self = rows[:, None] != cols[None, :]  # (A, N)
    positive = (group_ids[:, None] == gids[None, :]) & not_self
    valid = not_self
    if answer_keys is not None:
        keys, _ = gather_no_grad(answer_keys)
        valid = valid & ~false_negative_mask(group_ids, answer_keys, gids, keys)
    return scores, positive, valid


def pool_continuation(hidden: torch.Tensor, cont_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (N, W, H) over continuation tokens cont_mask (N, W) -> (N, H) fp32.

    A row without continuation tokens gives zeros (count clamped to 1), not NaN. Memory: one fp32 copy of
    hidden (N·W·H·4 bytes) — the mean of up to W bf16 values needs fp32 accumulation.
    """
    m = cont_mask.to(_fp32(hidden).dtype)  # (N, W)
    total = (_fp32(hidden) * m[..., None]).sum(1)  # (N, H)
    return total / m.sum(1, keepdim=True).clamp_min(1)


class ProjectionHead(nn.Module):
    """f = normalize(W2 · GELU(W1 · h + b1) + b2): (N, H) -> (N, D), unit L2 norm (fp32 output).

    Contrasting a projection rather than the hidden state itself leaves the LM's representation free to
    keep what InfoNCE would discard (SimCLR's finding); the head is dropped after training.
    """

    def __init__(self, hidden_size: int, dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # Run in the head's own dtype (bf16 under DeepSpeed), normalise in fp32: the cosines feed exp(s/τ).
        out = self.net(pooled.to(self.net[0].weight.dtype))
        return F.normalize(_fp32(out), dim=-1)


# --------------------------------------------------------------------------------------------------
# Likelihood scorer
# --------------------------------------------------------------------------------------------------


def continuation_logprob(
    logits: torch.Tensor, input_ids: torch.Tensor, cont_mask: torch.Tensor
) -> torch.Tensor:
    """s(x, y) = mean over continuation tokens of log p(y_t | y_<t, x): logits (N, W, V) -> (N,) fp32.

    logits[:, t] predicts input_ids[:, t + 1], so a continuation token at position t is scored by the
    logits at t - 1 (a continuation token at position 0 has no prediction and is skipped). A row without
    scored tokens gives 0.

    Memory: the log-probs come from `nll_rows` (objectives/lm.py): chunk by chunk, float32 temporaries
    of one chunk, no copy of the (N, W, V) logits; positions that score nothing (the context) are skipped
    chunk-wise. The training stage does not make the logits at all: it gives `continuation_rows` to the
    model's head (model/head.py), which computes them one chunk at a time.
    """
    N, W, V = logits.shape
    fn, scored, n = continuation_rows(input_ids, cont_mask)
    return fn(logits.reshape(N * W, V), slice(0, N * W)) / n


def continuation_rows(input_ids: torch.Tensor, cont_mask: torch.Tensor):
    """(fn, scored, n) for `continuation_logprob` from rows of logits: fn(logits (r, V), rows) -> (N,) the
    summed log-probability of each sequence's continuation tokens among the rows `rows` of the flattened
    (N·W) positions (a HeadLoss fn, objectives/lm.py), scored (N·W,) the rows that score, n (N,) the
    scored tokens per sequence (at least 1: a row without any gives 0)."""
    N, W = input_ids.shape
    targets = F.pad(input_ids[:, 1:], (0, 1)).reshape(-1, 1)  # position t predicts token t + 1
    scored = F.pad(cont_mask[:, 1:].bool(), (0, 1)).reshape(-1)  # ... when t + 1 is a continuation token
    seq = torch.arange(N * W, device=input_ids.device) // W  # the sequence of each row

    def fn(z: torch.Tensor, s: slice) -> torch.Tensor:
        nll = nll_rows(z, targets[s], scored[s, None], rows=z.shape[0])
        return nll.new_zeros(N).index_add(0, seq[s], -nll)

    return fn, scored, scored.view(N, W).sum(1).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# SimCTG token-level term
# --------------------------------------------------------------------------------------------------


def simctg_sum(hidden: torch.Tensor, mask: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCTG token-level contrastive term (Su et al. 2022), summed over sequences.

    Args:
        hidden: (N, W, H) last hidden states; mask: (N, W) bool, the tokens that count; margin: ρ.

    Per sequence with n >= 2 counted tokens and cosine s:

        L = 1/(n(n-1)) Σ_i Σ_{j≠i} max(0, ρ - s(h_i, h_i) + s(h_i, h_j))

    (s(h_i, h_i) is computed, not assumed 1, as in the reference implementation). Returns (Σ L over
    sequences with n >= 2, number of such sequences). Memory: an (N, W, W) fp32 similarity tensor.
    """
    h = F.normalize(_fp32(hidden), dim=-1)  # (N, W, H)
    sim = h @ h.transpose(1, 2)  # (N, W, W)
    diag = sim.diagonal(dim1=1, dim2=2)  # (N, W) s(h_i, h_i)
    hinge = F.relu(margin - diag[:, :, None] + sim)  # (N, W, W) [n, i, j]
    m = mask.bool()
    W = m.shape[1]
    eye = torch.eye(W, dtype=torch.bool, device=m.device)
    pair = m[:, :, None] & m[:, None, :] & ~eye  # (N, W, W) counted i != j
    n = m.sum(1)  # (N,)
    per_seq = torch.where(pair, hinge, torch.zeros_like(hinge)).sum((1, 2)) / (n * (n - 1)).clamp_min(1)
    keep = n >= 2
    return torch.where(keep, per_seq, torch.zeros_like(per_seq)).sum(), keep.sum()
