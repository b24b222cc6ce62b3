"""SentencePiece trained on a corpus, saved as a directory AutoTokenizer loads, ids identical both ways."""

from __future__ import annotations

import sentencepiece as spm
from transformers import AutoTokenizer

from stablekd.data_pipeline import bios
from stablekd.model.tokenizer import encode, load_tokenizer, tokenizer_hash, train_tokenizer


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
