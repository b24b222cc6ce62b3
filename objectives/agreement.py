"""How much a student agrees with the teacher's top-k: training metrics of the distill stage, not losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stablekd.objectives.divergences import topk_entries
from stablekd.objectives.kd import check_student, check_topk_ids, counted_rows


def agreement_sums(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 2048,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """How much the student (T = 1) agrees with the teacher's top-k, summed over the counted tokens.

    Args:
        student_logits: (B, T, V). topk_ids: (B, T, k), the teacher's ids sorted by probability.
        labels: (B, T); counted tokens as in ``kd_sum``.
        max_tokens: measure on at most this many counted tokens, evenly spaced (a training metric need
            not cost another full log-softmax per step); None = all of them.

    Returns:
        "student_topk_mass": float32 Σ of the student's probability on the teacher's top-k ids;
        "top1_agreement": int64 count of tokens whose student argmax is ``topk_ids[..., 0]``;
        "tokens": int64 count of counted tokens. Sums, so the loop can all-reduce and divide.
    """
    check_student(student_logits, labels)
    check_topk_ids(topk_ids, student_logits)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, T, V = student_logits.shape
    rows = counted_rows(labels)  # (N,)
    if max_tokens is not None and rows.numel() > max_tokens:
        rows = rows[:: math.ceil(rows.numel() / max_tokens)]
    s_flat = student_logits.reshape(B * T, V)
    ids_flat = topk_ids.reshape(B * T, -1)
    mass = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    top1 = torch.zeros((), dtype=torch.int64, device=student_logits.device)
    for r in rows.split(chunk_tokens):
        s = s_flat.index_select(0, r).float()  # (n, V)
        ids = ids_flat.index_select(0, r).long()  # (n, k)
        mass += F.log_softmax(s, dim=-1).gather(-1, ids).exp().masked_fill(~topk_entries(ids), 0.0).sum()
        top1 += (s.argmax(-1) == ids[:, 0]).sum()
    return {"student_topk_mass": mass, "top1_agreement": top1, "tokens": rows.new_tensor(rows.numel())}


# Tokens per micro-batch the agreement metrics are measured on: enough for a smooth curve, a fraction of
# the cost of the KD term itself.
AGREEMENT_TOKENS = 256
