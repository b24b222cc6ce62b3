"""Top-k soft labels: compression of teacher logits, fidelity of that compression, the shard format.

One record = one training sequence of `seq_len` tokens (DESIGN §4):

    input_ids      int32   [seq_len]
    topk_ids       uint16  [seq_len, k]   (int32 when vocab_size > 65,536; see `topk_dtype`)
    topk_logprobs  float16 [seq_len, k]   log_softmax(teacher_logits / T), top k, sorted descending
    loss_mask      uint8   [seq_len]      1 where the token is learned, 0 where it is context (the prompt
                                          of a task record, data_pipeline/tasks.py); sets written before
                                          it existed have no such array (meta without "loss_mask"): every
                                          token is learned

The tail mass 1 - sum(exp(topk_logprobs)) is derived (`tail_mass`), never stored. Readers get topk_ids
as int32 whatever the storage dtype (ShardReader widens uint16).

Stage code, per writer rank (the mechanics are in shards.py):

    meta = soft_label_meta(ckpt_id, tok_hash, vocab_size, temperature=T, k=32, seq_len=L)
    w = SoftLabelWriter(out_dir, rank, meta, records_per_shard=256, world_size=world)
    for input_ids in sequences[w.records_written:]:           # resume: skip what is committed
        w.add_logits(input_ids, teacher(input_ids).logits)    # compress + cast + buffer + fidelity
    w.close()
    barrier(); parts = all_gather_object(w.fidelity)
    if rank == 0: finalize_soft_labels(out_dir, world, merge_fidelity(parts))

and a consumer: `ShardLoader(soft_label_reader(out_dir, expect, rank, world, num_workers), micro_bs)`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stablekd.data_pipeline.shards import ShardError, ShardReader, ShardWriter, finalize

KIND = "soft_labels"
FIDELITY_RATE = 8  # the fidelity record samples one position in 8 of each batch until its budget is spent
_UINT16_VOCAB = 65536  # ids 0..65535 fit uint16
_FP16_MIN = float(np.finfo(np.float16).min)  # -65504: exp() of it is 0, and 0 * it is 0 (not NaN)


def topk_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of topk_ids: uint16 when every id (0 .. vocab_size-1) fits, else int32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= _UINT16_VOCAB else np.dtype(np.int32)


def soft_label_meta(
    teacher_checkpoint: str, tokenizer_hash: str, vocab_size: int, temperature: float, k: int, seq_len: int
) -> dict:
    """Manifest meta of a soft-label set; readers check any subset of it against their config."""
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return {
        "teacher_checkpoint": str(teacher_checkpoint),
        "tokenizer_hash": str(tokenizer_hash),
        "vocab_size": int(vocab_size),
        "temperature": float(temperature),
        "k": int(k),
        "seq_len": int(seq_len),
        "loss_mask": True,
    }


def soft_label_schema(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{array name: (storage dtype, per-record shape)} for a soft-label meta."""
    L, k = meta["seq_len"], meta["k"]
    schema = {
        "input_ids": (np.dtype(np.int32), (L,)),
        "topk_ids": (topk_dtype(meta["vocab_size"]), (L, k)),
        "topk_logprobs": (np.dtype(np.float16), (L, k)),
    }
    if meta.get("loss_mask"):
        schema["loss_mask"] = (np.dtype(np.uint8), (L,))
    return schema


# ----------------------------------------------------------------------------------- compression maths


def _rows(logits: torch.Tensor, chunk: int) -> Iterable[torch.Tensor]:
    flat = logits.reshape(-1, logits.shape[-1])  # [..., V] -> [N, V]
    for s in range(0, flat.shape[0], chunk):
        yield flat[s : s + chunk]


def compress(
    logits: torch.Tensor, k: int, temperature: float, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the teacher distribution at temperature T.

    Args:
        logits: [..., V] raw teacher logits (any float dtype; computed in fp32).
        k: entries kept per token.
        temperature: T; the distribution is softmax(logits / T).
        chunk: rows processed at once, bounding the fp32 [chunk, V] temporaries.

    Returns:
        topk_ids [..., k] int64 and topk_logprobs [..., k] fp32 = log_softmax(logits / T) at those ids,
        sorted descending.
    """
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    ids, vals = [], []
    for x in _rows(logits, chunk):
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


def fidelity(
    logits: torch.Tensor,
    k: int,
    temperature: float,
    mask: torch.Tensor | None = None,
    chunk: int = 4096,
) -> dict[str, float]:
    """How much of the teacher distribution top-k compression keeps, averaged over tokens.

    With p = softmax(logits / T) over V ids, K = its top-k ids and tail = 1 - sum_{i in K} p_i, the
    compressed distribution q keeps the top-k probabilities and spreads the tail uniformly:
        q_i = p_i                   for i in K
        q_j = tail / (V - k)        for j not in K
    (when k == V, q = p). Then KL(p || q) = sum_{j not in K} p_j * (log p_j - log(tail / (V - k))),
    in nats; 0 when the tail is flat. q is the maximum-entropy distribution consistent with what is
    stored (top-k probabilities + tail mass), so KL measures the tail shape the soft labels drop.

    Args:
        logits: [..., V] teacher logits.
        k, temperature: as in `compress`.
        mask: optional bool [...]: tokens to count (default all).

    Returns:
        {"topk_mass": mean sum_{i in K} p_i, "topk_mass_min": its minimum, "kl": mean KL(p || q),
         "tokens": number of tokens counted} (floats; combine across batches/ranks with merge_fidelity).
    """
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    if mask is not None:
        logits = logits[mask.bool()]  # [N, V]
    mass_sum, kl_sum, n, mass_min = 0.0, 0.0, 0, math.inf
    for x in _rows(logits, chunk):
        logp = F.log_softmax(x.float() / temperature, dim=-1)  # [n, V]
        top_logp, top_ids = logp.topk(k, dim=-1)  # [n, k]
        mass = top_logp.exp().sum(-1)  # [n]
        if k < V:
            tail_logp = logp.scatter(-1, top_ids, -math.inf)  # [n, V], top-k removed
            # Tail mass from the tail itself (logsumexp), not 1 - mass: no cancellation when mass ~ 1.
            log_tail = torch.logsumexp(tail_logp, dim=-1)  # [n]
            tail_p = tail_logp.exp()
            plogp = torch.where(tail_p > 0, tail_p * tail_logp, torch.zeros_like(tail_p)).sum(-1)  # [n]
            kl = plogp - log_tail.exp() * (log_tail - math.log(V - k))
            kl = torch.where(torch.isfinite(log_tail), kl, torch.zeros_like(kl)).clamp_min(0.0)
        else:
            kl = torch.zeros_like(mass)
        mass_sum += mass.sum().item()
        kl_sum += kl.sum().item()
        n += mass.numel()
        if mass.numel():
            mass_min = min(mass_min, mass.min().item())
    if n == 0:
        return {"topk_mass": 0.0, "topk_mass_min": 0.0, "kl": 0.0, "tokens": 0.0}
    return {"topk_mass": mass_sum / n, "topk_mass_min": mass_min, "kl": kl_sum / n, "tokens": float(n)}


def merge_fidelity(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Token-weighted combination of `fidelity` results (batches, ranks)."""
    parts = [p for p in parts if p and p.get("tokens", 0) > 0]
    n = sum(p["tokens"] for p in parts)
    if n == 0:
        return {"topk_mass": 0.0, "topk_mass_min": 0.0, "kl": 0.0, "tokens": 0.0}
    return {
        "topk_mass": sum(p["topk_mass"] * p["tokens"] for p in parts) / n,
        "topk_mass_min": min(p["topk_mass_min"] for p in parts),
        "kl": sum(p["kl"] * p["tokens"] for p in parts) / n,
        "tokens": float(n),
    }


# ------------------------------------------------------------------------------------------ the format


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class SoftLabelWriter(ShardWriter):
    """ShardWriter with kind "soft_labels" and the schema fixed by the meta.

    `fidelity` accumulates `fidelity()` over the batches given to `add_logits` in this process (after a
    resume it covers only the records written since; it is an estimate, reported in manifest meta).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        meta: dict,
        records_per_shard: int,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            out_dir,
            rank,
            KIND,
            meta,
            records_per_shard,
            world_size=world_size,
            schema=soft_label_schema(meta),
        )
        self.fidelity: dict[str, float] = merge_fidelity([])

    def add_batch(
        self,
        input_ids: torch.Tensor | np.ndarray,
        topk_ids: torch.Tensor | np.ndarray,
        topk_logprobs: torch.Tensor | np.ndarray,
        loss_mask: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Cast and buffer B records: input_ids [B, L], topk_ids [B, L, k], topk_logprobs [B, L, k],
        loss_mask [B, L] (truthy = learned; None = every token)."""
        L, k, V = self.meta["seq_len"], self.meta["k"], self.meta["vocab_size"]
        ids, tids, tlp = _np(input_ids), _np(topk_ids), _np(topk_logprobs)
        B = ids.shape[0] if ids.ndim else -1
        mask = np.ones((B, L), np.uint8) if loss_mask is None else _np(loss_mask)
        for name, a, shape in (
            ("input_ids", ids, (B, L)),
            ("topk_ids", tids, (B, L, k)),
            ("topk_logprobs", tlp, (B, L, k)),
            ("loss_mask", mask, (B, L)),
        ):
            if a.shape != shape:
                raise ShardError(f"{self.path}: {name} has shape {a.shape}, expected {shape} (B, seq_len, k)")
        if tids.size and (tids.min() < 0 or tids.max() >= V):
            raise ShardError(f"{self.path}: topk_ids outside [0, vocab_size={V})")
        self.add(
            input_ids=ids.astype(np.int32),
            topk_ids=tids.astype(topk_dtype(V)),
            # Log-probs are <= 0; -inf (masked vocabulary) becomes the most negative finite fp16.
            topk_logprobs=np.clip(tlp.astype(np.float32), _FP16_MIN, 0.0).astype(np.float16),
            **({"loss_mask": (mask != 0).astype(np.uint8)} if self.meta.get("loss_mask") else {}),
        )

    def add_logits(
        self,
        input_ids: torch.Tensor | np.ndarray,
        logits: torch.Tensor,
        loss_mask: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Compress teacher logits [B, L, V] at the meta's k and T, then `add_batch`; updates `fidelity`."""
        k, T = self.meta["k"], self.meta["temperature"]
        topk_ids, topk_logprobs = compress(logits, k, T)
        self.fidelity = merge_fidelity([self.fidelity, fidelity(logits, k, T)])
        self.add_batch(input_ids, topk_ids, topk_logprobs, loss_mask)


def finalize_soft_labels(out_dir: str | os.PathLike, world_size: int, fidelity: dict | None = None) -> dict:
    """`finalize` with the fidelity summary stored as meta["fidelity"]."""
    return finalize(out_dir, world_size, {"fidelity": fidelity or {}})


def soft_label_reader(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> ShardReader:
    """ShardReader of kind "soft_labels" (further arguments as ShardReader's after `kind`). Records: input_ids [L] int32, topk_ids [L, k] int32,
    topk_logprobs [L, k] float16, loss_mask [L] int32 (sets that have it), state. `expect`: e.g. {tokenizer_hash, vocab_size, k, temperature, seq_len}.
    """
    return ShardReader(out_dir, KIND, *args, **kwargs)
