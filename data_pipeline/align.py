"""Cross-tokenizer alignment: the bytes every token id stands for, and the positions of two
tokenizations of one text whose token boundaries coincide.

A soft-label record holds teacher ids; its text is the concatenation of their bytes (`TokenBytes`, stored
beside the shards as `token_bytes.safetensors`, so a reader needs no teacher tokenizer). A student with
another tokenizer re-tokenises that text (`realign`) and learns where the boundaries coincide:

- Axis. Bytes of the record's text; a special token (EOS between packed documents) is one unit of its own
  and becomes the student's EOS, so documents stay apart for both. Text between specials is tokenised by
  the student as one document (as the student's own packing would), partial UTF-8 characters at the
  record's edges (a byte-level teacher may cut one) are left out.
- Aligned position. Teacher position t (its distribution over the token that starts where token t ends)
  and student position s are aligned when tokens t and s end at the same byte and both have a next token
  in their record: both then predict the text that starts there, a span of one or more tokens on each
  side until the next common boundary (GOLD, DSKD). The teacher position must be counted (its next token
  learned). Where several student tokens end at one byte (SentencePiece's empty dummy-prefix piece), the
  last one is aligned: the one whose next token carries text.
- Same next token. An aligned position whose next token is the same text on both sides (both next tokens
  also end together) is flagged `same_next`: there the teacher's distribution is over the units the
  student predicts; elsewhere the two sides continue in differently cut spans.
- Learned. A student token is learned (counted by CE) when the teacher token holding its first byte is.
- Length. The student's record is `seq_len` of its tokens: longer tokenisations are cut (their positions
  do not align), shorter ones are padded (never counted).

Whitespace conventions differ and do not matter here: SentencePiece's `▁` and byte-level BPE's `Ġ` both
stand for the byte 0x20, SentencePiece byte-fallback pieces `<0xE6>` for their byte. A SentencePiece student
adds a dummy-prefix space to a text that does not start with one; that byte is taken off its first token.
A SentencePiece teacher's own dummy-prefix space at a document's start (after a special) is left out of
the text, so the student learns documents that start as its own do.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.files import atomic_write

if TYPE_CHECKING:  # torch only for a batch's tensors: the launching process reads TOKEN_BYTES_FILE's name
    import torch

TOKEN_BYTES_FILE = "token_bytes.safetensors"
TOKEN_BYTES_VERSION = "1"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
IGNORE_INDEX = -100


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte (Ġ = 0x20)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The types in a fast tokenizer's decoder (a Sequence's parts too); empty for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found, todo = set(), [json.loads(backend.to_str()).get("decoder") or {}]
    while todo:
        d = todo.pop()
        found.add(d.get("type", ""))
        todo.extend(d.get("decoders") or [])
    return found


class TokenBytes:
    """The UTF-8 bytes each id of a tokenizer stands for (a special token: none, flagged `special`)."""

    def __init__(self, pieces: list[bytes], special: np.ndarray, dummy_prefix: bool = False) -> None:
        self.dummy_prefix = dummy_prefix  # the tokenizer spells a document's start with a space it adds
        self.offsets = np.zeros(len(pieces) + 1, np.int64)
        self.offsets[1:] = np.cumsum([len(p) for p in pieces])
        self.data = b"".join(pieces)
        self.special = np.asarray(special, bool)
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def piece(self, i: int) -> bytes:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def text(self, ids: Any) -> bytes:
        """The bytes of a sequence of ids (specials contribute none)."""
        return b"".join(self.piece(int(i)) for i in ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenBytes:
        """Bytes per id of a Hugging Face tokenizer: byte-level BPE pieces (GPT-2, Llama 3, Qwen2) through
        the byte alphabet, SentencePiece pieces with `▁` as a space and `<0xNN>` byte fallback as that byte."""
        kinds = _decoder_kinds(tokenizer)
        byte_level = "ByteLevel" in kinds
        chars = _byte_level_chars()
        special = np.zeros(len(tokenizer), bool)
        special[[i for i in tokenizer.all_special_ids if i < len(tokenizer)]] = True
        for i, t in tokenizer.added_tokens_decoder.items():
            if t.special and i < len(tokenizer):
                special[i] = True
        pieces = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if special[i] or tok is None:
                pieces.append(b"")
            elif m := _BYTE_PIECE.match(tok):
                pieces.append(bytes([int(m.group(1), 16)]))
            elif byte_level and all(c in chars for c in tok):
                pieces.append(bytes(chars[c] for c in tok))
            else:
                pieces.append(tok.replace("\u2581", " ").encode())
        spelled = b"".join(pieces[i] for i in tokenizer("a", add_special_tokens=False)["input_ids"])
        return cls(pieces, special, dummy_prefix=spelled == b" a")

    def save(self, path: str | os.PathLike) -> None:
        """Atomically, as safetensors (offsets, bytes, special flags; the format version in its metadata)."""
        from safetensors.numpy import save

        arrays = {
            "offsets": self.offsets,
            "data": np.frombuffer(self.data, np.uint8).copy() if self.data else np.zeros(0, np.uint8),
            "special": self.special.astype(np.uint8),
        }
        meta = {"version": TOKEN_BYTES_VERSION, "dummy_prefix": str(int(self.dummy_prefix))}
        atomic_write(Path(path), save(arrays, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenBytes:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path} missing: the soft labels were written before cross-tokenizer reading existed (or "
                "by another tool); rerun `stablekd stage soft_labels` to write it"
            )
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            version = meta.get("version")
            if version != TOKEN_BYTES_VERSION:
                raise DataError(
                    f"{path}: token bytes format version {version!r}, expected {TOKEN_BYTES_VERSION!r}"
                )
            offsets, data, special = (f.get_tensor(k) for k in ("offsets", "data", "special"))
        raw = data.tobytes()
        pieces = [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return cls(pieces, special.astype(bool), meta.get("dummy_prefix") == "1")


def vocab_map(teacher: TokenBytes, student: TokenBytes, student_tokenizer: Any = None) -> np.ndarray:
    """Teacher id -> the student id with the same bytes, or -1 (specials and pieces the student lacks).

    One to one: where several ids of a vocabulary stand for the same bytes (SentencePiece's `<0x41>` and
    `A`), the one its tokenizer produces for that text is kept when `student_tokenizer` is given, else the
    last (the byte-fallback pieces come first in a SentencePiece vocabulary)."""

    def index(tb: TokenBytes, tok: Any = None) -> dict[bytes, int]:
        by_piece: dict[bytes, list[int]] = {}
        for i in range(len(tb)):
            if not tb.special[i] and tb.lengths[i] > 0:
                by_piece.setdefault(tb.piece(i), []).append(i)
        chosen = {}
        for piece, ids in by_piece.items():
            pick = ids[-1]
            if len(ids) > 1 and tok is not None:
                try:
                    enc = tok(piece.decode(), add_special_tokens=False)["input_ids"]
                except UnicodeDecodeError:
                    enc = []
                pick = enc[0] if len(enc) == 1 and enc[0] in ids else pick
            chosen[piece] = pick
        return chosen

    s = index(student, student_tokenizer)
    out = np.full(len(teacher), -1, np.int64)
    for piece, t in index(teacher).items():
        out[t] = s.get(piece, -1)
    return out


class Realigned(NamedTuple):
    """One record re-tokenised for the student (each array (seq_len,))."""

    input_ids: np.ndarray  # student ids, padded
    labels: np.ndarray  # student ids where learned, IGNORE_INDEX elsewhere (padding, context)
    teacher_pos: np.ndarray  # teacher position aligned with each student position, -1 where none
    same_next: np.ndarray  # bool: aligned, and the next token is the same text on both sides


def _utf8_edges(raw: bytes) -> tuple[int, int]:
    """(lead, trail): bytes of a partial UTF-8 character at the start and at the end of `raw`."""
    lead = 0
    while lead < len(raw) and lead < 3 and raw[lead] & 0xC0 == 0x80:
        lead += 1
    trail, i = 0, len(raw) - 1
    while i >= lead and len(raw) - i <= 4:
        b = raw[i]
        if b & 0xC0 != 0x80:  # a start byte: is its character complete?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            trail = 0 if len(raw) - i >= need else len(raw) - i
            break
        i -= 1
    return lead, trail


class Aligner:
    """Re-tokenises teacher records for a student tokenizer (module docstring: what aligns)."""

    def __init__(
        self, teacher: TokenBytes, student_tokenizer: Any, seq_len: int, student: TokenBytes | None = None
    ):
        self.teacher, self.tok, self.seq_len = teacher, student_tokenizer, seq_len
        self.student = student or TokenBytes.from_tokenizer(student_tokenizer)
        self.eos = student_tokenizer.eos_token_id
        if self.eos is None:
            raise DataError(
                "the student's tokenizer has no EOS token: packed documents could not be kept apart"
            )
        pad = student_tokenizer.pad_token_id
        self.pad = self.eos if pad is None else pad  # padding is never counted: any id will do

    @functools.cached_property
    def vocab_map(self) -> np.ndarray:
        """Teacher id -> student id with the same bytes, or -1 (`vocab_map`)."""
        return vocab_map(self.teacher, self.student, self.tok)

    def records(self, ids: np.ndarray, learned: np.ndarray) -> list[Realigned]:
        """Teacher records ids (B, L) with learned (B, L) bool (loss_mask) -> one Realigned per record."""
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.teacher)):
            raise DataError(
                f"soft-label ids up to {ids.max()}, but the teacher's token bytes ({TOKEN_BYTES_FILE}) know "
                f"{len(self.teacher)} ids: they belong to another tokenizer"
            )
        pieces = [self._pieces(row) for row in ids]
        texts = [text for p in pieces for kind, text, *_ in p if kind == "text"]
        encoded = iter(self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        return [self._record(row, m, p, encoded) for row, m, p in zip(ids, learned, pieces, strict=True)]

    def _pieces(self, row: np.ndarray, sampled: bool = False) -> list[tuple]:
        """The record as ("special", axis start) and ("text", str, axis start of the str) pieces. Bytes that
        are no UTF-8 inside the text are a DataError, or with `sampled` (the model's own samples: byte
        pieces in any order) U+FFFD each, as a tokenizer's decode shows them."""
        special = self.teacher.special[row]
        units = np.where(special, 1, self.teacher.lengths[row])
        starts = np.concatenate([[0], np.cumsum(units)[:-1]])
        out, i = [], 0
        while i < len(row):
            if special[i]:
                out.append(("special", None, int(starts[i])))
                i += 1
                continue
            j = i
            while j < len(row) and not special[j]:
                j += 1
            raw = self.teacher.text(row[i:j])
            lead, trail = _utf8_edges(raw)
            if i > 0 and self.teacher.dummy_prefix and raw[:1] == b" ":
                lead = 1  # a document's start (after a special): the teacher's dummy-prefix space is no text
            try:
                text = raw[lead : len(raw) - trail].decode(errors="replace" if sampled else "strict")
            except UnicodeDecodeError as e:
                raise DataError(f"soft-label record: teacher tokens {i}..{j} are not UTF-8 text ({e})") from e
            if text:
                out.append(("text", text, int(starts[i]) + lead))
            i = j
        return out

    def tokens(self, rows: list[np.ndarray]) -> list[list[int]]:
        """Teacher id sequences -> the student's ids of the same text, each special as the student's EOS
        (a record's text rules: partial UTF-8 characters at the edges and a SentencePiece teacher's
        dummy-prefix space after a special are left out; bytes that are no UTF-8 inside it, which a
        model's samples may hold, are U+FFFD each). A SentencePiece student's dummy-prefix space on a
        text that does not start with one is dropped when it is a token of its own (`▁` before `.`); merged
        into a word (`▁Enos`) it stays, the one byte the student's ids add. Candidate groups are
        re-tokenised with it (data_pipeline/candidate_realign.py)."""
        pieces = [self._pieces(np.asarray(row, np.int64), sampled=True) for row in rows]
        texts = [text for p in pieces for kind, text, *_ in p if kind == "text"]
        encoded = iter(self.tok(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        out = []
        for p in pieces:
            ids: list[int] = []
            for kind, text, _ in p:
                if kind == "special":
                    ids.append(self.eos)
                else:
                    spelled = next(encoded)
                    ends = self._ends(spelled, text)  # byte for byte, or a DataError naming the tokenizer
                    ids.extend(int(i) for i, e in zip(spelled, ends, strict=True) if e > 0)
            out.append(ids)
        return out

    def _ends(self, ids: list[int], text: str) -> np.ndarray:
        """The byte (within `text`) where each of the student's tokens of `text` ends; a DataError unless
        they spell it byte for byte (a SentencePiece dummy-prefix space excepted)."""
        ends = np.cumsum(self.student.lengths[ids])
        size, total = len(text.encode()), int(ends[-1]) if len(ends) else 0
        if total == size + 1 and self.student.piece(ids[0])[:1] == b" " and not text.startswith(" "):
            return np.maximum(ends - 1, 0)  # the dummy-prefix space is not in the text
        if total != size:
            name = getattr(self.tok, "name_or_path", "") or type(self.tok).__name__
            raise DataError(
                f"the student's tokenizer {name} does not reproduce the text byte for byte ({total} bytes "
                f"from {size}; a normalizer? cross-tokenizer reading needs one that keeps the text): "
                f"{text[:60]!r}"
            )
        return ends

    def _record(
        self, row: np.ndarray, learned: np.ndarray, pieces: list[tuple], encoded: Iterator
    ) -> Realigned:
        t_special = self.teacher.special[row]
        t_end = np.cumsum(np.where(t_special, 1, self.teacher.lengths[row]))
        s_ids: list[int] = []
        s_start: list[int] = []
        s_end: list[int] = []
        for kind, text, start in pieces:
            if kind == "special":
                s_ids.append(self.eos)
                s_start.append(start)
                s_end.append(start + 1)
                continue
            ids = next(encoded)
            ends = self._ends(ids, text)
            s_ids.extend(int(i) for i in ids)
            s_start.extend(int(start + e) for e in np.concatenate([[0], ends[:-1]]))
            s_end.extend(int(start + e) for e in ends)
        n = min(len(s_ids), self.seq_len)
        sid = np.asarray(s_ids[:n], np.int64)
        owner = np.searchsorted(t_end, np.asarray(s_start[:n], np.int64), side="right").clip(max=len(row) - 1)
        input_ids = np.full(self.seq_len, self.pad, np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, np.int64)
        input_ids[:n] = sid
        labels[:n] = np.where(learned[owner].astype(bool), sid, IGNORE_INDEX)
        # Teacher positions that are counted (their next token learned), by the byte where their token ends.
        t_at = {int(e): t for t, e in enumerate(t_end[:-1]) if learned[t + 1]}
        last: dict[int, int] = {}  # end byte -> the last student position (with a next token) ending there
        for s in range(n - 1):
            last[s_end[s]] = s
        teacher_pos = np.full(self.seq_len, -1, np.int64)
        same_next = np.zeros(self.seq_len, bool)
        for e, s in last.items():
            if (t := t_at.get(e)) is not None:
                teacher_pos[s] = t
                # The same span: the next tokens start and end together (a dropped dummy-prefix space
                # makes the student's start later).
                same_next[s] = s_start[s + 1] == e and t_end[t + 1] == s_end[s + 1]
        return Realigned(input_ids, labels, teacher_pos, same_next)


_ENTRIES = ("topk_ids", "topk_logprobs", "sample_ids", "sample_weights")  # the teacher's, per position


def realign_batch(batch: dict[str, torch.Tensor], aligner: Aligner) -> dict[str, torch.Tensor]:
    """A decoded soft-label batch (data_pipeline/encodings.py: teacher input_ids (B, L), loss_mask, the
    teacher's entries (B, L, k)) -> the same for the student: input_ids and labels (B, seq_len) in its
    tokenizer, the teacher's entries moved to the aligned student positions (B, seq_len, k; teacher ids),
    `aligned` and `same_next` (B, seq_len) bool (`Realigned`) and `teacher_positions` (B,): the teacher's
    counted positions, for the share that aligns."""
    import torch

    ids = batch["input_ids"].numpy()
    learned = batch["loss_mask"].numpy() != 0 if "loss_mask" in batch else np.ones(ids.shape, bool)
    recs = aligner.records(ids, learned)
    pos = torch.from_numpy(np.stack([r.teacher_pos for r in recs]))  # (B, Ls)
    out = {
        "input_ids": torch.from_numpy(np.stack([r.input_ids for r in recs])),
        "labels": torch.from_numpy(np.stack([r.labels for r in recs])),
        "aligned": pos >= 0,
        "same_next": torch.from_numpy(np.stack([r.same_next for r in recs])),
        "teacher_positions": torch.from_numpy(learned[:, 1:].sum(-1)),
    }
    idx = pos.clamp(min=0)
    for key in _ENTRIES:
        if key in batch:
            x = batch[key]
            out[key] = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]).to(torch.int64))
    return out


class Realign:
    """Soft-label batches (offline or online, with state_dict/load_state_dict) for a student with another
    tokenizer: each batch through `realign_batch`. A batch is a pure function of the teacher's, so the
    source's position is the whole state: a resumed run realigns the same records the same way."""

    def __init__(self, batches: Any, aligner: Aligner) -> None:
        self.batches, self.aligner = batches, aligner

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield realign_batch(batch, self.aligner)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
