"""SentencePiece tokenizer: train on the corpus, save as a directory `AutoTokenizer` loads.

transformers 5.x: `LlamaTokenizer(vocab_file=...)` silently tokenizes to nothing, so the
directory holds the SentencePiece model as `tokenizer.model` and is always loaded through
`AutoTokenizer.from_pretrained` (data_pipeline/tokenize.py, which also encodes with it for every stage).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

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
