"""The tokenizer, one module: train a SentencePiece tokenizer on the corpus, load a tokenizer directory,
encode with it, tell whether a model directory holds one, and compare two by content.

Any local Hugging Face tokenizer (`tokenizer.json`, or a SentencePiece `tokenizer.model`) loads through
`AutoTokenizer`; every stage encodes with `encode()` below, so training, soft labels and evaluation agree
on the ids. transformers 5.x: `LlamaTokenizer(vocab_file=...)` silently tokenizes to nothing, so a trained
directory holds the SentencePiece model as `tokenizer.model` and is always loaded through
`AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if (
    TYPE_CHECKING
):  # transformers (and torch) and sentencepiece load on first use: the launching process hashes and checks
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


# --- training a SentencePiece tokenizer on the corpus ---------------------------------------------

# Fixed special ids: pad=0, unk=1, bos=2, eos=3 (the model config reads them from the tokenizer).
_SPECIALS = dict(
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    pad_piece="<pad>",
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, max_sentences: int = 200_000
) -> Path:
    """Train a BPE SentencePiece model on `texts` and save it as an HF tokenizer directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        _train(_pieces(texts), model, vocab_size, max_sentences)
    except RuntimeError as e:  # SentencePiece reports a too-small vocabulary as an INTERNAL error
        raise ValueError(
            f"SentencePiece could not train a vocabulary of {vocab_size}: {str(e).split('] ')[-1]}"
        ) from None
    spm_path = out_dir / "tokenizer.model"
    spm_path.write_bytes(model.getvalue())
    # A bare tokenizer.model plus this config is what AutoTokenizer converts correctly in transformers 5
    # (constructing LlamaTokenizerFast(vocab_file=...) directly yields an empty vocabulary). Saving the
    # loaded tokenizer adds tokenizer.json, so later loads do not convert again.
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))
    return out_dir


# SentencePiece skips a training sentence longer than its max_sentence_length (4,192 bytes by default):
# a whole-file document (data.text_unit=file) or a long .jsonl record would teach it nothing.
_MAX_PIECE_BYTES = 4096
_WORD = re.compile(r"\S*\s*")  # a word and the whitespace after it (newlines included)


def _pieces(texts: Iterable[str], limit: int = _MAX_PIECE_BYTES) -> Iterator[str]:
    """`texts` for the trainer: a text of at most `limit` UTF-8 bytes as it is (so a corpus of short
    documents trains exactly as before), a longer one cut between words into pieces of at most `limit`
    bytes (a single longer word by characters)."""
    for text in texts:
        if len(text.encode("utf-8", "surrogatepass")) <= limit:
            yield text
            continue
        piece, size = [], 0
        for word in _WORD.findall(text):
            n = len(word.encode("utf-8", "surrogatepass"))
            if size + n > limit and piece:
                yield "".join(piece)
                piece, size = [], 0
            while n > limit:  # no whitespace for `limit` bytes: cut by characters
                head = word[: limit // 4]  # <= 4 bytes a character
                yield head
                word = word[len(head) :]
                n = len(word.encode("utf-8", "surrogatepass"))
            if word:
                piece.append(word)
                size += n
        if piece:
            yield "".join(piece)


def _train(texts: Iterable[str], model: io.BytesIO, vocab_size: int, max_sentences: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # no <unk> on unseen characters: any text round-trips
        # No NFKC, no whitespace folding: the fast tokenizer transformers converts from this model does
        # neither, so SentencePiece and AutoTokenizer give the same ids for every text.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
        **_SPECIALS,
    )
