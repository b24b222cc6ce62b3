"""Soft-label encodings (`soft_labels.encoding`): one class each in data_pipeline/encoding_registry.py,
and what every other part reads of them.

An encoding says what a soft-label record stores of the teacher's distribution per token, how it is
decoded for the loss, and what it costs: its parameters with their defaults and checks (which are the
config keys `soft_labels.<name>`, their help and the manifest meta keys), its arrays (the shard schema),
`encode`, `decode`, and the benchmark arms it is compared in. The config, the meta builders and the
writer (data_pipeline/soft_labels.py), the readers (`Decoded`, data_pipeline/online.py), the disk-space
preflight and benchmarks/soft_label_encodings.py all read `REGISTRY` through the functions here; adding
an encoding is one class in encoding_registry.py (CONTRIBUTING.md, Adding a soft-label encoding). The
base class and `Param` are in encoding_base.py.

Decoded batches (what the losses read, `decode`) take one of two forms, the ones objectives/kd.py
accepts: entries, `topk_ids` / `topk_logprobs` [B, L, k] (topk, topp; a topp position with fewer entries
padded with its own first id at log-prob −inf, which the losses treat as absent), compared on k + 1 bins
by every `distill.kind`; or samples, `sample_ids` [B, L, N] (padding: the first id, weight 0) and
`sample_weights` [B, L, N] float32, for kind fkl only.

The teacher side (the soft-label stage's writer, the online source) encodes without the whole [B, L, V]
logits: `encode_head` runs the teacher's head with a HeadLoss whose function encodes one chunk of rows at a
time, in the chunks `Encoding.encoder` names, which give `encode`'s bytes (docs/architecture.md, Soft labels).

The launching process reads the registry to check a config, without importing torch (~1.5 s): torch and
the modules that need it are imported inside the methods that compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from stablekd.data_pipeline.encoding_base import (
    LEGACY,
    LOGPROB_BITS,
    SHARED,
    Arrays,
    Encoding,
    Param,
    id_dtype,
)
from stablekd.data_pipeline.encoding_registry import DEFAULT, REGISTRY, K, TopK, register
from stablekd.data_pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from stablekd.objectives.lm import HeadLoss

__all__ = [  # the framework and registry names, importable from here
    "DEFAULT", "K", "LEGACY", "LOGPROB_BITS", "REGISTRY", "SHARED", "Arrays", "Encoding", "Param", "TopK",
    "id_dtype", "register",
]  # fmt: skip


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
    return "what a record stores per token (data_pipeline/encoding_registry.py): " + ", ".join(
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
        raise ConfigError(
            f"unknown soft-label parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
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


def encode_head(
    head: Callable[[HeadLoss], Any],
    shape: tuple[int, int],
    meta: Mapping[str, Any],
    seed: int = 0,
    observe: Callable[[torch.Tensor, slice], None] | None = None,
) -> dict[str, np.ndarray]:
    """What `encode` gives on a teacher's logits [B, L, V] of `shape` (B, L), byte for byte, without those
    logits: `head(head_loss)` runs the teacher with the HeadLoss given (``model(input_ids=...,
    head_loss=...)``, model/head.py), whose head makes the logits from the last hidden state one chunk of
    rows at a time, in the encoding's own chunks (`Encoding.encoder`: a record's positions in the runs
    `per_record` takes, flat runs for topk), inside the head module's forward (under ZeRO-3 its weight is
    gathered once, not per chunk); each chunk is encoded and dropped. The loss it sums is 0. `observe(logits,
    rows)` sees every chunk too (the stage's fidelity rows)."""
    from stablekd.objectives.lm import HeadLoss

    V = int(meta["vocab_size"])
    enc = of(meta).encoder(*shape, V, seed)

    def fn(z: torch.Tensor, rows: slice) -> torch.Tensor:
        if z.shape[-1] != V:
            raise ValueError(f"the teacher's head makes {z.shape[-1]} logits per position, the meta says {V}")
        enc.add(z, rows)
        return z.new_zeros(())

    head(HeadLoss(fn, observe=observe, slices=enc.slices))
    return enc.result()


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
