"""Candidate groups: per context, M continuations sampled from the teacher (+ optionally the gold one).

Same shard/manifest mechanics as the soft labels (shards/), kind "candidates". One record = one group,
G = m + (1 if meta["gold"] else 0) rows:

    context_ids  int32 [ctx_len]          LEFT-padded with id 0 (any id: padding is masked): the real
                                          context is context_ids[ctx_len - context_len:], so it always
                                          ends where the continuation starts (as for batched generate)
    context_len  int32 []                 1 <= context_len <= ctx_len
    cand_ids     int32 [G, max_new_tokens] RIGHT-padded with 0; row g is cand_ids[g, :cand_len[g]]
    cand_len     int32 [G]                1 <= cand_len <= max_new_tokens, counting the EOS if sampled
    reference    int32 []                 1: the gold row is a reference answer to the context (a task
                                          record's response, a bios question's truth; data_pipeline/
                                          contexts.py), what the contrastive stage labels the group by

With meta["gold"] the gold continuation is the last row (g = m), truncated to max_new_tokens.
A context longer than ctx_len keeps its last ctx_len tokens (`pack_groups`).

For teacher-forced scoring, `candidate_batch` lays each (context, continuation) pair out as
[pad ... context | continuation ... pad] of width ctx_len + max_new_tokens with matching masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stablekd.data_pipeline.epochs import EqualEpochs
from stablekd.data_pipeline.shards.format import CANDIDATES as KIND
from stablekd.data_pipeline.shards.format import ShardError
from stablekd.data_pipeline.shards.loader import ShardLoader
from stablekd.data_pipeline.shards.reader import ShardReader
from stablekd.data_pipeline.shards.writer import ShardWriter

PAD_ID = 0


def candidate_meta(
    teacher_checkpoint: str,
    tokenizer_hash: str,
    vocab_size: int,
    m: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    ctx_len: int,
    gold: bool = False,
) -> dict:
    """Manifest meta of a candidate-group set (sampling settings + the fixed record widths)."""
    if m < 1 or max_new_tokens < 1 or ctx_len < 1:
        raise ValueError(f"m, max_new_tokens, ctx_len must be >= 1, got {m}, {max_new_tokens}, {ctx_len}")
    if m + int(gold) < 2:
        raise ValueError("a group needs >= 2 continuations (m + gold) to have a positive pair")
    return {
        "teacher_checkpoint": str(teacher_checkpoint),
        "tokenizer_hash": str(tokenizer_hash),
        "vocab_size": int(vocab_size),
        "m": int(m),
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "ctx_len": int(ctx_len),
        "gold": bool(gold),
    }


def group_size(meta: dict) -> int:
    """Rows per group: m sampled + 1 gold if meta["gold"]."""
    return meta["m"] + int(meta["gold"])


def candidate_schema(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    G, T, C = group_size(meta), meta["max_new_tokens"], meta["ctx_len"]
    i32 = np.dtype(np.int32)
    return {
        "context_ids": (i32, (C,)),
        "context_len": (i32, ()),
        "cand_ids": (i32, (G, T)),
        "cand_len": (i32, (G,)),
        "reference": (i32, ()),
    }


def pack_groups(
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    ctx_len: int,
    max_new_tokens: int,
    references: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """Token lists -> padded record arrays [B, ...] (contexts left-padded, continuations right-padded).

    contexts[b] is a token list; continuations[b] is that context's G token lists; references[b] whether
    its last row is a reference answer (None: no group has one). Too-long contexts keep their last
    ctx_len tokens; too-long continuations their first max_new_tokens.
    """
    B = len(contexts)
    if len(continuations) != B:
        raise ValueError(f"{B} contexts but {len(continuations)} continuation groups")
    G = len(continuations[0]) if B else 0
    context_ids = np.full((B, ctx_len), PAD_ID, np.int32)
    context_len = np.zeros((B,), np.int32)
    cand_ids = np.full((B, G, max_new_tokens), PAD_ID, np.int32)
    cand_len = np.zeros((B, G), np.int32)
    for b, (ctx, group) in enumerate(zip(contexts, continuations, strict=True)):
        ctx = list(ctx)[-ctx_len:]
        context_len[b] = len(ctx)
        if ctx:
            context_ids[b, ctx_len - len(ctx) :] = ctx  # left padding
        if len(group) != G:
            raise ValueError(f"group {b} has {len(group)} continuations, group 0 has {G}")
        for g, cont in enumerate(group):
            cont = list(cont)[:max_new_tokens]
            cand_len[b, g] = len(cont)
            cand_ids[b, g, : len(cont)] = cont
    return {
        "context_ids": context_ids,
        "context_len": context_len,
        "cand_ids": cand_ids,
        "cand_len": cand_len,
        "reference": np.asarray(references if references is not None else [False] * B, np.int32),
    }


def trim_generated(
    new_tokens: torch.Tensor, eos_id: int, max_new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated tokens [N, T] (prompt removed) -> (cand_ids [N, max_new_tokens] int32, cand_len [N] int32).

    A continuation ends at its first EOS (kept); what `generate` put after it is replaced by pad 0.
    """
    x = new_tokens[:, :max_new_tokens].long()
    N, T = x.shape
    is_eos = x == eos_id
    # length = index of first EOS + 1, or T when there is none
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, torch.full((N,), T, device=x.device))
    keep = torch.arange(T, device=x.device)[None, :] < first[:, None]  # [N, T]
    out = torch.full((N, max_new_tokens), PAD_ID, dtype=torch.int32, device=x.device)
    out[:, :T] = torch.where(keep, x, PAD_ID).int()
    return out, first.int()


class CandidateWriter(ShardWriter):
    """ShardWriter with kind "candidates" and the schema fixed by the meta."""

    def __init__(
        self, out_dir: str | os.PathLike, rank: int, meta: dict, records_per_shard: int, world_size: int = 1
    ) -> None:
        super().__init__(
            out_dir, rank, KIND, meta, records_per_shard, world_size=world_size, schema=candidate_schema(meta)
        )

    def add_groups(
        self,
        context_ids: torch.Tensor | np.ndarray,
        context_len: torch.Tensor | np.ndarray,
        cand_ids: torch.Tensor | np.ndarray,
        cand_len: torch.Tensor | np.ndarray,
        reference: torch.Tensor | np.ndarray,
    ) -> None:
        """Check and buffer B groups: context_ids [B, ctx_len], context_len [B], cand_ids [B, G, max_new],
        cand_len [B, G], reference [B] (see the module docstring for padding); `pack_groups` builds them
        from lists."""
        C, T, V, G = (
            self.meta["ctx_len"],
            self.meta["max_new_tokens"],
            self.meta["vocab_size"],
            group_size(self.meta),
        )
        arrs = {
            k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in dict(
                context_ids=context_ids,
                context_len=context_len,
                cand_ids=cand_ids,
                cand_len=cand_len,
                reference=reference,
            ).items()
        }
        B = arrs["context_len"].shape[0] if arrs["context_len"].ndim == 1 else -1
        for name, shape in (
            ("context_ids", (B, C)),
            ("context_len", (B,)),
            ("cand_ids", (B, G, T)),
            ("cand_len", (B, G)),
            ("reference", (B,)),
        ):
            if arrs[name].shape != shape:
                raise ShardError(f"{self.path}: {name} has shape {arrs[name].shape}, expected {shape}")
        if B and not ((arrs["context_len"] >= 1) & (arrs["context_len"] <= C)).all():
            raise ShardError(f"{self.path}: context_len outside [1, ctx_len={C}]")
        if B and arrs["reference"].any() and not self.meta["gold"]:
            raise ShardError(f"{self.path}: a reference answer needs the gold row (meta gold=false)")
        if B and not ((arrs["cand_len"] >= 1) & (arrs["cand_len"] <= T)).all():
            raise ShardError(
                f"{self.path}: cand_len outside [1, max_new_tokens={T}] (an empty continuation has no mean)"
            )
        for name in ("context_ids", "cand_ids"):
            a = arrs[name]
            if a.size and (a.min() < 0 or a.max() >= V):
                raise ShardError(f"{self.path}: {name} outside [0, vocab_size={V})")
        self.add(**{k: a.astype(np.int32) for k, a in arrs.items()})


def candidate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Teacher-forced layout of a batch of groups, width W = ctx_len + max_new_tokens.

    Args:
        batch: context_ids [B, C], context_len [B], cand_ids [B, G, T], cand_len [B, G] (a ShardLoader batch).

    Returns (all [B, G, W]):
        input_ids: [pad .. context | continuation .. pad]
        attention_mask: 1 on context + continuation tokens
        position_ids: 0 at the first real token (left padding must not shift positions)
        cont_mask: True on continuation tokens (the tokens f(context, continuation) averages over)
        labels: input_ids on continuation tokens, -100 elsewhere (HF shifts them inside the model)
    """
    ctx, ctx_len = batch["context_ids"].long(), batch["context_len"].long()
    cand, cand_len = batch["cand_ids"].long(), batch["cand_len"].long()
    B, G, T = cand.shape
    C = ctx.shape[-1]
    input_ids = torch.cat([ctx[:, None, :].expand(B, G, C), cand], dim=-1)  # [B, G, C + T]
    pos = torch.arange(C + T, device=cand.device)  # [W]
    start = (C - ctx_len)[:, None, None]  # [B, 1, 1] first real context token
    end = C + cand_len[:, :, None]  # [B, G, 1] one past the last continuation token
    attention_mask = (pos >= start) & (pos < end)  # [B, G, W]
    cont_mask = (pos >= C) & (pos < end)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    labels = torch.where(cont_mask, input_ids, torch.full_like(input_ids, -100))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask.long(),
        "position_ids": position_ids,
        "cont_mask": cont_mask,
        "labels": labels,
    }


def candidate_reader(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> ShardReader:
    """ShardReader of kind "candidates" (further arguments as ShardReader's after `kind`); records hold the four arrays above (+ "state")."""
    return ShardReader(out_dir, KIND, *args, **kwargs)


def flat_candidates(batch: dict[str, torch.Tensor], first_group: int = 0) -> dict[str, torch.Tensor]:
    """`candidate_batch` of B groups flattened to B·G rows [B·G, W], plus `group_ids` [B·G] (first_group,
    first_group + 1, ...: make them unique across ranks to contrast a global batch)."""
    laid = candidate_batch(batch)
    B, G, W = laid["input_ids"].shape
    flat = {k: v.reshape(B * G, W) for k, v in laid.items()}  # [B, G, W] -> [B·G, W]
    flat["group_ids"] = torch.arange(first_group, first_group + B).repeat_interleave(G)  # [B·G]
    return flat


def training_groups(
    out_dir: str | os.PathLike,
    expect: dict,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
):
    """Candidate groups for a training stage: batches of `micro_batch_size` groups, endless epochs of the same
    length on every rank (data_pipeline/epochs.py), resumable (state_dict / load_state_dict)."""
    reader = candidate_reader(out_dir, expect, rank, world_size, num_workers)
    return EqualEpochs(ShardLoader(reader, micro_batch_size), str(out_dir))
