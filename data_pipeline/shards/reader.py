"""ShardReader: the records of one consumer stream (rank, dataloader worker), in the global shard order,
resumable at (shard, record), in follow mode while the writers still write.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stnp
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stablekd.data_pipeline.shards.format import (
    _RANK_MANIFEST_RE,
    FINAL_MANIFEST,
    ShardError,
    _jsonable,
    _read_json,
    _schema_of,
    _sha256,
    rank_manifest_name,
)
from stablekd.data_pipeline.shards.manifest import _check_manifest, _first_unsettled, _ordered_prefix


@dataclass
class _View:
    shards: list[dict]  # known shards in global order (a prefix of the final list)
    complete: bool  # True once manifest.json is final: `shards` is everything
    schema: dict | None = None  # {name: {dtype, shape}} the writers declared (None before any record)
    signature: tuple = field(default=())  # changes whenever anything new is committed (follow timeout)
    awaited: str | None = None  # follow mode: the uncommitted shard file the known prefix stops at


def widen(a: np.ndarray) -> np.ndarray:
    # torch has little support for unsigned 16/32-bit ints (no stack/gather on CUDA); int32 holds
    # every uint16 id losslessly, and ids > 65535 are stored as int32 already.
    if a.dtype == np.uint16 or a.dtype == np.uint8:
        return a.astype(np.int32)
    if a.dtype == np.uint32:
        return a.astype(np.int64)
    return a


class ShardReader(IterableDataset):
    """Streams the records of a shard directory, one dict of tensors per record.

    Each record is {name: tensor of its per-record shape, "state": {"worker", "shard", "record"}}, where
    state is this stream's position *after* the record (next shard ordinal, next record in it): feed it
    back through `load_state_dict` (ShardLoader does) to continue exactly. Unsigned id arrays arrive as
    int32 (uint16 storage) so torch can stack them; other dtypes are as stored (log-probs float16).

    Assignment: see the module docstring (ordinal j goes to stream j % C, C = world_size * max(num_workers,
    1), stream = rank * max(num_workers, 1) + worker). `num_workers` must equal the DataLoader's.

    Every shard is verified when opened (size, sha256, safetensors parse, array schema, record count);
    damage raises ShardError naming the file; nothing is skipped silently.

    Args:
        out_dir: the directory the writers wrote.
        kind: expected format name.
        expect: meta values the consumer requires, e.g. {"tokenizer_hash": h, "k": 32, "temperature": 2.0};
            a mismatch raises ShardError naming the key and both values.
        rank, world_size: this consumer's data-parallel position.
        num_workers: DataLoader workers per rank (0 = read in the main process).
        follow: read while writers are still running; stop when manifest.json is final and every shard
            of this stream has been read.
        poll_s: follow-mode polling interval.
        timeout_s: follow mode: ShardError if nothing new is committed for this long (None = wait forever).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        kind: str,
        expect: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        follow: bool = False,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ShardError(f"reader rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise ShardError(f"num_workers must be >= 0, got {num_workers}")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.expect = _jsonable(expect or {}, "expect")
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.follow, self.poll_s, self.timeout_s = follow, poll_s, timeout_s
        self.workers = max(num_workers, 1)
        self.streams = world_size * self.workers  # C
        self._positions = self._start_positions()
        self._next_worker = 0  # the stream worker due first when iteration starts (resume keeps the order)
        # Fail at construction, not inside a DataLoader worker: mismatches and a missing final manifest.
        self._view()

    # -- positions
    def stream_id(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def _start_positions(self) -> list[list[int]]:
        return [[self.stream_id(w), 0] for w in range(self.workers)]

    def state_dict(self) -> dict:
        """The positions this reader will start from on the next iteration (ShardLoader tracks progress)."""
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "rank": self.rank,
            "positions": [list(p) for p in self._positions],
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Start the next iteration from `state` (as ShardLoader.state_dict()); None = from the start."""
        if state is None:
            self._positions = self._start_positions()
            self._next_worker = 0
            return
        for key, mine in (
            ("world_size", self.world_size),
            ("num_workers", self.num_workers),
            ("rank", self.rank),
        ):
            if state.get(key) != mine:
                raise ShardError(
                    f"{self.out_dir}: reader state has {key}={state.get(key)!r} but this reader has {key}={mine!r}; "
                    "positions are per stream and cannot be remapped"
                )
        positions = [list(map(int, p)) for p in state["positions"]]
        if len(positions) != self.workers:
            raise ShardError(f"reader state has {len(positions)} worker positions, expected {self.workers}")
        for w, (j, r) in enumerate(positions):
            if j % self.streams != self.stream_id(w) or r < 0:
                raise ShardError(
                    f"reader state position {(j, r)} does not belong to stream {self.stream_id(w)}"
                )
        self._positions = positions
        self._next_worker = int(state.get("next_worker", 0)) % self.workers

    # -- what is on disk
    def _view(self) -> _View:
        final_path = self.out_dir / FINAL_MANIFEST
        if final_path.exists():
            m = _read_json(final_path)
            _check_manifest(m, final_path, self.kind, self.expect)
            if m.get("final"):
                return _View(list(m["shards"]), True, m.get("schema"), ("final",))
        if not self.follow:
            raise ShardError(
                f"{final_path}: missing (writing not finalized; read with follow=True while it runs)"
            )
        ranks: dict[int, dict] = {}
        for p in self.out_dir.glob("manifest.r*.json"):
            mt = _RANK_MANIFEST_RE.match(p.name)
            if not mt:
                continue
            try:
                m = _read_json(p)
            except FileNotFoundError:
                continue
            _check_manifest(m, p, self.kind, self.expect)
            ranks[int(mt.group(1))] = m
        if not ranks:
            return _View([], False, None, (), awaited=f"{rank_manifest_name(0)} (no writer has started)")
        sizes = {m["world_size"] for m in ranks.values()}
        if len(sizes) != 1:
            raise ShardError(
                f"{self.out_dir}: rank manifests disagree on the writer world_size: {sorted(sizes)}"
            )
        wws = sizes.pop()
        by_rank = [ranks.get(r) for r in range(wws)]
        sig = tuple((len(m["shards"]), m["final"]) if m else (0, False) for m in by_rank)
        schema = next((m["schema"] for m in by_rank if m and m.get("schema") is not None), None)
        return _View(_ordered_prefix(by_rank), False, schema, sig, _first_unsettled(by_rank))

    def _open(self, entry: dict, schema: dict | None) -> dict[str, np.ndarray]:
        path = self.out_dir / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{path}: listed in the manifest but missing") from None
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise ShardError(
                f"{path}: {len(data)} bytes but the manifest says {entry['bytes']} (truncated or overwritten)"
            )
        digest = _sha256(data)
        if digest != entry["sha256"]:
            raise ShardError(
                f"{path}: sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}... (corrupted)"
            )
        try:
            arrays = stnp.load(data)
        except Exception as e:  # safetensors raises its own error types
            raise ShardError(f"{path}: not a readable safetensors file ({e})") from e
        if schema is not None and _schema_of(arrays) != schema:
            raise ShardError(f"{path}: arrays {_schema_of(arrays)} do not match the manifest schema {schema}")
        for k, a in arrays.items():
            if a.shape[0] != entry["records"]:
                raise ShardError(
                    f"{path}: array {k!r} has {a.shape[0]} records, the manifest says {entry['records']}"
                )
        return arrays

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # The DataLoader always asks its process 0 first; rotating ids makes the stream that was due next
        # at save time come first after a resume, so the batch order is that of an uninterrupted run.
        worker, n = (
            (0, 1) if info is None else ((info.id + self._next_worker) % info.num_workers, info.num_workers)
        )
        if n != self.workers:
            raise ShardError(
                f"ShardReader(num_workers={self.num_workers}) is iterated by {n} worker process(es); "
                "pass the DataLoader's num_workers to the reader"
            )
        return self._stream(worker)

    def _stream(self, worker: int) -> Iterator[dict[str, Any]]:
        j, r = self._positions[worker]
        view = self._view()
        idle_since, sig = time.monotonic(), view.signature
        while True:
            if j < len(view.shards):
                entry = view.shards[j]
                arrays = {k: widen(a) for k, a in self._open(entry, view.schema).items()}
                n = entry["records"]
                if r > n:
                    raise ShardError(
                        f"{self.out_dir / entry['file']}: resume position record {r} > {n} records"
                    )
                for i in range(r, n):
                    nxt = (j, i + 1) if i + 1 < n else (j + self.streams, 0)
                    # .copy(): a record must not keep the whole shard alive (or ship it to shared memory).
                    rec: dict[str, Any] = {k: torch.from_numpy(np.array(a[i])) for k, a in arrays.items()}
                    rec["state"] = {"worker": worker, "shard": nxt[0], "record": nxt[1]}
                    self._positions[worker] = list(nxt)
                    yield rec
                j, r = j + self.streams, 0
                continue
            if view.complete:
                return
            time.sleep(self.poll_s)
            view = self._view()
            now = time.monotonic()
            if view.signature != sig:
                idle_since, sig = now, view.signature
            elif self.timeout_s is not None and now - idle_since > self.timeout_s:
                raise ShardError(
                    f"{self.out_dir}: follow mode: nothing new committed for {self.timeout_s:g}s; waiting for "
                    f"{view.awaited} (this reader needs shard ordinal {j}, {len(view.shards)} in order so far, "
                    f"no final {FINAL_MANIFEST}): is the writer still running?"
                )
