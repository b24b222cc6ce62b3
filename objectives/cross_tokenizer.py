"""Distillation across tokenizers: a student whose vocabulary is not the teacher's (docs/architecture.md).

Conventions (the rest as objectives/kd.py states them):

- Positions. The batch comes from data_pipeline/align.py: student position s is `aligned` when the teacher
  position it was matched with predicts the text that starts where student token s ends; the teacher's
  entries (ids in the *teacher's* vocabulary) are moved to those positions. KD counts the aligned
  positions; CE counts the student's own learned tokens (its `labels`, shifted once as everywhere).
- Teacher probabilities. Top-k entries p_i = exp(log-prob) (padding and the float16 floor: 0); sampled
  entries their weights w_i (E[w_i] = p_i). The rest of the mass, 1 − Σ p_i (clamped at 0), is the tail.
- ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss"): the Wasserstein-1 distance between the two distributions when any token may be moved to any
  other at cost 1, in closed form the L1 distance of the probabilities sorted in descending order. With r
  stored teacher entries per position: Σ_{j<r} |p_(j) − q_(j)| + |p_tail − q_tail|, q_(j) the student's
  j-th largest probability and q_tail = 1 − Σ_{j<r} q_(j): the unstored teacher entries are compared in
  bulk, as the tail bin of top-k KD is.
- Hybrid (after TRL's GOLD): a teacher id whose bytes equal a student id's (`vocab_map`, " the" written
  `▁the` or `Ġthe` alike) maps to it. Mapped entries get the `distill.kind` divergence on bins: the mapped
  ids, then one bin for everything else (teacher 1 − Σ mapped p, student the logsumexp of every other
  id). The unmapped teacher entries get ULD against the student's largest probabilities among the ids no
  teacher id maps to (no tail term: that mass is in the divergence's last bin). Loss = divergence + ULD.
  Only where the next token is the same text on both sides (`same_next`, data_pipeline/align.py): where
  the two continue in differently cut spans (the teacher's " Anna" against the student's " An" + "na"),
  the teacher's mass on a piece is not the student's on that piece, and pulling it there would fight the
  CE term on the student's own token; those positions get ULD alone.
- Temperature: both at T (the stored entries are at soft_labels.temperature = T), × T² like every KD
  term here, so `distill.alpha` mixes on one scale whatever the loss.
- Memory: aligned rows are taken `chunk_rows(V)` at a time, so float32 temporaries stay near 64 MiB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stablekd.objectives.divergences import FP16_FLOOR, NEG_INF, divergence, log1mexp, topk_entries
from stablekd.objectives.kd import SampledLabels, Teacher, check_params
from stablekd.objectives.lm import chunk_rows, compute_dtype

MODES = ("uld", "hybrid")


def teacher_probs(teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probabilities) of stored teacher entries, each (..., k): absent entries (top-k padding, the
    float16 floor, sampled padding) have probability 0."""
    if isinstance(teacher, SampledLabels):
        return teacher.ids, teacher.weights.to(compute_dtype(teacher.weights))
    ids, lp = teacher
    flat = ids.reshape(-1, ids.shape[-1])
    real = topk_entries(flat).reshape(ids.shape) & (lp > FP16_FLOOR)
    return ids, lp.to(compute_dtype(lp)).exp().masked_fill(~real, 0.0)


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher probabilities p (n, k) (0 = absent) and student probabilities q (n, V) -> (Σ_{j<r}
    |p_(j) − q_(j)| per row, Σ_{j<r} q_(j) per row), r the row's count of nonzero p."""
    k = p.shape[-1]
    ps = p.sort(-1, descending=True).values
    qs = q.topk(min(k, q.shape[-1]), dim=-1).values
    if qs.shape[-1] < k:  # a student vocabulary smaller than k: its missing ranks hold 0
        qs = F.pad(qs, (0, k - qs.shape[-1]))
    real = ps > 0
    return ((ps - qs).abs() * real).sum(-1), (qs * real).sum(-1)


def uld_rows(lq: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """ULD per row: student log-probs lq (n, V), teacher entry probabilities p (n, k) -> (n,)."""
    q = lq.exp()
    l1, q_kept = _sorted_l1(p, q)
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    q_tail = (1 - q_kept).clamp(min=0)
    return l1 + (p_tail - q_tail).abs()


def hybrid_rows(
    lq: torch.Tensor,
    ids: torch.Tensor,
    p: torch.Tensor,
    vmap: torch.Tensor,
    unmapped: torch.Tensor,
    kind: str,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Hybrid per row: student log-probs lq (n, V), teacher entries ids/p (n, k), vmap (V_teacher,) teacher
    id -> student id or −1, unmapped (V,) bool: student ids no teacher id maps to -> (n,)."""
    n, V = lq.shape
    sid = vmap[ids.long()]  # (n, k)
    mapped = (sid >= 0) & (p > 0)
    # The mapped bins and the rest: a −inf column V stands for "not a mapped entry" on the student side.
    col = torch.where(mapped, sid, V)
    ext = torch.cat([lq, lq.new_full((n, 1), NEG_INF)], dim=-1)  # (n, V + 1)
    lq_bins = ext.gather(-1, col)
    lq_rest = ext.scatter(-1, col, NEG_INF).logsumexp(-1, keepdim=True)
    lp_bins = p.clamp(min=1e-30).log().masked_fill(~mapped, NEG_INF)
    lp_rest = log1mexp(lp_bins.logsumexp(-1, keepdim=True))
    div = divergence(torch.cat([lp_bins, lp_rest], -1), torch.cat([lq_bins, lq_rest], -1), kind, beta, skew)
    l1, _ = _sorted_l1(p.masked_fill(mapped, 0.0), lq.exp().masked_fill(~unmapped, 0.0))
    return div + l1


def cross_kd_sum(
    student_logits: torch.Tensor,
    teacher: Teacher,
    aligned: torch.Tensor,
    mode: str,
    vmap: torch.Tensor | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    same_next: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over aligned positions of T² · the `mode` loss, aligned positions).

    Args:
        student_logits: (B, T, V) over the student's tokenizer ids.
        teacher: the teacher's entries at the student positions, (topk_ids, topk_logprobs) or SampledLabels,
            each (B, T, k), ids in the teacher's vocabulary.
        aligned: (B, T) bool, the positions that count.
        mode: "uld" or "hybrid" (module docstring); hybrid needs `vmap` (V_teacher,) int64.
        kind, beta, skew: the divergence of hybrid's mapped bins (objectives/kd.py `kd_sum`).
        same_next: (B, T) bool, where hybrid applies (else ULD); None = every aligned position.
    """
    if mode not in MODES:
        raise ValueError(f"unknown cross-tokenizer mode {mode!r}; expected one of {MODES}")
    check_params(kind, temperature, beta, skew)
    if mode == "hybrid" and vmap is None:
        raise ValueError("mode 'hybrid' needs vmap (teacher id -> student id)")
    B, T, V = student_logits.shape
    if tuple(aligned.shape) != (B, T):
        raise ValueError(f"aligned: expected shape {(B, T)}, got {tuple(aligned.shape)}")
    ids, p = teacher_probs(teacher)
    flat = student_logits.reshape(B * T, V)
    rows_idx = aligned.reshape(-1).nonzero().squeeze(1)
    unmapped = unmapped_ids(vmap, V, flat.device)
    ids, p = ids.reshape(B * T, -1), p.reshape(B * T, -1)
    exact = None if same_next is None else same_next.reshape(-1)
    total = (
        flat[:0].to(compute_dtype(flat)).sum()
    )  # 0, in the graph: an all-unaligned micro-batch can backward
    for chunk in rows_idx.split(chunk_rows(V) if chunk_tokens is None else chunk_tokens):
        total = total + cross_rows(
            flat[chunk], ids[chunk], p[chunk], mode, vmap, unmapped, kind, temperature, beta, skew,
            None if exact is None else exact[chunk],
        )  # fmt: skip
    return total, torch.tensor(rows_idx.numel())


def unmapped_ids(vmap: torch.Tensor | None, vocab: int, device: torch.device) -> torch.Tensor | None:
    """(vocab,) bool: the student ids no teacher id maps to (hybrid's ULD part), None without a vmap."""
    if vmap is None:
        return None
    vmap = vmap.to(device)
    unmapped = torch.ones(vocab, dtype=torch.bool, device=device)
    unmapped[vmap[(vmap >= 0) & (vmap < vocab)]] = False
    return unmapped


def cross_rows(
    logits: torch.Tensor,
    ids: torch.Tensor,
    p: torch.Tensor,
    mode: str,
    vmap: torch.Tensor | None,
    unmapped: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    skew: float,
    exact: torch.Tensor | None,
) -> torch.Tensor:
    """T² · Σ of the `mode` loss over aligned rows: the student's logits (n, V), the teacher's entries ids
    and probabilities p (n, k) (``teacher_probs``), hybrid's `vmap`/`unmapped` (``unmapped_ids``) and where
    it applies, `exact` (n,) (None: every row). ``cross_kd_sum`` checks the arguments; the head
    (model/head.py) calls it on the aligned rows of one chunk of logits."""
    dtype = compute_dtype(logits)
    lq = F.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (n, V)
    pc = p.to(dtype)
    if mode == "uld":
        per_row = uld_rows(lq, pc)
    else:
        vmap = vmap.to(logits.device)
        per_row = hybrid_rows(lq, ids, pc, vmap, unmapped, kind, beta, skew)
        if exact is not None and not exact.all():
            per_row = torch.where(exact, per_row, uld_rows(lq, pc))
    return per_row.sum() * temperature**2
