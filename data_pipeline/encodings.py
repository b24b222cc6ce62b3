"""Soft-label encodings (`soft_labels.encoding`): one class each, and the registry every other part reads.

An encoding says what a soft-label record stores of the teacher's distribution per token, how it is
decoded for the loss, and what it costs: its parameters with their defaults and checks (which are the
config keys `soft_labels.<name>`, their help and the manifest meta keys), its arrays (the shard schema),
`encode`, `decode`, and the benchmark arms it is compared in. The config, the meta builders and the
writer (data_pipeline/soft_labels.py), the readers (`Decoded`, data_pipeline/online.py), the disk-space
preflight and benchmarks/soft_label_encodings.py all read `REGISTRY`; adding an encoding is one class here
(CONTRIBUTING.md, Adding a soft-label encoding).

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
  KL's gradient (`objectives.distill`, kind fkl only).

Log-probabilities (`topk_logprobs`, `entry_logprobs`) are float16, or with `soft_labels.logprob_bits=8`
one byte (data_pipeline/logprobs.py states the code and its error). Ids take the fewest whole bytes the
vocabulary allows (uint16 up to 65,536 ids, else int32); no bit packing below a byte.

Decoded batches (what the losses read, `decode`) take one of two forms, the ones objectives/distill.py
accepts: entries, `topk_ids` / `topk_logprobs` [B, L, k] (topk, topp; a topp position with fewer entries
padded with its own first id at log-prob −inf, which the losses treat as absent), compared on k + 1 bins
by every `distill.kind`; or samples, `sample_ids` [B, L, N] (padding: the first id, weight 0) and
`sample_weights` [B, L, N] float32, for kind fkl only.

The launching process reads this registry to check a config, without importing torch (~1.5 s): torch and
the modules that need it are imported inside the methods that compute.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from stablekd.data_pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

_UINT16_VOCAB = 65536
Arrays = dict[str, tuple[np.dtype, tuple[int, ...]]]  # {array: (storage dtype, per-record shape)}


def id_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype of token ids: uint16 when every id (0 .. vocab_size-1) fits, else int32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= _UINT16_VOCAB else np.dtype(np.int32)


@dataclass(frozen=True)
class Param:
    """A parameter of one or more encodings: its manifest meta key and its config key soft_labels.<name>,
    with the config's default and help. `valid` is its own range, checked whatever the encoding;
    `expected` says that range in the error."""

    name: str
    default: int | float
    help: str
    valid: Callable[[Any], bool]
    expected: str

    def check(self, value: Any) -> None:
        if not self.valid(value):
            raise ConfigError(f"{self.name}: expected {self.expected}, got {value}")


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
# In every meta, whatever the encoding (sets written so far carry it, sampled ones too).
LOGPROB_BITS = Param(
    "logprob_bits", 8, "8 (one byte: round(255·sqrt(p)), data_pipeline/logprobs.py) or 16 (float16) per log-prob",
    lambda v: v in (8, 16), "8 or 16",
)  # fmt: skip
SHARED = (LOGPROB_BITS,)

# What a meta written before a key existed means, so such sets keep reading: no "encoding" is topk (and its
# input_ids are int32), no "logprob_bits" float16, no "loss_mask" every token learned.
LEGACY = {"encoding": "topk", "logprob_bits": 16}


class Encoding(ABC):
    """One encoding, bound to a soft-label meta (its shared keys: seq_len, temperature, vocab_size when
    storing, logprob_bits; and this encoding's `params`). Subclasses set the class attributes, implement
    `arrays`, `encode` and `decode`, may add to `check`, and are decorated with `@register`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # what it stores, for the help of soft_labels.encoding
    params: ClassVar[tuple[Param, ...]] = ()  # its meta keys besides the shared ones
    kinds: ClassVar[tuple[str, ...] | None] = (
        None  # the distill.kind values its decoded form allows; None: all
    )
    # The stored entries are the most probable ids with the rest of the mass dropped: the student learns a
    # biased tail, and the stage warns when they keep little of the teacher's mass.
    truncates: ClassVar[bool] = True
    arms: ClassVar[dict[str, dict[str, Any]]] = {}  # benchmark arm name -> its parameters

    def __init__(self, meta: Mapping[str, Any]) -> None:
        self.meta = meta
        self.seq_len: int = meta["seq_len"]
        self.bits: int = meta.get("logprob_bits", LEGACY["logprob_bits"])

    @classmethod
    def check(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> None:
        """Refuse (ConfigError naming the key) parameter values this encoding cannot store, beyond each
        Param's own range; `vocab_size` when known. By default there are none."""
        return None

    @abstractmethod
    def arrays(self) -> Arrays:
        """The arrays a record stores besides input_ids and loss_mask."""

    @abstractmethod
    def encode(self, logits: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        """Teacher logits [B, L, V] -> `arrays()` for B records, as numpy in their storage dtypes.
        Record b draws, if at all, with a generator seeded `seed + b` (`per_record`)."""

    @abstractmethod
    def decode(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored arrays of a batch (as a ShardLoader gives them: ids and codes widened to int32) -> one of
        the decoded forms (module docstring)."""

    # ------------------------------------------------------------------- helpers for the subclasses

    @property
    def ids(self) -> np.dtype:
        return id_dtype(self.meta["vocab_size"])

    @property
    def logprobs(self) -> np.dtype:
        return np.dtype(np.uint8) if self.bits == 8 else np.dtype(np.float16)

    def store_ids(self, ids: torch.Tensor) -> np.ndarray:
        return ids.cpu().long().numpy().astype(self.ids)

    def store_logprobs(self, lp: torch.Tensor) -> np.ndarray:
        from stablekd.data_pipeline.logprobs import store_logprobs

        return store_logprobs(lp, self.bits)

    def load_logprobs(self, stored: torch.Tensor) -> torch.Tensor:
        from stablekd.data_pipeline.logprobs import load_logprobs

        return load_logprobs(stored, self.bits)

    def per_record(
        self,
        logits: torch.Tensor,
        seed: int,
        rows: Callable[[torch.Tensor, torch.Tensor, torch.Generator], dict[str, torch.Tensor]],
        finish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda rec: rec,
    ) -> dict[str, torch.Tensor]:
        """One record of logits [B, L, V] at a time, in chunks of its positions (`chunk_rows`), so a chunk's
        [n, V] float32 log-probs are the only full-vocabulary temporaries at any vocabulary and length:
        `rows(log_softmax(x / T), x, generator)` per chunk x [n, V] (float32), the chunks' results
        concatenated, `finish` applied to the record's; stacked over records, on the host. Record b's
        generator is seeded `seed + b`, so what it draws depends neither on batching nor on resumes."""
        import torch

        from stablekd.objectives.lm import chunk_rows

        T, recs = self.meta["temperature"], []
        for b in range(logits.shape[0]):
            gen = torch.Generator(device=logits.device).manual_seed(seed + b)
            parts = []
            for x in logits[b].detach().split(chunk_rows(logits.shape[-1])):
                x = x.float()  # [n, V]
                parts.append(rows((x / T).log_softmax(-1), x, gen))
            recs.append(finish({key: torch.cat([part[key] for part in parts]) for key in parts[0]}))
        return {key: torch.stack([r[key] for r in recs]).cpu() for key in recs[0]}


REGISTRY: dict[str, type[Encoding]] = {}


def register(cls: type[Encoding]) -> type[Encoding]:
    """Add an encoding to the registry (class decorator); the order of registration is the order of the
    config's keys and help."""
    REGISTRY[cls.name] = cls
    return cls


# --------------------------------------------------------------------------------------------- encodings


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
        from stablekd.data_pipeline.logprobs import compress

        ids, lp = compress(logits, self.meta["k"], self.meta["temperature"])
        return {"topk_ids": self.store_ids(ids), "topk_logprobs": self.store_logprobs(lp)}

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
        k, mass, cap = self.meta["k"], self.meta["mass"], logits.shape[1] * self.meta["mean_entries"]
        out = self.per_record(
            logits, seed, lambda lp, x, gen: dict(zip(("lp", "ids"), lp.topk(k, dim=-1), strict=True)),
            lambda rec: _topp(rec["lp"], rec["ids"], mass, cap),
        )  # fmt: skip
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
        from stablekd.data_pipeline.logprobs import half

        out = self.per_record(logits, seed, self._rows)
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


# ------------------------------------------------------------------------------- what the others read


def get(name: str) -> type[Encoding]:
    """The registered encoding called `name`; a ConfigError naming the choices otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"encoding: expected one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def parameters() -> list[Param]:
    """Every encoding's parameters, then the shared ones, each once, in registry order: the config keys
    soft_labels.<name> besides soft_labels.encoding."""
    out: dict[str, Param] = {}
    for cls in REGISTRY.values():
        out.update({p.name: p for p in cls.params if p.name not in out})
    return [*out.values(), *SHARED]


def describe() -> str:
    """The help of soft_labels.encoding."""
    return "what a record stores per token (data_pipeline/encodings.py): " + ", ".join(
        f"{cls.name} ({cls.summary})" for cls in REGISTRY.values()
    )


def settings(section: Any) -> dict[str, Any]:
    """The parameter values of a config's soft_labels section (launcher.config.SoftLabelsConfig)."""
    return {p.name: getattr(section, p.name) for p in parameters()}


def check(encoding: str, values: Mapping[str, Any], vocab_size: int | None = None) -> type[Encoding]:
    """The encoding, once the parameters among `values` are in range and `encoding` can store them (a
    ConfigError naming the key otherwise); `vocab_size` when known."""
    cls = get(encoding)
    for p in parameters():
        if p.name in values:
            p.check(values[p.name])
    cls.check(values, vocab_size)
    return cls


def meta_params(encoding: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The meta keys an encoding fixes: its name, the shared parameters and its own, from `values` (any
    parameter of any encoding; the encoding's defaults for those left out), as their types."""
    known = {p.name for p in parameters()}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"unknown soft-label parameter(s) {', '.join(unknown)} (known: {', '.join(known)})")
    own = [*SHARED, *get(encoding).params]
    return {"encoding": encoding, **{p.name: type(p.default)(values.get(p.name, p.default)) for p in own}}


def of(meta: Mapping[str, Any]) -> Encoding:
    """The encoding of a soft-label meta, bound to it."""
    name = meta.get("encoding", LEGACY["encoding"])
    if name not in REGISTRY:
        raise ValueError(
            f"soft-label meta: unknown encoding {name!r} (expected one of {', '.join(REGISTRY)})"
        )
    return REGISTRY[name](meta)


def schema(meta: Mapping[str, Any]) -> Arrays:
    """{array: (storage dtype, per-record shape)} of a soft-label meta: input_ids, loss_mask when the meta
    says so, and the encoding's arrays."""
    L = meta["seq_len"]
    ids = id_dtype(meta["vocab_size"]) if "encoding" in meta else np.dtype(np.int32)  # LEGACY
    out = {"input_ids": (ids, (L,))}
    if meta.get("loss_mask"):
        out["loss_mask"] = (np.dtype(np.uint8), (L,))
    return {**out, **of(meta).arrays()}


def record_bytes(meta: Mapping[str, Any]) -> int:
    """Array bytes one record stores (no file headers): ÷ seq_len, the encoding's bytes per token."""
    return sum(dt.itemsize * math.prod(shape) for dt, shape in schema(meta).values())


def encode(logits: torch.Tensor, meta: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Teacher logits [B, L, V] -> the encoding's arrays for B records (input_ids, loss_mask excluded),
    computed on the logits' device; only the results move to the host. Record b draws (sampled) with a
    generator seeded `seed + b`: a writer passes its seed of the first record's index, so a record's draws
    do not depend on batching or resumes."""
    return of(meta).encode(logits, seed)


def decode(batch: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A batch of stored arrays (as a ShardLoader gives them: ids widened to int32) -> what the losses
    read: input_ids, loss_mask (when stored) and the encoding's decoded form."""
    out = {k: batch[k] for k in ("input_ids", "loss_mask") if k in batch}
    return {**out, **of(meta).decode(batch)}


class Decoded:
    """A soft-label batch source (ShardLoader, EqualEpochs) whose batches come out decoded (`decode`)."""

    def __init__(self, batches: Any, meta: Mapping[str, Any]) -> None:
        self.batches, self.meta = batches, meta

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield decode(batch, self.meta)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
