"""Cross-tokenizer alignment (data_pipeline/align.py): bytes per id, and which positions of two tokenisations
of one text align, on hand-made vocabularies and on real SentencePiece / byte-level BPE tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablekd.data_pipeline.align import Aligner, TokenBytes, realign_batch, vocab_map
from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from tests.hf_models import PROSE, byte_level_tokenizer

EOS = "</s>"


class Pieces:
    """A hand-made tokenizer: greedy longest match over `pieces` (bytes), id 0 = EOS."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b""] + pieces
        self.eos_token_id, self.pad_token_id = 0, None

    def bytes(self) -> TokenBytes:
        return TokenBytes(self.pieces, np.arange(len(self.pieces)) == 0)

    def encode(self, raw: bytes) -> list[int]:
        out, i = [], 0
        while i < len(raw):
            best = max(
                (j for j, p in enumerate(self.pieces) if p and raw.startswith(p, i)),
                key=lambda j: len(self.pieces[j]),
            )
            out.append(best)
            i += len(self.pieces[best])
        return out

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.encode(t.encode()) for t in texts]}


def _align(teacher: Pieces, student: Pieces, ids: list[int], seq_len: int = 16, learned=None):
    aligner = Aligner(teacher.bytes(), student, seq_len, student.bytes())
    row = np.asarray([ids])
    mask = np.ones_like(row, bool) if learned is None else np.asarray([learned])
    return aligner.records(row, mask)[0]


def _pairs(rec) -> list[tuple[int, int]]:
    return [(int(t), s) for s, t in enumerate(rec.teacher_pos) if t >= 0]


def test_merges_on_either_side_align_at_common_boundaries():
    # "the cat sat": the teacher merges " cat", the student merges "the " ... boundaries differ inside.
    teacher = Pieces([b"the", b" cat", b" s", b"at"])
    student = Pieces([b"th", b"e", b" c", b"at", b" sat"])
    t_ids = teacher.encode(b"the cat sat")
    assert [teacher.pieces[i] for i in t_ids] == [b"the", b" cat", b" s", b"at"]
    rec = _align(teacher, student, t_ids)
    s_pieces = [student.pieces[i] for i in rec.input_ids[:5]]
    assert s_pieces == [b"th", b"e", b" c", b"at", b" sat"]
    # teacher ends 3, 7, 9, 11; student ends 2, 3, 5, 7, 11: common 3 (t0, s1) and 7 (t1, s3); 11 is last.
    assert _pairs(rec) == [(0, 1), (1, 3)]
    assert not rec.same_next.any()  # " cat" vs " c", " s" vs " sat": the next spans are cut differently
    assert list(rec.labels[:5]) == list(rec.input_ids[:5]) and (rec.labels[5:] == -100).all()


def test_multibyte_characters_split_by_bytes_align_inside_the_character():
    # "é" is 0xC3 0xA9: a byte-fallback teacher splits it, the student keeps it whole.
    teacher = Pieces([b"a", b"\xc3", b"\xa9", b"b"])
    student = Pieces([b"a", "é".encode(), b"b"])
    rec = _align(teacher, student, teacher.encode("aéb".encode()))
    # teacher ends 1, 2, 3, 4 (the 2 inside é); student ends 1, 3, 4.
    assert _pairs(rec) == [(0, 0), (2, 1)]


def test_a_record_cut_inside_a_character_leaves_the_partial_bytes_out():
    teacher = Pieces([b"\xa9", b"x", b" y", b"\xc3"])
    student = Pieces([b"x", b" y"])
    rec = _align(teacher, student, [1, 2, 3, 4])  # starts after é's first byte, ends on the next one's
    assert [student.pieces[i] for i in rec.input_ids[:2]] == [b"x", b" y"]
    assert _pairs(rec) == [(1, 0)]  # "x" ends at byte 2 for both; " y" has no next student token


def test_specials_stay_apart_and_the_context_is_not_learned():
    teacher = Pieces([b"ab", b"c"])
    student = Pieces([b"a", b"bc", b"c", b"b"])
    # "ab c <eos> c ab": the EOS is one unit of its own and becomes the student's EOS.
    t_ids = [1, 2, 0, 2, 1]
    rec = _align(teacher, student, t_ids, learned=[0, 0, 1, 1, 1])
    got = [student.pieces[i] if i else "EOS" for i in rec.input_ids[:6]]
    assert got == [b"a", b"bc", "EOS", b"c", b"a", b"b"]
    # teacher ends 2, 3, 4 (EOS), 5, 7; student ends 1, 3, 4, 5, 6, 7. Common, with a next token on both
    # sides: 3 (t1, s1), 4 (t2, s2), 5 (t3, s3); t0 is not counted (its next token is context) anyway.
    assert _pairs(rec) == [(1, 1), (2, 2), (3, 3)]
    assert list(np.flatnonzero(rec.same_next)) == [1, 2]  # next EOS, next "c" on both sides; "ab" vs "a"
    assert list(rec.labels[:6]) == [-100, -100, 0, 3, 1, 4]  # "a", "bc" lie in the context "ab c"


def test_a_dummy_prefix_teacher_has_its_document_start_space_dropped():
    """A SentencePiece teacher spells a document's first word with the space it added ("▁ab"): after a
    special that space is not text, so the student sees "ab c" as its own tokenizer would."""
    teacher = Pieces([b" ab", b" c"])
    student = Pieces([b"ab", b" ab", b" c"])
    tb = teacher.bytes()
    tb.dummy_prefix = True
    aligner = Aligner(tb, student, 8, student.bytes())
    rec = aligner.records(np.asarray([[1, 0, 1, 2]]), np.ones((1, 4), bool))[0]
    assert list(rec.input_ids[:4]) == [2, 0, 1, 3]  # " ab" (mid-record: kept), EOS, "ab", " c"
    # teacher ends 3, 4, 7, 9; student 3, 4, 7, 9: all align; after the EOS the next spans differ
    # (" ab" against "ab"), so only the first is the same next token.
    assert _pairs(rec) == [(0, 0), (1, 1), (2, 2)]
    assert list(np.flatnonzero(rec.same_next)) == [0, 2]


def test_the_longer_student_record_is_cut_and_padded_beyond():
    teacher = Pieces([b"abcd"])
    student = Pieces([b"a", b"b", b"c", b"d"])
    rec = _align(teacher, student, [1, 1, 1], seq_len=6)
    assert list(rec.input_ids) == [1, 2, 3, 4, 1, 2]  # 12 student tokens cut to 6
    assert _pairs(rec) == [(0, 3)]  # byte 4; byte 8 would be student position 7, cut


def test_vocab_map_is_one_to_one_and_prefers_the_piece_the_tokenizer_produces():
    teacher = TokenBytes([b"", b"A", b" the", b"A", b"zz"], np.array([1, 0, 0, 0, 0], bool))
    student = TokenBytes([b" the", b"", b"A", b"q"], np.array([0, 1, 0, 0], bool))
    vmap = vocab_map(teacher, student)
    assert list(vmap) == [-1, -1, 0, 2, -1]  # duplicates: the last teacher "A" only; specials never


def test_token_bytes_round_trip(tmp_path):
    tb = TokenBytes([b"", b"\xe6\x97", b" x"], np.array([1, 0, 0], bool), dummy_prefix=True)
    tb.save(tmp_path / "tb.safetensors")
    back = TokenBytes.load(tmp_path / "tb.safetensors")
    assert [back.piece(i) for i in range(3)] == [b"", b"\xe6\x97", b" x"] and list(back.special) == [1, 0, 0]
    assert back.dummy_prefix
    with pytest.raises(DataError, match="rerun `stablekd stage soft_labels`"):
        TokenBytes.load(tmp_path / "missing.safetensors")


TEXT = "In the beginning God created the heaven and the earth.\nDieu créa 日本 — the end."


@pytest.fixture(scope="module")
def real_tokenizers(tmp_path_factory):
    """A SentencePiece tokenizer (ours, with byte fallback: `▁` and <0xNN>) and a byte-level BPE (`Ġ`)."""
    d = tmp_path_factory.mktemp("toks")
    lines = PROSE.read_text().splitlines()[:4000]
    train_tokenizer(lines, 700, d / "sp")
    byte_level_tokenizer(d / "bpe", 500)
    return load_tokenizer(d / "sp"), load_tokenizer(d / "bpe")


def test_real_tokenizers_spell_the_text_byte_for_byte(real_tokenizers):
    sp, bpe = real_tokenizers
    for tok, prefix in ((sp, True), (bpe, False)):
        tb = TokenBytes.from_tokenizer(tok)
        assert tb.special[tok.eos_token_id] and tb.dummy_prefix == prefix
        got = tb.text(tok(TEXT, add_special_tokens=False)["input_ids"])
        # SentencePiece adds its dummy-prefix space to a text that does not start with one.
        assert got in (TEXT.encode(), b" " + TEXT.encode())
    vmap = vocab_map(TokenBytes.from_tokenizer(sp), TokenBytes.from_tokenizer(bpe), bpe)
    the_sp, the_bpe = sp.convert_tokens_to_ids("▁the"), bpe.convert_tokens_to_ids("Ġthe")
    assert vmap[the_sp] == the_bpe  # " the" in both conventions


def _spelled(tb: TokenBytes, ids) -> bytes:
    """The text ids spell, a special as one NUL byte, without the space a SentencePiece tokenizer adds to a
    document's start (after a special): the only bytes two tokenisations of one text may differ in."""
    out, doc_start = [], False
    for i in ids:
        piece = b"\0" if tb.special[i] else tb.piece(int(i))
        if doc_start and tb.dummy_prefix and piece[:1] == b" ":
            piece = piece[1:]
        doc_start = bool(tb.special[i]) or (doc_start and not piece)
        out.append(piece)
    return b"".join(out)


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp"])
def test_real_tokenizers_aligned_positions_share_their_text(real_tokenizers, direction):
    """Every aligned pair has the same text before it on both sides, and most positions align."""
    sp, bpe = real_tokenizers
    teacher, student = (sp, bpe) if direction == "sp->bpe" else (bpe, sp)
    tb_t, tb_s = TokenBytes.from_tokenizer(teacher), TokenBytes.from_tokenizer(student)
    docs = [TEXT, *PROSE.read_text().split("\n\n")[5:8]]
    assert not any(doc[:1].isspace() for doc in docs)  # so a space at a document's start is an added one
    ids: list[int] = []
    for doc in docs:
        ids += teacher(doc, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    L = 96
    rows = np.asarray([ids[i : i + L] for i in (1, 40)])  # cut mid-document
    aligner = Aligner(tb_t, student, 2 * L, tb_s)
    batch = {"input_ids": torch.from_numpy(rows), "topk_ids": torch.from_numpy(rows)[..., None]}
    out = realign_batch(batch, aligner)
    for r, row in enumerate(rows):
        rec = aligner.records(rows[r : r + 1], np.ones((1, L), bool))[0]
        s_ids = rec.input_ids
        pairs = _pairs(rec)
        assert len(pairs) >= 0.5 * (L - 1)
        for t, s in pairs:
            t_text = _spelled(tb_t, row[1 : t + 1])  # from token 1: token 0 may hold a partial character
            s_text = _spelled(tb_s, s_ids[: s + 1])
            # Byte for byte, whitespace included: a space or newline moved is what alignment can get wrong.
            assert s_text.endswith(t_text), (t, s, s_text[-40:], t_text[-40:])
            # the teacher's entries moved to the student position are the teacher's at t
            assert out["topk_ids"][r, s, 0] == row[t]
            assert out["aligned"][r, s]
    assert out["teacher_positions"].tolist() == [L - 1, L - 1]


def test_a_student_tokenizer_that_rewrites_the_text_is_refused_by_name():
    class Collapsing(Pieces):  # a normalizer that folds runs of spaces: other bytes than the record's
        name_or_path = "/models/collapsing"

        def __call__(self, texts, add_special_tokens=False):
            return super().__call__([t.replace("  ", " ") for t in texts])

    teacher = Pieces([b"a", b" "])
    student = Collapsing([b"a", b" "])
    with pytest.raises(
        DataError, match="tokenizer /models/collapsing does not reproduce the text byte for byte"
    ):
        _align(teacher, student, [1, 2, 2, 1])


# ------------------------------------------------------------------ candidate groups for another tokenizer


def _candidate_batch(tok, prompts: list[str], answers: list[list[str]]) -> dict:
    """Groups in `tok`'s ids as the soft_labels stage writes them: EOS + the prompt, then continuations that
    carry on its encoding (sampled after the context), each ending with EOS; the last row a reference."""
    from stablekd.data_pipeline.candidates import pack_groups

    ctx, rows = [], []
    for prompt, group in zip(prompts, answers, strict=True):
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        ctx.append([tok.eos_token_id, *head])
        rows.append([])
        for answer in group:
            whole = tok(prompt + answer, add_special_tokens=False)["input_ids"]
            assert whole[: len(head)] == head  # the continuation starts at a token boundary
            rows[-1].append([*whole[len(head) :], tok.eos_token_id])
    packed = pack_groups(ctx, rows, 40, 24, [True, False, True])
    return {k: torch.from_numpy(v) for k, v in packed.items()}


PROMPTS = ["In the beginning God created", "And Seth lived an hundred and five years, and begat", "Dieu créa"]
ANSWERS = [
    [" the heaven and the earth.", " light.", " the heaven"],
    [" Enos:", ".", " Enos, and"],  # "." does not start with a space: no dummy prefix for it
    [" le ciel — 日本.", " la terre", " 日本"],
]


@pytest.mark.parametrize("direction", ["sp->bpe", "bpe->sp"])
def test_candidate_groups_are_the_same_text_in_the_students_ids(real_tokenizers, direction):
    """Each context and continuation spells the teacher's text byte for byte in the student's ids, the
    groups keep their rows, order and reference flags, and the result is the same however it is batched."""
    from stablekd.data_pipeline.candidate_realign import realign_groups

    sp, bpe = real_tokenizers
    teacher, student = (sp, bpe) if direction == "sp->bpe" else (bpe, sp)
    tb_t, tb_s = TokenBytes.from_tokenizer(teacher), TokenBytes.from_tokenizer(student)
    aligner = Aligner(tb_t, student, 64, tb_s)
    batch = {**_candidate_batch(teacher, PROMPTS, ANSWERS), "verdict": torch.tensor([[1, -1, 0]] * 3)}
    out = realign_groups(batch, aligner, ctx_len=40, cont_len=32)
    assert out["cand_ids"].shape[:2] == (3, 3) and out["cand_ids"].shape[2] <= 32
    assert out["reference"].tolist() == [1, 0, 1] and out["verdict"] is batch["verdict"]

    def context(b: dict, i: int) -> list[int]:
        return b["context_ids"][i, b["context_ids"].shape[1] - int(b["context_len"][i]) :].tolist()

    def row(b: dict, i: int, g: int) -> list[int]:
        return b["cand_ids"][i, g, : int(b["cand_len"][i, g])].tolist()

    for i in range(3):
        ctx_s = context(out, i)
        assert ctx_s[0] == student.eos_token_id  # the teacher's EOS is the student's
        assert _spelled(tb_s, ctx_s) == _spelled(tb_t, context(batch, i))
        for g in range(3):
            ids = row(out, i, g)
            assert ids[-1] == student.eos_token_id
            assert _spelled(tb_s, ids) == _spelled(tb_t, row(batch, i, g)), (i, g)
            own = student(ANSWERS[i][g], add_special_tokens=False)["input_ids"]
            if tb_s.piece(own[0]) == b" " and not ANSWERS[i][g].startswith(" "):
                own = own[1:]  # a lone dummy-prefix piece: no byte of the text
            assert ids == [*own, student.eos_token_id]  # the student's own spelling of the continuation
    # Deterministic and independent of batching: one group at a time gives the same rows.
    again = realign_groups(batch, aligner, ctx_len=40, cont_len=32)
    assert all(torch.equal(again[k], out[k]) for k in ("context_ids", "cand_ids", "cand_len"))
    for i in range(3):
        alone = realign_groups({k: v[i : i + 1] for k, v in batch.items()}, aligner, 40, 32)
        assert context(alone, 0) == context(out, i)
        assert [row(alone, 0, g) for g in range(3)] == [row(out, i, g) for g in range(3)]
    # Widths: a context keeps its last ctx_len tokens, a continuation its first cont_len.
    cut = realign_groups(batch, aligner, ctx_len=3, cont_len=2)
    assert cut["context_ids"].shape[1] == 3 and cut["cand_ids"].shape[2] == 2
    for i in range(3):
        assert context(cut, i) == context(out, i)[-3:]
        assert [row(cut, i, g) for g in range(3)] == [row(out, i, g)[:2] for g in range(3)]


def test_sampled_bytes_that_are_no_utf8_become_replacement_characters():
    """A tiny teacher samples byte pieces in any order: in a candidate row that is U+FFFD (what decode
    shows and the labels read); in a soft-label record, text of the corpus, it stays an error."""
    teacher = Pieces([b"a", b"\xcc", b"b"])
    student = Pieces([b"a", b"b", "\ufffd".encode()])
    aligner = Aligner(teacher.bytes(), student, 8, student.bytes())
    assert aligner.tokens([np.asarray([0, 1, 2, 3]), np.asarray([1, 1])]) == [[0, 1, 3, 2], [1, 1]]
    with pytest.raises(DataError, match="not UTF-8 text"):
        _align(teacher, student, [1, 2, 3])
    # A row that is only the start of a character spells nothing: in a group it is the student's EOS (a
    # continuation needs a token to have a mean log-likelihood).
    from stablekd.data_pipeline.candidate_realign import realign_groups
    from stablekd.data_pipeline.candidates import pack_groups

    assert aligner.tokens([np.asarray([2])]) == [[]]
    group = {k: torch.from_numpy(v) for k, v in pack_groups([[0, 1]], [[[2], [3, 0]]], 4, 4).items()}
    out = realign_groups(group, aligner, 4, 4)
    assert out["cand_ids"].tolist() == [[[0, 0], [2, 0]]] and out["cand_len"].tolist() == [[1, 2]]
