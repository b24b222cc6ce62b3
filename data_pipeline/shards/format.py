"""Names, the shard error and the JSON/array helpers every part of the shard format shares."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from stablekd.data_pipeline.files import atomic_write

FORMAT_VERSION = 1
# The kinds of artifact a manifest names (data_pipeline/soft_labels.py, candidates.py), here so that the
# launching process reads manifests without importing torch.
SOFT_LABELS, CANDIDATES = "soft_labels", "candidates"


FINAL_MANIFEST = "manifest.json"


_RANK_MANIFEST_RE = re.compile(r"^manifest\.r(\d{3,})\.json$")


class ShardError(ValueError):
    """A shard or manifest is missing, damaged or does not match what its user expects.

    The message names the file (or meta key) and says what is wrong.
    """


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
