"""Read user corpora: `.txt` / `.jsonl` (field `text`, or task records: data_pipeline/tasks.py) files, optionally gzipped, named as files,
directories or glob patterns (`data.paths`), as documents and splits.

A `Corpus` says what a reader sees: its files, what one document of a `.txt` file is (`text_unit`:
paragraph, line or file; a `.jsonl` record is always one document), and which split (all, train, eval).
The split is by a hash of each document's text (`is_heldout`), so it needs no index, does not move when
files are added or reordered, and puts identical documents on the same side. Every reader (packed
streams, eval batches, candidate contexts, report prefixes, tokenizer training) goes through
`iter_documents`, so a `Corpus` with split "train" holds the eval share out of all of them.

A bad line never stops a run: it is skipped and counted in `SourceStats`, and the caller reports the
counts. Files are read as bytes and decoded line by line, so one undecodable byte costs one line, and
only `\\n` ends a line (`str.splitlines` would also split on `\\x1c`, `\\u2028`, ... inside a document).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.tasks import Document, parse_record

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
# A .jsonl file with more than this share of its records in none of the known forms (or with no usable
# record at all) is refused before a run starts (`check_records`): one bad record in a large file is noise
# the readers skip and count, a file written in another schema ("answer" throughout) is a mistake that
# would otherwise train on nothing of it, or on whatever else the corpus holds.
MAX_BAD_RECORD_SHARE = 0.10
# Records judged per file: a file in another schema shows in its first records, and the launching process
# must not parse a multi-GB corpus at every launch (0.7-1.0 s per 4 MB here); the readers still skip and
# count a bad record anywhere.
SCAN_RECORDS = 10_000
RECORD_FORMS = (
    '"text", "prompt" + "response" (a non-blank response) or "messages" (role/content pairs, one a '
    "non-blank assistant message)"
)
TEXT_UNITS = ("paragraph", "line", "file")
SPLITS = ("all", "train", "eval")
_GLOB_CHARS = frozenset("*?[")


@dataclass
class SourceStats:
    """Counters filled while documents are read (one full read of the corpus).

    Each skipped thing is counted once, in the unit it would have been read in: with text_unit "line"
    a blank line is an empty line; with "paragraph" or "file" blank lines separate paragraphs or belong
    to the text, so they count nothing, and a file of nothing but blank lines counts as an empty file.
    """

    files: int = 0
    documents: int = 0  # documents yielded (of the corpus's split)
    empty_files: int = 0  # no bytes at all (after decompression); paragraph/file unit: only blank lines
    empty_lines: int = 0  # line unit: blank / whitespace-only lines; .jsonl: blank lines and blank "text"
    bad_lines: int = 0  # undecodable UTF-8, invalid JSON, a record of no known form (tasks.py), truncated .gz
    task_records: int = 0  # documents that are prompt/response or chat records (learned: responses only)
    other_split: int = 0  # documents read but left to the other split (a train reader: the held-out share)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out share `fraction` (0 <= fraction <= 1).

    The first 8 bytes of BLAKE2b(text, UTF-8) read as an integer h in [0, 2^64): held out iff
    h < fraction * 2^64. It depends on the text alone, so a document stays on its side whatever else
    the corpus holds; about `fraction` of distinct documents are held out (binomial spread).
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass(frozen=True)
class Corpus(Sequence[Path]):
    """Files plus how to read them: what a `.txt` document is and which split of the documents to yield.

    A sequence of its files (len, iteration, indexing), so code that lists or hashes the files keeps
    working; the readers (`iter_documents`, `PackedStream`, `eval_batches`) also honour `text_unit`,
    `split` and `eval_fraction`. A plain list of paths reads as Corpus(files) (one document per line,
    every document).
    - text_unit: "paragraph" (a block between blank lines; its lines, stripped, joined with one space:
      hard wraps are layout), "line" (one document per non-blank line, as written), "file" (the whole
      file with its newlines, leading/trailing blank lines dropped). `.jsonl` files give one document
      per record's "text" whatever the unit.
    - split: "all"; "train" (documents not held out); "eval" (the held-out share, `is_heldout`).
    """

    files: tuple[Path, ...]
    text_unit: str = "line"
    split: str = "all"
    eval_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", tuple(Path(f) for f in self.files))
        if self.text_unit not in TEXT_UNITS:
            raise DataError(f"text_unit: expected one of {', '.join(TEXT_UNITS)}, got {self.text_unit!r}")
        if self.split not in SPLITS:
            raise DataError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise DataError(f"eval_fraction: expected a value in [0, 1], got {self.eval_fraction}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):  # type: ignore[override]
        return self.files[i]

    def keeps(self, text: str) -> bool:
        """Whether a document of the corpus belongs to this split."""
        if self.split == "all":
            return True
        return is_heldout(text, self.eval_fraction) == (self.split == "eval")


def as_corpus(source: Corpus | Sequence[str | Path]) -> Corpus:
    """`source` itself, or a plain file list as Corpus(files) (one document per line, every document)."""
    if isinstance(source, Corpus):
        return source
    if isinstance(source, (str, Path)):
        source = [source]
    return Corpus(tuple(Path(f) for f in source))


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


def _lines(path: Path, stats: SourceStats) -> Iterator[str]:
    """Decoded lines of one file without their line ending; an undecodable line is counted and skipped."""
    for lineno, raw in enumerate(_raw_lines(path, stats), start=1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            stats.bad_lines += 1
            continue
        yield line.rstrip("\r\n")


def _why_unusable(line: str) -> str | None:
    """None for a record the readers take (a non-blank document), else what is wrong with it, briefly."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "not valid JSON"
    doc = parse_record(record)
    if doc is not None and doc.text.strip():
        return None
    if doc is not None:
        return "blank text"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    keys = ", ".join(json.dumps(k) for k in list(record)[:6]) + (", ..." if len(record) > 6 else "")
    return f"keys {keys}" if record else "an empty object"


def check_records(path: Path, max_share: float = MAX_BAD_RECORD_SHARE) -> None:
    """Refuse a `.jsonl` file none of whose records is usable, or more than `max_share` of whose records
    are in no known form (what `read_documents` skips as bad lines): a DataError of one line naming the
    file, the first such line and the forms expected. One read of the file, parsing each record once
    (the launching process runs it before any rank starts, on the first SCAN_RECORDS records of the file;
    .txt files are not read)."""
    records = bad = usable = 0
    first_bad = first_blank = ""
    stats = SourceStats()  # a truncated .gz ends the file early: the lines before it are still judged
    for lineno, raw in enumerate(_raw_lines(path, stats), start=1):
        if records == SCAN_RECORDS:
            break
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            why: str | None = "not UTF-8"
        else:
            if not line.strip():
                continue
            why = _why_unusable(line)
        records += 1
        if why is None:
            usable += 1
        elif why == "blank text":  # an empty document, not a malformed one: skipped, refused only if all are
            first_blank = first_blank or f"line {lineno}: {why}"
        else:
            bad += 1
            first_bad = first_bad or f"line {lineno}: {why}"
    if records and not usable:
        raise DataError(
            f"{path}: no usable record in {records} (first: {first_bad or first_blank}); expected each record "
            f"to have {RECORD_FORMS}"
        )
    if bad > max_share * records:
        raise DataError(
            f"{path}: {bad} of {records} records in no known form, more than the {max_share:.0%} allowed "
            f"(first: {first_bad}); expected {RECORD_FORMS}"
        )


def _jsonl_documents(lines: Iterator[str], stats: SourceStats) -> Iterator[Document]:
    for line in lines:
        if not line.strip():
            stats.empty_lines += 1
            continue
        try:
            doc = parse_record(json.loads(line))
        except json.JSONDecodeError:
            doc = None
        if doc is None:
            stats.bad_lines += 1
            continue
        if not doc.text.strip():
            stats.empty_lines += 1
            continue
        yield doc


def _line_documents(lines: Iterator[str], stats: SourceStats) -> Iterator[str]:
    for line in lines:
        if line.strip():
            yield line
        else:
            stats.empty_lines += 1


def _paragraph_documents(lines: Iterator[str], stats: SourceStats) -> Iterator[str]:
    # Hard wraps in prose are layout: a paragraph's lines join with one space (edges stripped), so the
    # model never learns wrap points and a word after a wrap tokenizes as after any space.
    block: list[str] = []
    seen = found = False
    for line in lines:
        seen = True
        if line.strip():
            block.append(line.strip())
        elif block:
            found = True
            yield " ".join(block)
            block = []
    if block:
        found = True
        yield " ".join(block)
    if seen and not found:
        stats.empty_files += 1  # only blank lines (a file of no bytes is counted by _raw_lines)


def _file_documents(lines: Iterator[str], stats: SourceStats) -> Iterator[str]:
    text = list(lines)
    first = next((i for i, line in enumerate(text) if line.strip()), None)
    if first is None:
        if text:
            stats.empty_files += 1
        return
    last = max(i for i, line in enumerate(text) if line.strip())
    yield "\n".join(text[first : last + 1])


_UNIT_READERS = {"paragraph": _paragraph_documents, "line": _line_documents, "file": _file_documents}


def read_documents(source: Corpus | Sequence[Path], stats: SourceStats | None = None) -> Iterator[Document]:
    """Documents of `source` (a `Corpus`, or a plain file list: one document per line) in file order.

    `.txt`: by the corpus's text_unit (see `Corpus`); `.jsonl`: one per record (its "text", or a task
    record whose learned spans say what a training reader learns, data_pipeline/tasks.py). Line endings
    (`\\n`, `\\r\\n`) are removed; a paragraph's lines are joined with one space, a file's with `\\n`;
    the rest of a line is kept as is (a paragraph's lines lose their edge whitespace). A UTF-8 BOM at
    the start of a file is dropped. An undecodable line is left out of its paragraph or file (the rest
    is kept). Documents of the other split (by their text) are skipped. Everything skipped is counted in
    `stats` (see `SourceStats`).
    """
    corpus = as_corpus(source)
    stats = stats if stats is not None else SourceStats()
    for path in corpus.files:
        stats.files += 1
        lines = _lines(path, stats)
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            docs: Iterator[Document] = _jsonl_documents(lines, stats)
        else:
            docs = map(Document, _UNIT_READERS[corpus.text_unit](lines, stats))
        for doc in docs:
            if not corpus.keeps(doc.text):
                stats.other_split += 1
                continue
            stats.documents += 1
            stats.task_records += doc.is_task
            yield doc


def iter_documents(source: Corpus | Sequence[Path], stats: SourceStats | None = None) -> Iterator[str]:
    """The texts of `read_documents` (a task record's whole text: prompt and response)."""
    return (doc.text for doc in read_documents(source, stats))
