"""Shard + manifest mechanics shared by the soft-label and candidate formats (DESIGN §4).

On disk, one directory per artifact:

    shard-r{rank:03d}-{index:06d}.safetensors   arrays with a leading record dimension
    manifest.r{rank:03d}.json                   one per writer rank, rewritten (temp + os.replace) after
                                                every shard: {format_version, kind, rank, world_size,
                                                meta, schema, shards, records, final}
    manifest.json                               written once by `finalize` (rank 0, after a barrier):
                                                {format_version, kind, meta, schema, writer_world_size,
                                                shards: [{file, index, rank, records, bytes, sha256}],
                                                total_records, final: true}

Atomicity: a shard is serialised in memory, written to `<name>.tmp`, fsynced and `os.replace`d; only
then is it listed in its rank's manifest (itself replaced atomically). So a reader never sees half a
shard, and a shard a manifest lists is complete unless something outside the writer damaged it (which
the reader catches: size, sha256, parse and record count are checked on open).

Global shard order (the rule every reader uses, follow mode or not): round-robin over writer ranks,
i.e. sorted by (index, rank): r0/0, r1/0, ..., r{W-1}/0, r0/1, r1/1, ... A rank that is final and has no
shard `index` is skipped in that round. While writing is ongoing, ordinal j is assigned only once every
slot before it is settled: each earlier (index, rank) slot either holds a committed shard or belongs to
a rank that is final with fewer shards. A missing slot of a still-writing rank stops the known prefix
there, so ordinals never change as more shards arrive and every consumer agrees on them.

Consumer streams: stream c = rank * max(num_workers, 1) + worker of C = world_size * max(num_workers, 1)
reads the shards with ordinal j ≡ c (mod C), in increasing j. Disjoint and complete by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stnp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stablekd.data_pipeline.files import atomic_write, tmp_path

FORMAT_VERSION = 1
FINAL_MANIFEST = "manifest.json"

_RANK_MANIFEST_RE = re.compile(r"^manifest\.r(\d{3,})\.json$")


class ShardError(ValueError):
    """A shard or manifest is missing, damaged or does not match what its user expects.

    The message names the file (or meta key) and says what is wrong.
    """


# --------------------------------------------------------------------------------------- file helpers


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:06d}.safetensors"


def rank_manifest_name(rank: int) -> str:
    return f"manifest.r{rank:03d}.json"


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot parse manifest ({e})") from e
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: manifest is not a JSON object")
    return obj


def _jsonable(meta: dict, what: str) -> dict:
    """meta as it reads back from JSON (tuples -> lists), so comparisons after a reload are exact."""
    try:
        return json.loads(json.dumps(meta))
    except TypeError as e:
        raise ShardError(f"{what} is not JSON-serialisable: {e}") from e


def _same(a: Any, b: Any) -> bool:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        # 2 == 2.0; floats survive a JSON round trip exactly, isclose only forgives formatting noise.
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _meta_diff(have: dict, want: dict, keys: list[str] | None = None) -> list[str]:
    """Keys on which two meta dicts differ (a key absent on one side counts as a difference)."""
    keys = sorted(set(have) | set(want)) if keys is None else keys
    missing = object()
    return [k for k in keys if not _same(have.get(k, missing), want.get(k, missing))]


def _schema_of(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: {"dtype": a.dtype.name, "shape": list(a.shape[1:])} for k, a in sorted(arrays.items())}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------- writer


class ShardWriter:
    """Writes one rank's shards and its `manifest.r{rank:03d}.json`; one instance per writer rank.

    Resumable: if this rank's manifest exists (same kind, meta and world_size), writing continues after
    its last committed shard. Leftover temp files and a shard renamed into place but never listed (a kill
    between the two renames) are deleted, so nothing is counted twice. `records_written` tells the caller
    how many input records to skip. Records buffered but not yet flushed when the process died are lost
    and must be re-added, which is exactly what skipping `records_written` does.

    Args:
        out_dir: artifact directory (created).
        rank: this writer's rank, 0 <= rank < world_size.
        kind: format name ("soft_labels", "candidates"); readers refuse another kind.
        meta: JSON-serialisable description every reader checks against its `expect`.
        records_per_shard: records per shard file; the last shard of a rank may be shorter.
        world_size: number of writer ranks. Readers in follow mode need it to order shards before all
            ranks are final (see the module docstring), so every rank records it.
        schema: optional {name: (dtype, per-record shape)}; if absent the first `add` fixes it.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rank: int,
        kind: str,
        meta: dict,
        records_per_shard: int,
        world_size: int = 1,
        schema: dict[str, tuple[Any, tuple[int, ...]]] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ShardError(
                f"writer rank {rank} is outside world_size {world_size} (pass world_size= to ShardWriter)"
            )
        if records_per_shard < 1:
            raise ShardError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.kind, self.world_size = rank, kind, world_size
        self.records_per_shard = records_per_shard
        self.meta = _jsonable(meta, f"{kind} meta")
        self.schema: dict[str, dict] | None = None
        if schema is not None:
            self.schema = {
                k: {"dtype": np.dtype(dt).name, "shape": [int(s) for s in shape]}
                for k, (dt, shape) in sorted(schema.items())
            }
        self.path = self.out_dir / rank_manifest_name(rank)
        self.shards: list[dict] = []
        self.final = False
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self._resume()

    # -- resume
    def _resume(self) -> None:
        prefix = f"shard-r{self.rank:03d}-"
        for p in self.out_dir.glob(f"{prefix}*.tmp"):
            p.unlink()  # a shard killed mid-write: never listed, never read
        tmp_path(self.path).unlink(missing_ok=True)  # a manifest killed mid-write: the old one is intact
        if self.path.exists():
            m = _read_json(self.path)
            for key, mine in (
                ("format_version", FORMAT_VERSION),
                ("kind", self.kind),
                ("world_size", self.world_size),
            ):
                if not _same(m.get(key), mine):
                    raise ShardError(
                        f"{self.path}: cannot resume: {key} is {m.get(key)!r} there, this writer has {mine!r}"
                    )
            diff = _meta_diff(m.get("meta", {}), self.meta)
            if diff:
                detail = "; ".join(
                    f"meta[{k!r}] is {m['meta'].get(k)!r} there, this writer has {self.meta.get(k)!r}"
                    for k in diff
                )
                raise ShardError(f"{self.path}: cannot resume with different meta: {detail}")
            if self.schema is not None and m.get("schema") not in (None, self.schema):
                raise ShardError(
                    f"{self.path}: cannot resume: schema {m['schema']} there, this writer has {self.schema}"
                )
            self.schema = self.schema or m.get("schema")
            self.shards = list(m["shards"])
            self.final = bool(m["final"])
        # A shard renamed into place after the last manifest update (kill between the two renames) is
        # not listed: delete it; the records it holds are re-added by the caller after records_written.
        for p in self.out_dir.glob(f"{prefix}*.safetensors"):
            if int(p.stem[len(prefix) :]) >= len(self.shards):
                p.unlink()
        if not self.path.exists():
            self._write_manifest()  # followers learn world_size / meta before the first shard lands

    @property
    def records_written(self) -> int:
        """Records committed to listed shards (excludes the unflushed buffer)."""
        return sum(s["records"] for s in self.shards)

    # -- writing
    def add(self, **arrays: np.ndarray) -> None:
        """Buffer one batch of records, arrays [R, ...] (same R); writes full shards as they fill.

        dtypes and per-record shapes must match the schema (fixed by the constructor or the first call).
        """
        if self.final:
            raise ShardError(f"{self.path}: rank {self.rank} is already final; cannot add records")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if not arrays:
            raise ShardError("add() needs at least one array")
        lens = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
        if len(set(lens.values())) != 1 or None in lens.values():
            raise ShardError(f"add(): arrays need one shared leading record dimension, got {lens}")
        schema = _schema_of(arrays)
        if self.schema is None:
            self.schema = schema
        elif schema != self.schema:
            raise ShardError(f"add(): arrays {schema} do not match the schema {self.schema} of {self.path}")
        n = next(iter(lens.values()))
        if n == 0:
            return
        self._buffer.append({k: np.ascontiguousarray(a) for k, a in arrays.items()})
        self._buffered += n
        while self._buffered >= self.records_per_shard:
            self._flush(self.records_per_shard)

    def close(self) -> None:
        """Write the partial last shard (if any) and mark this rank final. Idempotent."""
        if self.final:
            return
        if self._buffered:
            self._flush(self._buffered)
        self.final = True
        self._write_manifest()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Only a clean exit marks the rank final; after an error the caller resumes instead.
        if exc_type is None:
            self.close()

    def _flush(self, n: int) -> None:
        merged = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]}
        out = {k: np.ascontiguousarray(a[:n]) for k, a in merged.items()}
        rest = {k: a[n:] for k, a in merged.items()}
        self._buffered -= n
        self._buffer = [rest] if self._buffered else []

        index = len(self.shards)
        name = shard_name(self.rank, index)
        data = stnp.save(
            out,
            metadata={"kind": self.kind, "rank": str(self.rank), "index": str(index), "records": str(n)},
        )
        atomic_write(self.out_dir / name, data)
        self.shards.append(
            {
                "file": name,
                "index": index,
                "rank": self.rank,
                "records": n,
                "bytes": len(data),
                "sha256": _sha256(data),
            }
        )
        self._write_manifest()  # the commit point of this shard

    def _write_manifest(self) -> None:
        _write_json(
            self.path,
            {
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "rank": self.rank,
                "world_size": self.world_size,
                "meta": self.meta,
                "schema": self.schema,
                "shards": self.shards,
                "records": self.records_written,
                "final": self.final,
            },
        )


def _first_unsettled(ranks: list[dict | None]) -> str | None:
    """The shard file the ordered prefix waits for: the first (index, rank) slot a still-writing rank has
    not committed (None when every rank is final)."""
    i = 0
    while any(not (m and m["final"]) for m in ranks):
        for r, m in enumerate(ranks):
            if i >= len(m["shards"] if m else []) and not (m and m["final"]):
                return shard_name(r, i)
        i += 1
    return None


def _ordered_prefix(ranks: list[dict | None]) -> list[dict]:
    """Shards in global order (index, rank), up to the first slot not settled yet.

    ranks[r] is rank r's manifest or None (not written yet = no shards, not final). Slot (i, r) is
    settled when rank r has shard i, or is final with fewer shards (then the slot is skipped).
    """
    out: list[dict] = []
    i = 0
    while True:
        any_has_i = False
        for m in ranks:
            shards = m["shards"] if m else []
            if i < len(shards):
                out.append(shards[i])
                any_has_i = True
            elif not (m and m["final"]):
                return out  # this rank may still write shard i: everything after it waits
        if not any_has_i:
            return out  # every rank is final and has fewer than i+1 shards
        i += 1


def finalize(out_dir: str | os.PathLike, world_size: int, extra_meta: dict | None = None) -> dict:
    """Merge the per-rank manifests into `manifest.json` (atomic) and return it.

    Call on one process (rank 0) after every writer rank has closed and a barrier. Raises ShardError if
    a rank manifest is missing or not final, if ranks disagree on kind/meta/schema/world_size, or if
    manifests of ranks >= world_size exist (a smaller rerun in an old directory would drop their data).
    `extra_meta` (e.g. {"fidelity": {...}}) is merged into meta; it may not contradict a writer key.
    """
    out_dir = Path(out_dir)
    if world_size < 1:
        raise ShardError(f"finalize: world_size must be >= 1, got {world_size}")
    ranks: list[dict] = []
    for r in range(world_size):
        p = out_dir / rank_manifest_name(r)
        if not p.exists():
            raise ShardError(f"{p}: missing: writer rank {r} of {world_size} never wrote")
        m = _read_json(p)
        if not m.get("final"):
            raise ShardError(
                f"{p}: writer rank {r} is not final (close() not called, or it is still writing)"
            )
        if m.get("world_size") != world_size:
            raise ShardError(f"{p}: written with world_size {m.get('world_size')}, finalize got {world_size}")
        ranks.append(m)
    for p in out_dir.glob("manifest.r*.json"):
        mt = _RANK_MANIFEST_RE.match(p.name)
        if mt and int(mt.group(1)) >= world_size:
            raise ShardError(f"{p}: a manifest of a rank >= world_size {world_size} is in {out_dir}")

    first = ranks[0]
    for r, m in enumerate(ranks[1:], start=1):
        for key in ("format_version", "kind"):
            if m.get(key) != first.get(key):
                raise ShardError(
                    f"{out_dir / rank_manifest_name(r)}: {key} {m.get(key)!r} != rank 0's {first.get(key)!r}"
                )
        diff = _meta_diff(m["meta"], first["meta"])
        if diff:
            k = diff[0]
            raise ShardError(
                f"{out_dir / rank_manifest_name(r)}: meta[{k!r}] is {m['meta'].get(k)!r}, "
                f"rank 0 has {first['meta'].get(k)!r}"
            )
    schemas = [m["schema"] for m in ranks if m.get("schema") is not None]
    for s in schemas[1:]:
        if s != schemas[0]:
            raise ShardError(f"{out_dir}: writer ranks disagree on the array schema: {schemas[0]} vs {s}")

    meta = dict(first["meta"])
    for k, v in _jsonable(extra_meta or {}, "extra_meta").items():
        if k in meta and not _same(meta[k], v):
            raise ShardError(f"{out_dir}: extra_meta[{k!r}]={v!r} contradicts the writers' {meta[k]!r}")
        meta[k] = v
    shards = _ordered_prefix(ranks)  # all ranks final -> the complete list
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": first["kind"],
        "meta": meta,
        "schema": schemas[0] if schemas else None,
        "writer_world_size": world_size,
        "shards": shards,
        "total_records": sum(s["records"] for s in shards),
        "final": True,
    }
    _write_json(out_dir / FINAL_MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | os.PathLike, kind: str | None = None, expect: dict | None = None) -> dict:
    """The final `manifest.json`, checked against `kind` and `expect` (see ShardReader)."""
    path = Path(out_dir) / FINAL_MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: missing (writing not finalized; read with follow=True while it runs)")
    m = _read_json(path)
    _check_manifest(m, path, kind, expect or {})
    if not m.get("final"):
        raise ShardError(f"{path}: not marked final")
    return m


def _check_manifest(m: dict, path: Path, kind: str | None, expect: dict) -> None:
    if m.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {m.get('format_version')!r}, this reader reads {FORMAT_VERSION}"
        )
    if kind is not None and m.get("kind") != kind:
        raise ShardError(f"{path}: kind is {m.get('kind')!r} in the manifest, the consumer expects {kind!r}")
    meta = m.get("meta", {})
    diff = _meta_diff(meta, expect, keys=sorted(expect))
    if diff:  # every mismatch, so a set of another encoding says so with its parameters
        detail = "; ".join(
            f"meta[{k!r}] is {repr(meta[k]) if k in meta else 'absent'} in the manifest but the consumer "
            f"expects {expect[k]!r}"
            for k in diff
        )
        raise ShardError(f"{path}: {detail}")


# --------------------------------------------------------------------------------------------- reader


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


def collate_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one worker's records into a batch {name: [B, ...]}; "state" = the last record's state."""
    batch: dict[str, Any] = {k: torch.stack([rec[k] for rec in records]) for k in records[0] if k != "state"}
    batch["state"] = records[-1]["state"]
    return batch


class ShardLoader:
    """A DataLoader over a ShardReader that knows where each worker stream stands.

    Yields {name: tensor [micro_batch_size, ...]} batches; each batch comes from one worker (DataLoader
    batches an IterableDataset per worker), so its last record's state is that worker's position. Only
    *delivered* batches advance `state_dict()`: batches prefetched but not yet consumed are read again
    after a resume. The state is per consumer rank: save it per rank (rank is checked on load).

    Args:
        reader: the ShardReader; its num_workers sets the DataLoader's.
        micro_batch_size: records per batch.
        drop_last: drop each worker's final short batch.
        **dataloader_kwargs: passed to DataLoader (pin_memory, prefetch_factor, ...).
    """

    def __init__(
        self, reader: ShardReader, micro_batch_size: int, drop_last: bool = False, **dataloader_kwargs: Any
    ) -> None:
        self.reader = reader
        self.micro_batch_size = micro_batch_size
        self.drop_last = drop_last
        self.dataloader_kwargs = dataloader_kwargs
        self._positions = reader.state_dict()["positions"]
        self._next_worker = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.reader.load_state_dict(self.state_dict())
        loader = DataLoader(
            self.reader,
            batch_size=self.micro_batch_size,
            num_workers=self.reader.num_workers,
            collate_fn=collate_records,
            drop_last=self.drop_last,
            # Its own generator: a DataLoader iterator draws its base seed from the global torch RNG
            # otherwise, and the extra draw of a resumed run would change the training's random stream.
            generator=torch.Generator(),
            **self.dataloader_kwargs,
        )
        for batch in loader:
            st = batch.pop("state")
            self._positions[st["worker"]] = [st["shard"], st["record"]]
            self._next_worker = (st["worker"] + 1) % self.reader.workers
            yield batch

    def state_dict(self) -> dict:
        return {
            "world_size": self.reader.world_size,
            "num_workers": self.reader.num_workers,
            "rank": self.reader.rank,
            "positions": [list(p) for p in self._positions],
            "next_worker": self._next_worker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)  # validates world_size / num_workers / rank / streams
        self._positions = self.reader.state_dict()["positions"]
        self._next_worker = self.reader._next_worker

    def reset(self) -> None:
        """Back to the start of the data (next epoch)."""
        self.reader.load_state_dict(None)
        self._positions = self.reader.state_dict()["positions"]
        self._next_worker = 0
