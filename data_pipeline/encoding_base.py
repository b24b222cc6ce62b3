"""The framework of the soft-label encodings: a parameter (`Param`), the base class (`Encoding`) with the
helpers encodings share, the storage dtype of ids, and what a meta written before a key existed means.
The encodings themselves are in encoding_registry.py; the functions everything else calls, in
encodings.py.

Imported by the launching process to check a config: torch is imported inside the methods that compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
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
    # The distill.kind values its decoded form allows; None: every kind.
    kinds: ClassVar[tuple[str, ...] | None] = None
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

    def encoder(self, B: int, L: int, V: int, seed: int) -> ChunkEncoder:
        """What `encode` gives for B records of L positions over V ids, from their logits taken one chunk of
        rows at a time (the teacher side, `encodings.encode_head`). By default whole records: as many as
        fit chunk_rows(V) rows, at least one, each group through `encode` with the seed of its first record
        (the same arrays by the contract above); an encoding that goes through `per_record` returns
        `PositionChunks`, whose chunks are per_record's own."""
        return RecordChunks(self, B, L, V, seed)

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
        generator is seeded `seed + b`, so what it draws depends neither on batching nor on resumes.
        `PositionChunks` does the same from logits fed one of these chunks at a time."""
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


# ------------------------------------------------------------------- encoding logits fed chunk by chunk


class ChunkEncoder:
    """An encoding of B records of L positions computed from their logits one chunk at a time: `slices`
    are the chunks, rows of the flattened [B·L, V] logits, that `add` must be given in that order (as the
    model's head hands them to a HeadLoss, model/head.py); `result()` is then what `encode` gives on the
    whole [B, L, V] logits, byte for byte, without them ever existing."""

    slices: list[slice]

    def add(self, x: torch.Tensor, rows: slice) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, np.ndarray]:
        raise NotImplementedError


class RecordChunks(ChunkEncoder):
    """Groups of whole records through `encode`, each with the seed of its first record: the fallback for
    an encoding that only has `encode` (largest chunk: one record's [L, V] when that is over the budget)."""

    def __init__(self, enc: Encoding, B: int, L: int, V: int, seed: int) -> None:
        from stablekd.objectives.lm import chunk_rows

        g = max(1, chunk_rows(V) // max(1, L))  # records per chunk
        self.enc, self.L, self.V, self.seed, self.parts = enc, L, V, seed, []
        self.slices = [slice(b * L, min(b + g, B) * L) for b in range(0, B, g)]

    def add(self, x: torch.Tensor, rows: slice) -> None:
        x = x.reshape(-1, self.L, self.V)
        self.parts.append(self.enc.encode(x, self.seed + rows.start // self.L))

    def result(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate([p[key] for p in self.parts]) for key in self.parts[0]}


class RowChunks(ChunkEncoder):
    """An encoding whose every position is encoded on its own, without drawing (topk): flat chunks of
    chunk_rows(V) rows across records, `rows(x [n, V]) -> {name: [n, ...]}` each, concatenated and shaped
    [B, L, ...] on the logits' device, then `store` (the encoding's casts to the storage dtypes)."""

    def __init__(self, B: int, L: int, V: int, rows: Callable, store: Callable) -> None:
        from stablekd.objectives.lm import chunk_rows

        n = chunk_rows(V)
        self.B, self.L, self.rows, self.store, self.parts = B, L, rows, store, []
        self.slices = [slice(s, min(s + n, B * L)) for s in range(0, B * L, n)]

    def add(self, x: torch.Tensor, rows: slice) -> None:
        self.parts.append(self.rows(x))

    def result(self) -> dict[str, np.ndarray]:
        import torch

        out = {}
        for key in self.parts[0]:
            a = torch.cat([p[key] for p in self.parts])
            out[key] = a.reshape(self.B, self.L, *a.shape[1:])
        return self.store(out)


class PositionChunks(ChunkEncoder):
    """`Encoding.per_record` fed chunk by chunk: a record's positions in runs of chunk_rows(V) from its
    first, record after record, so each call of `rows` sees the rows it sees in per_record and record b's
    generator (seeded `seed + b`) is drawn from in the same order; `store` applied to the stacked result."""

    def __init__(
        self,
        enc: Encoding,
        B: int,
        L: int,
        V: int,
        seed: int,
        rows: Callable,
        finish: Callable,
        store: Callable,
    ) -> None:
        from stablekd.objectives.lm import chunk_rows

        n = chunk_rows(V)
        self.enc, self.L, self.seed, self.rows, self.finish, self.store = enc, L, seed, rows, finish, store
        self.slices = [slice(b * L + s, b * L + min(s + n, L)) for b in range(B) for s in range(0, L, n)]
        self.recs: list[dict] = []
        self.parts: list[dict] = []
        self.gen = None

    def add(self, x: torch.Tensor, rows: slice) -> None:
        import torch

        b, start = divmod(rows.start, self.L)
        if start == 0:
            self.gen = torch.Generator(device=x.device).manual_seed(self.seed + b)
            self.parts = []
        x = x.detach().float()  # [n, V]
        self.parts.append(self.rows((x / self.enc.meta["temperature"]).log_softmax(-1), x, self.gen))
        if rows.stop == (b + 1) * self.L:
            self.recs.append(
                self.finish({key: torch.cat([p[key] for p in self.parts]) for key in self.parts[0]})
            )

    def result(self) -> dict[str, np.ndarray]:
        import torch

        return self.store({key: torch.stack([r[key] for r in self.recs]).cpu() for key in self.recs[0]})
