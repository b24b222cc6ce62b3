"""The soft-label encodings, one class each (`soft_labels.encoding`): add one here, decorated with
`@register`, and no other source file changes (CONTRIBUTING.md, Adding a soft-label encoding). The base
class and `Param` are in encoding_base.py; what the rest of the project calls, in encodings.py.
Registration order is the order of the config's keys and help.

Every record of L tokens stores `input_ids` (uint16 when the vocabulary fits, else int32) and `loss_mask`
(uint8), plus what its encoding stores:

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
  KL's gradient (`objectives.kd`, kind fkl only).

Log-probabilities (`topk_logprobs`, `entry_logprobs`) are float16, or with `soft_labels.logprob_bits=8`
one byte (data_pipeline/logprobs.py states the code and its error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stablekd.data_pipeline.encoding_base import (
    Arrays,
    ChunkEncoder,
    Encoding,
    Param,
    PositionChunks,
    RowChunks,
)
from stablekd.data_pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

REGISTRY: dict[str, type[Encoding]] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    """Add an encoding to the registry (class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


K = Param(
    "k", 32, "topk: ids and log-probs stored per token; topp: the most entries a token keeps",
    lambda v: v >= 1, "an integer >= 1",
)  # fmt: skip
MASS = Param(
    "mass", 0.9, "topp: a token's entries stop once they hold this much teacher probability",
    lambda v: 0.0 < v <= 1.0, "a value in (0, 1]",
)  # fmt: skip
MEAN_ENTRIES = Param(
    "mean_entries", 8,
    "topp: room per token, on average over a sequence (the least probable entries go first)",
    lambda v: v >= 1, "an integer >= 1",
)  # fmt: skip
DRAWS = Param(
    "draws", 8,
    "sampled: ids drawn per token (stored unique, with counts): 8 is 27 bytes/token; the default encoding, "
    "chosen from benchmarks/soft_label_encodings.py (docs/results.md: top-k is biased on real text)",
    lambda v: v >= 1, "an integer >= 1",
)  # fmt: skip
PROPOSAL_TEMPERATURE = Param(
    "proposal_temperature", 0.0,
    "sampled: draw from softmax(logits / this) and store importance weights; 0 = the teacher at T",
    lambda v: v >= 0, ">= 0 (0 = the teacher)",
)  # fmt: skip


@register
class TopK(Encoding):
    name = "topk"
    summary = "k ids + log-probs"
    params = (K,)
    arms = {
        "topk32": {"k": 32, "logprob_bits": 16},
        "topk32-8bit": {"k": 32, "logprob_bits": 8},
        "topk8-8bit": {"k": 8, "logprob_bits": 8},
    }

    @classmethod
    def check(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> None:
        if vocab_size is not None and params["k"] > vocab_size:
            raise ConfigError(
                f"k: expected at most vocab_size ({vocab_size}) ids per token, got {params['k']}"
            )

    def arrays(self) -> Arrays:
        shape = (self.seq_len, self.meta["k"])
        return {"topk_ids": (self.ids, shape), "topk_logprobs": (self.logprobs, shape)}

    def encode(self, logits: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        return self._store(self._rows(logits))

    def encoder(self, B: int, L: int, V: int, seed: int) -> ChunkEncoder:
        return RowChunks(B, L, V, self._rows, self._store)

    def _rows(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        from stablekd.data_pipeline.logprobs import compress

        ids, lp = compress(logits, self.meta["k"], self.meta["temperature"])  # in chunks of chunk_rows(V)
        return {"ids": ids, "lp": lp}

    def _store(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {"topk_ids": self.store_ids(out["ids"]), "topk_logprobs": self.store_logprobs(out["lp"])}

    def decode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lp = batch["topk_logprobs"]  # float16 stays (the loss widens it and reads its floor as −inf)
        return {
            "topk_ids": batch["topk_ids"],
            "topk_logprobs": self.load_logprobs(lp) if self.bits == 8 else lp,
        }


@register
class TopP(Encoding):
    name = "topp"
    summary = (
        "ids until their mass reaches soft_labels.mass, at most k, within mean_entries per token on average"
    )
    params = (K, MASS, MEAN_ENTRIES)
    arms = {"topp.95-8bit": {"k": 32, "mass": 0.95, "mean_entries": 8, "logprob_bits": 8}}

    @classmethod
    def check(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> None:
        if params["k"] > 255:  # a position's entry count is stored in one byte
            raise ConfigError(f"k: at most 255 with encoding {cls.name}, got {params['k']}")
        TopK.check(params, vocab_size)

    def arrays(self) -> Arrays:
        cap = self.seq_len * self.meta["mean_entries"]
        return {
            "entry_counts": (np.dtype(np.uint8), (self.seq_len,)),
            "entry_ids": (self.ids, (cap,)),
            "entry_logprobs": (self.logprobs, (cap,)),
        }

    def encode(self, logits: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        return self._store(self.per_record(logits, seed, self._rows, self._finish))

    def encoder(self, B: int, L: int, V: int, seed: int) -> ChunkEncoder:
        return PositionChunks(self, B, L, V, seed, self._rows, self._finish, self._store)

    def _rows(self, lp: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return dict(zip(("lp", "ids"), lp.topk(self.meta["k"], dim=-1), strict=True))

    def _finish(self, rec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cap = rec["lp"].shape[0] * self.meta["mean_entries"]  # the record's L positions
        return _topp(rec["lp"], rec["ids"], self.meta["mass"], cap)

    def _store(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {
            "entry_counts": out["entry_counts"].numpy(),
            "entry_ids": self.store_ids(out["entry_ids"]),
            "entry_logprobs": self.store_logprobs(out["entry_logprobs"]),
        }

    def decode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        counts = batch["entry_counts"].long()  # [B, L]
        k, B = self.meta["k"], counts.shape[0]
        start = counts.cumsum(-1) - counts  # [B, L] offset of each position's first entry
        j = torch.arange(k)
        idx = (start[..., None] + j).clamp(max=batch["entry_ids"].shape[1] - 1)  # [B, L, k]
        ids = batch["entry_ids"].long().gather(1, idx.reshape(B, -1)).reshape(idx.shape)
        lp = self.load_logprobs(batch["entry_logprobs"]).gather(1, idx.reshape(B, -1)).reshape(idx.shape)
        valid = j < counts[..., None]
        return {
            "topk_ids": torch.where(valid, ids, ids[..., :1]).to(torch.int32),
            "topk_logprobs": lp.masked_fill(~valid, -math.inf),
        }


def _topp(top_lp: torch.Tensor, top_ids: torch.Tensor, mass: float, cap: int) -> dict[str, torch.Tensor]:
    """One record: its k most probable log-probs and ids per position [L, k] (descending) -> entry_counts
    [L] uint8, entry_ids [cap], entry_logprobs [cap] (float32)."""
    import torch

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


@register
class Sampled(Encoding):
    name = "sampled"
    summary = "soft_labels.draws ids drawn from the teacher, with counts: unbiased, fkl only"
    params = (DRAWS, PROPOSAL_TEMPERATURE)
    kinds = ("fkl",)  # the weights estimate p at the drawn ids: an unbiased forward-KL gradient, nothing else
    truncates = False
    arms = {"sampled8": {"draws": 8}, "sampled12": {"draws": 12}}

    @classmethod
    def check(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> None:
        if params["draws"] > 255:  # counts are stored in one byte
            raise ConfigError(f"draws: at most 255 with encoding {cls.name}, got {params['draws']}")

    def arrays(self) -> Arrays:
        shape = (self.seq_len, self.meta["draws"])
        out = {"sample_ids": (self.ids, shape), "sample_counts": (np.dtype(np.uint8), shape)}
        if self.meta["proposal_temperature"] > 0:
            out["sample_logw"] = (np.dtype(np.float16), shape)
        return out

    def encode(self, logits: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        return self._store(self.per_record(logits, seed, self._rows))

    def encoder(self, B: int, L: int, V: int, seed: int) -> ChunkEncoder:
        return PositionChunks(self, B, L, V, seed, self._rows, lambda rec: rec, self._store)

    def _store(self, out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        from stablekd.data_pipeline.logprobs import half

        stored = {
            "sample_ids": self.store_ids(out["sample_ids"]),
            "sample_counts": out["sample_counts"].numpy(),
        }
        if "sample_logw" in out:
            stored["sample_logw"] = half(out["sample_logw"])
        return stored

    def _rows(self, lp: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Rows of a record: lp [n, V] teacher log-probs at T, x [n, V] logits -> their unique draws sorted
        by count, drawn with the record's generator `gen`."""
        import torch

        proposal_t = self.meta["proposal_temperature"]
        lq = lp if proposal_t <= 0 else (x / proposal_t).log_softmax(-1)
        drawn = torch.multinomial(lq.exp(), self.meta["draws"], replacement=True, generator=gen)  # [n, N]
        srt = drawn.sort(-1).values
        new = torch.ones_like(srt, dtype=torch.bool)
        new[:, 1:] = srt[:, 1:] != srt[:, :-1]
        slot = new.long().cumsum(-1) - 1  # [n, N]: which unique id each draw is
        counts = torch.zeros_like(srt).scatter_add_(1, slot, torch.ones_like(srt))
        ids = torch.zeros_like(srt).scatter_(1, slot, srt)
        counts, order = counts.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        ids = torch.where(counts > 0, ids, ids[:, :1])  # padding: the row's first id, count 0
        out = {"sample_ids": ids, "sample_counts": counts.to(torch.uint8)}
        if proposal_t > 0:
            out["sample_logw"] = (lp.gather(1, ids) - lq.gather(1, ids)).masked_fill(counts == 0, 0.0)
        return out

    def decode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = batch["sample_counts"].float() / self.meta["draws"]
        if "sample_logw" in batch:
            w = w * batch["sample_logw"].float().exp()
        return {"sample_ids": batch["sample_ids"], "sample_weights": w}


DEFAULT = Sampled.name  # soft_labels.encoding's default
