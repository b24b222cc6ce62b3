"""Soft-label encodings (`soft_labels.encoding`): what a record stores of the teacher's distribution per
token, how it is decoded for the loss, and how much of the distribution it keeps.

Every encoding stores, per record of L tokens, `input_ids` (uint16 when the vocabulary fits, else int32)
and `loss_mask` (uint8), plus:

- `topk` (the reference): `topk_ids` [L, k] and `topk_logprobs` [L, k], log_softmax(logits / T) at the
  k most probable ids, sorted descending.
- `topp`: per position the most probable ids, in descending order, until their mass reaches
  `soft_labels.mass` or `soft_labels.k` entries; variable length per position, `entry_counts` [L] (the
  offsets are their running sum) with `entry_ids` [C] and `entry_logprobs` [C] packed position after
  position. A record has room for C = L × `soft_labels.mean_entries` entries: a sequence that needs more
  loses its least probable entries first (each position keeps at least one), which keeps the most mass
  for the bytes; unused room is zero padding.
- `sampled` (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs",
  ACL 2025): N = `soft_labels.draws` ids drawn with replacement from a proposal q per position; stored as
  the unique ids sorted by count, `sample_ids` [L, N] and `sample_counts` [L, N] (0 = padding), and
  with a proposal other than the teacher (`soft_labels.proposal_temperature` > 0: q = softmax(logits /
  T_q)) also `sample_logw` [L, N] = log p − log q at each id. Decoded weight of id i:
  w_i = (count_i / N) · p_i / q_i, an unbiased estimate of p_i (E[w_i] = p_i), so
  −Σ_i w_i log s_i is an unbiased estimate of the cross-entropy H(p, s) and its gradient of the forward
  KL's gradient (`objectives.distill`, kind fkl only).

Log-probabilities (`topk_logprobs`, `entry_logprobs`) are float16, or with `soft_labels.logprob_bits=8`
one byte: the code c = round(255 · √p) (p = exp(log-prob)), decoded as p̂ = (c / 255)². The error is
|√p̂ − √p| ≤ 1/510, i.e. |p̂ − p| ≤ √p / 255 + 1/260100: 0.37 % of p at p = 0.9, 3.9 % at p = 0.01;
probabilities below 1/260100 (3.8e-6) decode as 0. Square-root steps spend the codes where the mass is,
unlike uniform log-prob steps (a constant ~3 % relative error even on the top entry).

Ids take the fewest whole bytes the vocabulary allows (uint16 up to 65,536 ids, else int32); no bit
packing below a byte.

Decoded batches (what the losses read, `decode`): topk and topp give `topk_ids` / `topk_logprobs` [B, L, k]
float32, a topp position with fewer entries padded with its own first id at log-prob −inf (the losses
treat such repeats as absent: objectives/kd.py); sampled gives `sample_ids` [B, L, N] (padding: the
first id, weight 0) and `sample_weights` [B, L, N] float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stablekd.data_pipeline.formats import ENCODINGS
from stablekd.data_pipeline.shards.reader import widen
from stablekd.objectives.lm import chunk_rows

_UINT16_VOCAB = 65536
_FP16_MIN = float(np.finfo(np.float16).min)  # -65504: stored for -inf (zero probability)
_CODES = 255


def id_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of token ids: uint16 when every id (0 .. vocab_size-1) fits, else int32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= _UINT16_VOCAB else np.dtype(np.int32)


def _rows(logits: torch.Tensor, chunk: int) -> Iterable[torch.Tensor]:
    flat = logits.reshape(-1, logits.shape[-1])  # [..., V] -> [N, V]
    for s in range(0, flat.shape[0], chunk):
        yield flat[s : s + chunk]


def compress(
    logits: torch.Tensor, k: int, temperature: float, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the teacher distribution at temperature T.

    Args:
        logits: [..., V] raw teacher logits (any float dtype; computed in fp32).
        k: entries kept per token.
        temperature: T; the distribution is softmax(logits / T).
        chunk: rows processed at once, bounding the fp32 [chunk, V] temporaries; None = `chunk_rows(V)`.

    Returns:
        topk_ids [..., k] int64 and topk_logprobs [..., k] fp32 = log_softmax(logits / T) at those ids,
        sorted descending.
    """
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    ids, vals = [], []
    for x in _rows(logits, chunk or chunk_rows(V)):
        logp = F.log_softmax(x.float() / temperature, dim=-1)  # [n, V]
        v, i = logp.topk(k, dim=-1, sorted=True)  # [n, k]
        ids.append(i)
        vals.append(v)
    shape = (*logits.shape[:-1], k)
    if not ids:  # zero tokens
        return torch.empty(shape, dtype=torch.long), torch.empty(shape, dtype=torch.float32)
    return torch.cat(ids).reshape(shape), torch.cat(vals).reshape(shape)


def tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] -> [...]: teacher probability outside the top k, 1 - sum(exp(topk_logprobs)), in fp32.

    Clamped at 0: fp16 rounding of the stored log-probs can push the sum a hair above 1.
    """
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp_min(0.0)


def quantize(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs -> uint8 codes round(255 · √p) (module docstring)."""
    return (logprobs.float().mul(0.5).exp() * _CODES).round().clamp(0, _CODES).to(torch.uint8)


def dequantize(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (any integer dtype) -> float32 log-probs 2 · log(c / 255); code 0 -> −inf."""
    return 2.0 * torch.log(codes.float() / _CODES)


def store_logprobs(lp: torch.Tensor, bits: int) -> np.ndarray:
    """Log-probs as stored: uint8 codes (bits 8) or float16 with -inf as the float16 floor (bits 16)."""
    if bits == 8:
        return quantize(lp).numpy()
    return lp.float().clamp(_FP16_MIN, 0.0).to(torch.float16).numpy()  # -inf: the fp16 floor


def _load_logprobs(a: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return dequantize(a)
    lp = a.float()
    return lp.masked_fill(lp <= _FP16_MIN, -math.inf)


# --------------------------------------------------------------------------------------------- schema


def schema(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{array: (storage dtype, per-record shape)} of a soft-label meta (a set written before encodings
    existed has no "encoding": topk with int32 input_ids, without loss_mask unless its meta says so)."""
    L, V = meta["seq_len"], meta["vocab_size"]
    enc = meta.get("encoding", "topk")
    ids = id_dtype(V)
    lp = np.dtype(np.uint8) if meta.get("logprob_bits", 16) == 8 else np.dtype(np.float16)
    out = {"input_ids": (ids if "encoding" in meta else np.dtype(np.int32), (L,))}
    if meta.get("loss_mask"):
        out["loss_mask"] = (np.dtype(np.uint8), (L,))
    if enc == "topk":
        out["topk_ids"] = (ids, (L, meta["k"]))
        out["topk_logprobs"] = (lp, (L, meta["k"]))
    elif enc == "topp":
        cap = L * meta["mean_entries"]
        out["entry_counts"] = (np.dtype(np.uint8), (L,))
        out["entry_ids"] = (ids, (cap,))
        out["entry_logprobs"] = (lp, (cap,))
    elif enc == "sampled":
        out["sample_ids"] = (ids, (L, meta["draws"]))
        out["sample_counts"] = (np.dtype(np.uint8), (L, meta["draws"]))
        if meta["proposal_temperature"] > 0:
            out["sample_logw"] = (np.dtype(np.float16), (L, meta["draws"]))
    else:
        raise ValueError(
            f"soft-label meta: unknown encoding {enc!r} (expected one of {', '.join(ENCODINGS)})"
        )
    return out


# --------------------------------------------------------------------------------------------- encode


def _topp(top_lp: torch.Tensor, top_ids: torch.Tensor, mass: float, cap: int) -> dict[str, torch.Tensor]:
    """One record: its k most probable log-probs and ids per position [L, k] (descending) -> entry_counts
    [L], entry_ids [cap], entry_logprobs [cap] (float32)."""
    before = top_lp.exp().cumsum(-1) - top_lp.exp()  # mass of the entries ahead of each
    keep = before < mass  # the entry that reaches the mass is kept, those after it are not
    keep[:, 0] = True
    if int(keep.sum()) > cap:
        # Over budget: drop the least probable entries of the record (never a position's first).
        score = top_lp.masked_fill(~keep, math.inf).clone()
        score[:, 0] = math.inf
        drop = int(keep.sum()) - cap
        order = score.flatten().argsort()[:drop]
        keep.view(-1)[order] = False
    counts = keep.sum(-1)  # entries stay a prefix of each row: the dropped ones are its smallest
    ids = torch.zeros(cap, dtype=torch.long, device=top_lp.device)
    lps = torch.full((cap,), -math.inf, device=top_lp.device)
    n = int(counts.sum())
    ids[:n], lps[:n] = top_ids[keep], top_lp[keep]  # row-major: position after position
    return {"entry_counts": counts.to(torch.uint8), "entry_ids": ids, "entry_logprobs": lps}


def _sampled(
    lp: torch.Tensor, x: torch.Tensor, draws: int, proposal_t: float, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Rows of a record: lp [n, V] teacher log-probs at T, x [n, V] logits -> their unique draws sorted by
    count, drawn with the record's generator `gen`."""
    lq = lp if proposal_t <= 0 else F.log_softmax(x / proposal_t, dim=-1)
    drawn = torch.multinomial(lq.exp(), draws, replacement=True, generator=gen)  # [L, N]
    srt = drawn.sort(-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new.long().cumsum(-1) - 1  # [L, N]: which unique id each draw is
    counts = torch.zeros_like(srt).scatter_add_(1, slot, torch.ones_like(srt))
    ids = torch.zeros_like(srt).scatter_(1, slot, srt)
    counts, order = counts.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    ids = torch.where(counts > 0, ids, ids[:, :1])  # padding: the row's first id, count 0
    out = {"sample_ids": ids, "sample_counts": counts.to(torch.uint8)}
    if proposal_t > 0:
        logw = (lp.gather(1, ids) - lq.gather(1, ids)).masked_fill(counts == 0, 0.0)
        out["sample_logw"] = logw.clamp(_FP16_MIN, -_FP16_MIN).to(torch.float16)
    return out


def encode(logits: torch.Tensor, meta: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Teacher logits [B, L, V] -> the encoding's arrays for B records (input_ids, loss_mask excluded).

    The `sampled` encoding draws record b's ids with a generator seeded `seed + b` (a writer passes
    its seed of the first record's index, so a record's draws do not depend on batching or resumes);
    the other encodings are deterministic. Computed on the logits' device; only the results move to
    the host.
    """
    enc, T = meta.get("encoding", "topk"), meta["temperature"]
    bits, ids = meta.get("logprob_bits", 16), id_dtype(meta["vocab_size"])
    if enc == "topk":
        top_ids, top_lp = compress(logits, meta["k"], T)
        return {
            "topk_ids": top_ids.cpu().numpy().astype(ids),
            "topk_logprobs": store_logprobs(top_lp.cpu(), bits),
        }
    # One record at a time, in chunks of its positions (`chunk_rows`): a chunk's [n, V] float32 log-probs
    # are the only full-vocabulary temporaries, at any vocabulary and sequence length.
    if enc not in ("topp", "sampled"):
        raise ValueError(f"unknown soft-label encoding {enc!r}")
    recs = []
    for b in range(logits.shape[0]):
        gen = torch.Generator(device=logits.device).manual_seed(seed + b)
        parts = []
        for x in logits[b].detach().split(chunk_rows(logits.shape[-1])):
            x = x.float()  # [n, V]
            lp = F.log_softmax(x / T, dim=-1)
            if enc == "topp":
                parts.append(dict(zip(("lp", "ids"), lp.topk(meta["k"], dim=-1), strict=True)))  # [n, k]
            else:
                parts.append(_sampled(lp, x, meta["draws"], meta["proposal_temperature"], gen))
        rec = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        if enc == "topp":
            rec = _topp(rec["lp"], rec["ids"], meta["mass"], logits.shape[1] * meta["mean_entries"])
        recs.append(rec)
    out = {k: torch.stack([r[k] for r in recs]).cpu() for k in recs[0]}
    for k in ("entry_ids", "sample_ids"):
        if k in out:
            out[k] = out[k].to(torch.int64).numpy().astype(ids)
    for k in ("entry_logprobs",):
        if k in out:
            out[k] = store_logprobs(out[k], bits)
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in out.items()}


# --------------------------------------------------------------------------------------------- decode


def decode(batch: dict[str, Any], meta: dict) -> dict[str, torch.Tensor]:
    """A batch of stored arrays (as a ShardLoader gives them: ids widened to int32) -> what the losses
    read: input_ids, loss_mask (when stored) and topk_ids/topk_logprobs or sample_ids/sample_weights."""
    enc, bits = meta.get("encoding", "topk"), meta.get("logprob_bits", 16)
    out = {k: batch[k] for k in ("input_ids", "loss_mask") if k in batch}
    if enc == "topk":
        out["topk_ids"] = batch["topk_ids"]
        lp = batch["topk_logprobs"]
        out["topk_logprobs"] = (
            _load_logprobs(lp, bits) if bits == 8 else lp
        )  # float16 stays (the loss widens it)
        return out
    if enc == "topp":
        counts = batch["entry_counts"].long()  # [B, L]
        k = meta["k"]
        start = counts.cumsum(-1) - counts  # [B, L] offset of each position's first entry
        j = torch.arange(k)
        idx = (start[..., None] + j).clamp(max=batch["entry_ids"].shape[1] - 1)  # [B, L, k]
        B = counts.shape[0]
        flat_ids = batch["entry_ids"].long().gather(1, idx.reshape(B, -1)).reshape(idx.shape)
        flat_lp = (
            _load_logprobs(batch["entry_logprobs"], bits).gather(1, idx.reshape(B, -1)).reshape(idx.shape)
        )
        valid = j < counts[..., None]
        out["topk_ids"] = torch.where(valid, flat_ids, flat_ids[..., :1]).to(torch.int32)
        out["topk_logprobs"] = flat_lp.masked_fill(~valid, -math.inf)
        return out
    if enc == "sampled":
        w = batch["sample_counts"].float() / meta["draws"]
        if "sample_logw" in batch:
            w = w * batch["sample_logw"].float().exp()
        out["sample_ids"] = batch["sample_ids"]
        out["sample_weights"] = w
        return out
    raise ValueError(f"unknown soft-label encoding {enc!r}")


class Decoded:
    """A soft-label batch source (ShardLoader, EqualEpochs) whose batches come out decoded (`decode`)."""

    def __init__(self, batches: Any, meta: dict) -> None:
        self.batches, self.meta = batches, meta

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield decode(batch, self.meta)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


# --------------------------------------------------------------------------------------------- fidelity


def fidelity(logits: torch.Tensor, meta: dict) -> dict[str, float | None]:
    """How much of the teacher distribution an encoding keeps, as stored, averaged over logits [..., V].

    With p = softmax(logits / T): "topk_mass" the mean (and "topk_mass_min" the least) teacher probability
    on the ids a token keeps; "kl" the mean KL(p ‖ q̂) in nats, q̂ = the decoded probabilities on the kept
    ids and the rest of the mass (1 − Σ q̂, at least 1e-9) spread evenly over the other ids: the
    maximum-entropy distribution consistent with what is stored, so it counts both the dropped tail's
    shape and the rounding of the stored values (topk, topp; None for sampled, whose weights estimate p
    without defining a distribution); "tokens" the rows. Merge results with `merge_fidelity`.
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
