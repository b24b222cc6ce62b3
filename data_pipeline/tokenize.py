"""A tokenizer directory as every stage reads it: load it, encode with it, tell whether a model directory
holds one, and compare two by content.

Any local Hugging Face tokenizer (`tokenizer.json`, or a SentencePiece `tokenizer.model`) loads through
`AutoTokenizer`; every stage encodes with `encode()` below, so training, soft labels and evaluation agree
on the ids. Training a SentencePiece tokenizer on the corpus is model/tokenizer.py's.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers (and torch) load on first use: the launching process hashes and checks
    from transformers import PreTrainedTokenizerBase  # tokenizers without them, 2 s faster per command


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (ours or any local Hugging Face one)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist (expected a directory with tokenizer.model or tokenizer.json)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without specials; callers append EOS where a document ends."""
    return tok(texts, add_special_tokens=False)["input_ids"]


def own_tokenizer(model: str | Path) -> Path | None:
    """`model` when it is a directory holding a tokenizer (`tokenizer.json` or `tokenizer.model`), else None."""
    path = Path(model)
    if any((path / name).is_file() for name in _DEFINING):
        return path
    return None


# What a tokenizer directory's ids come from; tokenizer.json first: AutoTokenizer loads it (the fast tokenizer)
# when both are there, so a directory that also keeps the SentencePiece file it was converted from is
# still the same tokenizer as one without it.
_DEFINING = ("tokenizer.json", "tokenizer.model")
# The parts of tokenizer.json that map text to ids; not the post-processor (which specials are added),
# decoder, padding or truncation settings, which differ between saves of one vocabulary.
_ID_MAPPING = ("added_tokens", "normalizer", "pre_tokenizer", "model")


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of what maps text to ids in a tokenizer directory, by content: for tokenizer.json its parsed
    id-mapping parts (key order and whitespace of the file do not count), else tokenizer.model's bytes.
    Soft-label manifests record it; two models share a tokenizer when their hashes are equal."""
    for name in _DEFINING:
        f = Path(path) / name
        if f.is_file():
            return _file_hash(str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size)
    return hashlib.sha256().hexdigest()


@functools.cache
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    # Cached per file version: a 150k-token tokenizer.json takes ~0.3 s to parse, and stages ask often.
    data = Path(path).read_bytes()
    if path.endswith(".json"):
        parsed = json.loads(data)
        data = json.dumps({k: parsed.get(k) for k in _ID_MAPPING}, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()
