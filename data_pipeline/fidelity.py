"""How much of the teacher's distribution a soft-label encoding keeps, as stored (the soft_labels stage's
fidelity record, benchmarks/soft_label_encodings.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from stablekd.data_pipeline.encodings import decode, encode
from stablekd.data_pipeline.shards.reader import widen
from stablekd.objectives.lm import chunk_rows


def fidelity(logits: torch.Tensor, meta: dict) -> dict[str, float | None]:
    """How much of the teacher distribution an encoding keeps, as stored, averaged over logits [..., V].

    With p = softmax(logits / T): "topk_mass" the mean (and "topk_mass_min" the least) teacher probability
    on the ids a token keeps; "kl" the mean KL(p ‖ q̂) in nats, q̂ = the decoded probabilities on the kept
    ids and the rest of the mass (1 − Σ q̂, at least 1e-9) spread evenly over the other ids: the
    maximum-entropy distribution consistent with what is stored, so it counts both the dropped tail's
    shape and the rounding of the stored values (an encoding decoded to entries; None for one decoded to
    samples, whose weights estimate p without defining a distribution); "tokens" the rows. Merge results with `merge_fidelity`.
    """
    V = logits.shape[-1]
    # In chunks of positions: the measure holds several dense float32 [n, V] tensors at once.
    return merge_fidelity(_fidelity(x, meta) for x in logits.reshape(-1, V).split(chunk_rows(V) // 4 or 1))


def _fidelity(rows: torch.Tensor, meta: dict) -> dict[str, float | None]:
    V = rows.shape[-1]
    rows = rows.float()
    n = rows.shape[0]
    if n == 0:
        return merge_fidelity([])
    rec = encode(rows[None], {**meta, "seq_len": n})
    stored = {k: torch.from_numpy(widen(v)) for k, v in rec.items()}  # as a reader returns them
    dec = decode(stored, {**meta, "seq_len": n})
    lp = F.log_softmax(rows / meta["temperature"], dim=-1)  # [n, V]
    if "sample_ids" in dec:
        valid = dec["sample_weights"][0] > 0
        mass = lp.gather(1, dec["sample_ids"][0].long()).exp().masked_fill(~valid, 0.0).sum(-1)
        return {
            "topk_mass": float(mass.mean()),
            "topk_mass_min": float(mass.min()),
            "kl": None,
            "tokens": float(n),
        }
    ids, q_lp = dec["topk_ids"][0].long(), dec["topk_logprobs"][0].float()  # [n, k]
    valid = torch.isfinite(q_lp)
    valid[:, 0] = True
    mass = lp.gather(1, ids).exp().masked_fill(~valid, 0.0).sum(-1)  # [n]
    q_kept = q_lp.exp().masked_fill(~valid, 0.0)
    kept = valid.sum(-1)
    tail = (1.0 - q_kept.sum(-1)).clamp_min(1e-9)  # [n]
    # Padding repeats a row's first id with nothing kept: add (never overwrite) into the dense rows.
    on = torch.zeros(n, V).scatter_add_(1, ids, valid.float()) > 0
    q = torch.zeros(n, V).scatter_add_(1, ids, q_kept)
    log_q = torch.where(on, q.clamp_min(1e-30).log(), (tail / (V - kept).clamp_min(1)).log()[:, None])
    p = lp.exp()
    kl = (p * (lp - log_q)).masked_fill(p == 0, 0.0).sum(-1).clamp_min(0.0)
    return {
        "topk_mass": float(mass.mean()),
        "topk_mass_min": float(mass.min()),
        "kl": float(kl.mean()),
        "tokens": float(n),
    }


class PickedRows:
    """The rows `pos` (flat positions of a batch's [B·L, V] logits, in that order) of the chunks a model's
    head hands over (`observe`, a HeadLoss's: model/head.py), copied to the host: `rows` is then
    logits.reshape(-1, V)[pos].cpu() without the whole logits ever existing (the stage's fidelity sample)."""

    def __init__(self, pos: torch.Tensor) -> None:
        self.pos, self.rows = pos.cpu(), None

    def observe(self, logits: torch.Tensor, rows: slice) -> None:
        if self.rows is None:
            self.rows = torch.empty(len(self.pos), logits.shape[-1], dtype=logits.dtype)
        hit = ((self.pos >= rows.start) & (self.pos < rows.stop)).nonzero()[:, 0]
        if len(hit):
            self.rows[hit] = logits[(self.pos[hit] - rows.start).to(logits.device)].cpu()


def merge_fidelity(parts: Iterable[dict[str, float | None]]) -> dict[str, float | None]:
    """Token-weighted combination of `fidelity` results (batches, ranks); kl stays None if any part has none."""
    parts = [p for p in parts if p and p.get("tokens", 0) > 0]
    n = sum(p["tokens"] for p in parts)
    if n == 0:
        return {"topk_mass": 0.0, "topk_mass_min": 0.0, "kl": 0.0, "tokens": 0.0}
    kl = None if any(p["kl"] is None for p in parts) else sum(p["kl"] * p["tokens"] for p in parts) / n
    return {
        "topk_mass": sum(p["topk_mass"] * p["tokens"] for p in parts) / n,
        "topk_mass_min": min(p["topk_mass_min"] for p in parts),
        "kl": kl,
        "tokens": float(n),
    }
