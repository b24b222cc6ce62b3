"""Atomic file writes: every artifact a reader or a resumed stage may open is written aside, then renamed over."""

from __future__ import annotations

import json
import os
from pathlib import Path


def tmp_path(path: Path) -> Path:
    """Where `atomic_write` stages `path`: `<name>.tmp` beside it (a resumed writer deletes leftovers by this name)."""
    return path.with_name(path.name + ".tmp")


def atomic_write(path: str | Path, data: str | bytes, tmp: Path | None = None) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never half.

    The temp file (`tmp`, default `tmp_path(path)`) sits in the same directory (os.replace is atomic only
    within one filesystem) and is fsynced before the rename, so after a crash the new name never points at
    unwritten blocks. A file that several processes write at once needs a `tmp` of each writer's own.
    """
    path = Path(path)
    tmp = tmp or tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: give back what the temp file took; the old file is untouched
        tmp.unlink(missing_ok=True)
        e.filename = e.filename or str(path)  # a failed write() names no file: name the one being written
        raise
    os.replace(tmp, path)


def read_marker(ckpt_dir: Path) -> dict | None:
    """A checkpoint directory's `complete.json` (the last complete tag, its step, world size and config
    hash; launcher/rank/engine.py writes it), or None when no checkpoint was ever completed."""
    marker = Path(ckpt_dir) / "complete.json"
    return json.loads(marker.read_text()) if marker.exists() else None
