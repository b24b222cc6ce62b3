"""Read user corpora: `.txt` / `.jsonl` (field `text`) files, optionally gzipped, named as files,
directories or glob patterns (DESIGN §6, `data.paths`).

A bad line never stops a run: it is skipped and counted in `SourceStats`, and the caller reports the
counts. Files are read as bytes and decoded line by line, so one undecodable byte costs one line, and
only `\\n` ends a line (`str.splitlines` would also split on `\\x1c`, `\\u2028`, ... inside a document).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
_GLOB_CHARS = frozenset("*?[")


class DataError(ValueError):
    """A corpus or stream problem the user must fix; the message names the path (and line) and what was expected."""


@dataclass
class SourceStats:
    """Counters filled while documents are read (one full read of the corpus)."""

    files: int = 0
    documents: int = 0
    empty_files: int = 0  # files with no bytes at all (after decompression)
    empty_lines: int = 0  # blank / whitespace-only lines, and jsonl records whose text is blank
    bad_lines: int = 0  # undecodable UTF-8, invalid JSON, missing / non-string "text", truncated .gz

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def _expected() -> str:
    return f"a file ending in {', '.join(SUFFIXES)}, a directory of such files, or a glob pattern"


def _dir_files(d: Path) -> list[Path]:
    return [f for f in d.rglob("*") if f.is_file() and _supported(f)]


def resolve_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files, directories (recursive) and glob patterns into a sorted, de-duplicated file list.

    The order is the corpus order that sharding and resume positions count documents in, so it must not
    depend on how the entries were written: paths are made absolute and sorted by their components.
    A glob skips matched files of other types (`data/*` may match a README); a named file may not.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a bare string would otherwise be read as a sequence of one-letter paths
    found: set[Path] = set()
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_dir():
            files = _dir_files(p)
            if not files:
                raise DataError(
                    f"{p}: directory holds no corpus files (expected files ending in {', '.join(SUFFIXES)})"
                )
        elif p.is_file():
            if not _supported(p):
                raise DataError(f"{p}: unsupported file type (expected {_expected()})")
            files = [p]
        elif _GLOB_CHARS & set(str(entry)):
            files = []
            for m in glob.glob(os.path.expanduser(str(entry)), recursive=True):
                mp = Path(m)
                if mp.is_dir():
                    files.extend(_dir_files(mp))
                elif mp.is_file() and _supported(mp):
                    files.append(mp)
            if not files:
                raise DataError(f"{entry}: glob pattern matched no corpus files (expected {_expected()})")
        else:
            raise DataError(f"{p}: no such file or directory (expected {_expected()})")
        found.update(Path(os.path.abspath(f)) for f in files)
    return sorted(found, key=lambda f: f.parts)


def _raw_lines(path: Path, stats: SourceStats) -> Iterator[bytes]:
    """Lines of one file as bytes; a truncated or corrupt .gz ends the file and counts one bad line."""
    gz = path.name.endswith(".gz")
    opener = gzip.open if gz else open
    empty = True
    with opener(path, "rb") as f:
        try:
            for line in f:
                empty = False
                yield line
        except (EOFError, gzip.BadGzipFile, zlib.error):
            # Truncated downloads and partial copies are common; the lines read so far are still good.
            stats.bad_lines += 1
            empty = False
    if empty:
        stats.empty_files += 1


def iter_documents(files: Sequence[Path], stats: SourceStats | None = None) -> Iterator[str]:
    """Documents of `files` in order: one per non-blank `.txt` line, one per `.jsonl` record's "text".

    Trailing `\\n` / `\\r\\n` is removed; the rest of a line is kept as is. A UTF-8 BOM at the start of a
    file is dropped. Skipped lines are counted in `stats` (see `SourceStats`).
    """
    stats = stats if stats is not None else SourceStats()
    for path in files:
        path = Path(path)
        stats.files += 1
        is_json = path.name.endswith((".jsonl", ".jsonl.gz"))
        for lineno, raw in enumerate(_raw_lines(path, stats), start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                stats.bad_lines += 1
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                stats.empty_lines += 1
                continue
            if is_json:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    stats.bad_lines += 1
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    stats.bad_lines += 1
                    continue
                if not text.strip():
                    stats.empty_lines += 1
                    continue
                line = text
            stats.documents += 1
            yield line
