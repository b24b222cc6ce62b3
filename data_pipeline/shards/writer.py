"""ShardWriter: one rank's shards, each committed atomically and listed in the rank's manifest; resumes
from what the rank's manifest lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stnp

from stablekd.data_pipeline.files import atomic_write, tmp_path
from stablekd.data_pipeline.shards.format import (
    FORMAT_VERSION,
    ShardError,
    _jsonable,
    _meta_diff,
    _read_json,
    _same,
    _schema_of,
    _sha256,
    _write_json,
    rank_manifest_name,
    shard_name,
)


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
