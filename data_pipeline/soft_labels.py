"""The soft-label shard format: manifest meta, the writer and the reader (docs/architecture.md, Soft labels).

One record = one training sequence of `seq_len` tokens: `input_ids` (uint16 when the vocabulary fits, else
int32), `loss_mask` (uint8: 1 where the token is learned, 0 where it is context, the prompt of a task
record, data_pipeline/tasks.py) and what the encoding stores of the teacher's distribution at
temperature T (`soft_labels.encoding`, one of the registry in data_pipeline/encodings.py). The manifest
meta names the encoding and its parameters; a set written before encodings existed (meta without
"encoding") is read as topk with int32 input_ids, and one without "loss_mask" as every token learned.
Readers widen stored ids and codes to int32 (ShardReader).

Stage code, per writer rank (the mechanics are in shards/):

    meta = soft_label_meta(ckpt_id, tok_hash, vocab_size, T, L, encoding, **its params)
    w = SoftLabelWriter(out_dir, rank, meta, records_per_shard=256, world_size=world, seed=seed)
    for input_ids, labels in sequences[w.records_written:]:     # resume: skip what is committed
        w.add_teacher(teacher, input_ids, labels != -100)    # the head encodes chunk by chunk
    w.close()
    barrier()
    if rank == 0: finalize_soft_labels(out_dir, world, fidelity_summary)

and a consumer: `Decoded(ShardLoader(soft_label_reader(out_dir, expect, rank, world, workers), micro_bs), meta)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stablekd.data_pipeline import encodings
from stablekd.data_pipeline.align import TOKEN_BYTES_FILE
from stablekd.data_pipeline.shards.format import SOFT_LABELS as KIND
from stablekd.data_pipeline.shards.format import ShardError, rank_manifest_name
from stablekd.data_pipeline.shards.manifest import finalize
from stablekd.data_pipeline.shards.writer import ShardWriter

if TYPE_CHECKING:  # torch (~1.6 s to import) only where tensors are made: the launching process reads metas
    import torch

    from stablekd.data_pipeline.shards.reader import ShardReader

FIDELITY_RATE = (
    8  # the stage's fidelity record samples one position in 8 of each batch until its budget is spent
)


def soft_label_meta(
    teacher_checkpoint: str,
    tokenizer_hash: str,
    vocab_size: int,
    temperature: float,
    seq_len: int,
    encoding: str = encodings.DEFAULT,
    **params: Any,
) -> dict:
    """Manifest meta of a soft-label set: the shared keys and the encoding's own (data_pipeline/encodings.py),
    `params` its parameters (those left out take the config's defaults; those of other encodings are
    dropped); readers check any subset of it against their config (`encoding_meta`)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    own = encodings.meta_params(encoding, params)
    encodings.check(encoding, own, vocab_size)
    return {
        "teacher_checkpoint": str(teacher_checkpoint),
        "tokenizer_hash": str(tokenizer_hash),
        "vocab_size": int(vocab_size),
        "temperature": float(temperature),
        "seq_len": int(seq_len),
        "loss_mask": True,
        "token_bytes": TOKEN_BYTES_FILE,  # each id's bytes, beside the shards: the records' text (align.py)
        **own,
    }


def config_meta(sl: Any, teacher_checkpoint: str, tokenizer_hash: str, vocab_size: int, seq_len: int) -> dict:
    """`soft_label_meta` of a run's soft_labels section (launcher.config.SoftLabelsConfig)."""
    return soft_label_meta(
        teacher_checkpoint, tokenizer_hash, vocab_size, sl.temperature, seq_len, sl.encoding,
        **encodings.settings(sl),
    )  # fmt: skip


def encoding_meta(sl: Any, seq_len: int) -> dict:
    """The meta keys a run's soft_labels section fixes (what a reader expects of a manifest)."""
    return {
        "temperature": float(sl.temperature),
        "seq_len": int(seq_len),
        **encodings.meta_params(sl.encoding, encodings.settings(sl)),
    }


def soft_label_schema(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{array name: (storage dtype, per-record shape)} for a soft-label meta."""
    return encodings.schema(meta)


# ------------------------------------------------------------------------------------------ the format


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # a tensor, or array-like


class SoftLabelWriter(ShardWriter):
    """ShardWriter with kind "soft_labels" and the schema fixed by the meta (its encoding, encodings.py).

    `seed` fixes the `sampled` encoding's draws: record i of this rank is drawn with `seed_of(i)`, so a
    resumed writer stores what an uninterrupted one would, however the records were batched.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        meta: dict,
        records_per_shard: int,
        world_size: int = 1,
        seed: int = 0,
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
        self.seed = seed
        self.records_added = self.records_written  # committed + buffered: the next record's index

    def seed_of(self, record: int) -> int:
        return self.seed * 1_000_003 + self.rank * 100_003 + record

    def _add(self, input_ids: Any, loss_mask: Any, arrays: dict[str, np.ndarray]) -> None:
        L, V = self.meta["seq_len"], self.meta["vocab_size"]
        ids = _np(input_ids)
        B = ids.shape[0] if ids.ndim else -1
        mask = np.ones((B, L), np.uint8) if loss_mask is None else _np(loss_mask)
        for name, a in (("input_ids", ids), ("loss_mask", mask)):
            if a.shape != (B, L):
                raise ShardError(f"{self.path}: {name} has shape {a.shape}, expected {(B, L)} (B, seq_len)")
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ShardError(f"{self.path}: input_ids outside [0, vocab_size={V})")
        dtype = soft_label_schema(self.meta)["input_ids"][0]
        mask_arrays = {"loss_mask": (mask != 0).astype(np.uint8)} if self.meta.get("loss_mask") else {}
        self.add(input_ids=ids.astype(dtype), **mask_arrays, **arrays)
        self.records_added += B

    def add_batch(
        self,
        input_ids: torch.Tensor | np.ndarray,
        topk_ids: torch.Tensor | np.ndarray,
        topk_logprobs: torch.Tensor | np.ndarray,
        loss_mask: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Buffer B records of the topk encoding from their values: input_ids [B, L], topk_ids [B, L, k],
        topk_logprobs [B, L, k] (-inf allowed), loss_mask [B, L] (truthy = learned; None = every token)."""
        if not isinstance(encodings.of(self.meta), encodings.TopK):
            raise ShardError(
                f"{self.path}: add_batch takes top-k values; this set is {self.meta['encoding']}"
            )
        import torch

        L, k, V = self.meta["seq_len"], self.meta["k"], self.meta["vocab_size"]
        tids, tlp = _np(topk_ids), torch.as_tensor(_np(topk_logprobs))
        B = _np(input_ids).shape[0] if _np(input_ids).ndim else -1
        for name, shape in (("topk_ids", tids.shape), ("topk_logprobs", tuple(tlp.shape))):
            if shape != (B, L, k):
                raise ShardError(
                    f"{self.path}: {name} has shape {shape}, expected {(B, L, k)} (B, seq_len, k)"
                )
        if tids.size and (tids.min() < 0 or tids.max() >= V):
            raise ShardError(f"{self.path}: topk_ids outside [0, vocab_size={V})")
        topk = encodings.of(self.meta)
        self._add(
            input_ids,
            loss_mask,
            {"topk_ids": tids.astype(topk.ids), "topk_logprobs": topk.store_logprobs(tlp)},
        )

    def add_logits(
        self,
        input_ids: torch.Tensor | np.ndarray,
        logits: torch.Tensor,
        loss_mask: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Encode teacher logits [B, L, V] as the meta says (encodings.encode) and buffer the B records."""
        self._add(input_ids, loss_mask, encodings.encode(logits, self.meta, self.seed_of(self.records_added)))

    def add_teacher(
        self,
        teacher: Any,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor | np.ndarray | None = None,
        observe: Callable[[torch.Tensor, slice], None] | None = None,
    ) -> None:
        """What `add_logits` buffers for the teacher's logits of input_ids [B, L], without them: the teacher's
        head (`teacher.head(input_ids, head_loss)`, data_pipeline/online.py's Teacher) makes them one chunk
        of rows at a time and each chunk is encoded and dropped (encodings.encode_head): the bytes add_logits
        stores from logits of the values the head made. `observe(logits, rows)` sees each chunk too."""
        import torch

        seed = self.seed_of(self.records_added)
        with torch.no_grad():
            arrays = encodings.encode_head(
                partial(teacher.head, input_ids), tuple(input_ids.shape), self.meta, seed, observe
            )
        self._add(input_ids, loss_mask, arrays)


def finalize_soft_labels(out_dir: str | os.PathLike, world_size: int, fidelity: dict | None = None) -> dict:
    """`finalize` with the fidelity summary and the bytes per token on disk (shards / tokens) in its meta."""
    ranks = [json.loads((Path(out_dir) / rank_manifest_name(r)).read_text()) for r in range(world_size)]
    tokens = sum(m["records"] * m["meta"]["seq_len"] for m in ranks)
    size = sum(s["bytes"] for m in ranks for s in m["shards"])
    return finalize(
        out_dir, world_size, {"fidelity": fidelity or {}, "bytes_per_token": size / max(1, tokens)}
    )


def soft_label_reader(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> ShardReader:
    """ShardReader of kind "soft_labels" (further arguments as ShardReader's after `kind`). Records hold
    the stored arrays (ids and codes widened to int32, encodings.py) and state; `encodings.Decoded` turns
    batches of them into what the losses read. `expect`: e.g. `encoding_meta(cfg.soft_labels, seq_len)`
    plus tokenizer_hash and vocab_size.
    """
    from stablekd.data_pipeline.shards.reader import ShardReader

    return ShardReader(out_dir, KIND, *args, **kwargs)
