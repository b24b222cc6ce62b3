"""The global shard order over writer ranks, `finalize` (manifest.json, once every rank is final) and
`read_manifest` with its checks against a reader's expectations.
"""

from __future__ import annotations

import os
from pathlib import Path

from stablekd.data_pipeline.shards.format import (
    _RANK_MANIFEST_RE,
    FINAL_MANIFEST,
    FORMAT_VERSION,
    ShardError,
    _jsonable,
    _meta_diff,
    _read_json,
    _same,
    _write_json,
    rank_manifest_name,
    shard_name,
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
