"""SentencePiece trained on a corpus, saved as a directory AutoTokenizer loads, ids identical both ways."""

from __future__ import annotations

import sentencepiece as spm
from transformers import AutoTokenizer

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.tokenizer import encode, load_tokenizer, tokenizer_hash, train_tokenizer


def test_round_trip_through_autotokenizer(tmp_path):
    corpus = bios.generate(30, seed=1)
    out = train_tokenizer(corpus.train, 400, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(out))  # what any transformers user does
    assert len(tok) == 400 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = corpus.heldout[:20] + ["Zoë moved to Zürich — 3 ½ years later.\tTabs  and  spaces", ""]
    for text, ids in zip(texts, encode(tok, texts), strict=True):
        assert ids == sp.encode(text)  # HF and SentencePiece agree on every id
        assert tok.decode(ids) == text  # byte fallback: unseen characters round-trip
    assert encode(load_tokenizer(out), texts[:1]) == encode(tok, texts[:1])
    assert tok(texts[0])["input_ids"] == encode(tok, texts[:1])[0]  # no BOS/EOS added behind our back
    assert len(tokenizer_hash(out)) == 64


def test_long_documents_train_a_tokenizer(tmp_path):
    """Whole-file documents (data.text_unit=file) are longer than SentencePiece's 4,192-byte sentence limit:
    it would skip every one and fail. They are cut between words for training; short texts pass as they are."""
    corpus = bios.generate(30, seed=1)
    files = ["\n".join(corpus.train[i : i + 40]) for i in range(0, len(corpus.train), 40)]  # ~8 KB each
    assert min(len(f.encode()) for f in files) > 4192
    tok = load_tokenizer(train_tokenizer(files, 400, tmp_path / "tok"))
    by_line = load_tokenizer(train_tokenizer(corpus.train, 400, tmp_path / "by_line"))
    # As good as one trained on the same text a line at a time (it learnt from all of the text).
    assert len(tok) == 400
    assert len(encode(tok, files[:1])[0]) < 1.05 * len(encode(by_line, files[:1])[0])

    from stablekd.data_pipeline.tokenizer import _pieces

    assert list(_pieces(corpus.train[:5])) == corpus.train[:5]
    text = files[0] + " " + "x" * 5000 + " tail"
    pieces = list(_pieces([text], limit=1000))
    assert "".join(pieces) == text and max(len(p.encode()) for p in pieces) <= 1000 and len(pieces) > 13
