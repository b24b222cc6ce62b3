"""How much a student agrees with the teacher's top-k: training metrics of the distill stage, not losses."""

from __future__ import annotations

import math
from collections.abc import Callable

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
    rows = measured_rows(labels, max_tokens)
    s_flat = student_logits.reshape(B * T, V)
    ids_flat = topk_ids.reshape(B * T, -1)
    out = _zeros(rows)
    for r in rows.split(chunk_tokens):
        _add(out, s_flat.index_select(0, r), ids_flat.index_select(0, r))
    return out


def measured_rows(labels: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The flattened positions the metrics are measured on: the counted ones, at most `max_tokens` of them
    evenly spaced."""
    rows = counted_rows(labels)  # (N,)
    if max_tokens is not None and rows.numel() > max_tokens:
        rows = rows[:: math.ceil(rows.numel() / max_tokens)]
    return rows


def _zeros(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "student_topk_mass": torch.zeros((), dtype=torch.float32, device=rows.device),
        "top1_agreement": torch.zeros((), dtype=torch.int64, device=rows.device),
        "tokens": rows.new_tensor(rows.numel()),
    }


def _add(out: dict[str, torch.Tensor], logits: torch.Tensor, ids: torch.Tensor) -> None:
    s, ids = logits.float(), ids.long()  # (n, V), (n, k)
    out["student_topk_mass"] += (
        F.log_softmax(s, dim=-1).gather(-1, ids).exp().masked_fill(~topk_entries(ids), 0.0).sum()
    )
    out["top1_agreement"] += (s.argmax(-1) == ids[:, 0]).sum()


def agreement_observer(
    topk_ids: torch.Tensor, labels: torch.Tensor, max_tokens: int | None = None
) -> tuple[Callable[[torch.Tensor, slice], None], dict[str, torch.Tensor]]:
    """``agreement_sums`` measured chunk by chunk: (observe, sums), observe(logits (n, V), rows) the
    HeadLoss observer (objectives/lm.py) that adds the chunk's measured rows into sums."""
    rows = measured_rows(labels, max_tokens)
    ids_flat = topk_ids.reshape(-1, topk_ids.shape[-1])
    out = _zeros(rows)

    def observe(logits: torch.Tensor, s: slice) -> None:
        r = rows[(rows >= s.start) & (rows < s.start + logits.shape[0])]
        if r.numel():
            _add(out, logits.index_select(0, r - s.start), ids_flat.index_select(0, r))

    return observe, out


# Tokens per micro-batch the agreement metrics are measured on: enough for a smooth curve, a fraction of
# the cost of the KD term itself.
AGREEMENT_TOKENS = 256
