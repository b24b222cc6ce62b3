"""The Genesis fact set (tests/data/genesis_facts/): real facts from the KJV text, questions a user would
bring, and no leakage of a held-out question into anything a model trains on."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from stablekd.data_pipeline.answers import answer
from stablekd.data_pipeline.contexts import document_contexts
from stablekd.data_pipeline.sources import read_documents
from tests.hf_models import byte_level_tokenizer

FACTS = Path(__file__).parent / "data" / "genesis_facts"
FILES = ("prose.txt", "heldout_prose.txt", "qa.jsonl", "heldout.jsonl")


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FACTS / name).read_text().splitlines()]


def test_the_committed_set_is_what_the_extraction_gives(tmp_path):
    runpy.run_path(str(FACTS / "extract.py"), run_name="extract")["main"](tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_text() == (FACTS / name).read_text(), name


def test_held_out_questions_ask_facts_the_prose_states_and_nothing_trains_on_them():
    train, held = _records("qa.jsonl"), _records("heldout.jsonl")
    assert len(held) >= 60 and len(train) == 2 * len(held)
    prose = " ".join((FACTS / "prose.txt").read_text().split())
    held_prose = " ".join((FACTS / "heldout_prose.txt").read_text().split())
    trained = {r["prompt"] for r in train}
    for r in held:
        assert r["prompt"] not in trained  # never a training record (nor a candidate context, below)
        assert r["prompt"] not in prose and r["prompt"] not in held_prose
        stated = r["response"].strip().rstrip(".").removesuffix(" years")
        assert stated in prose, r  # the verse's own words
        # the same fact is trained in its other forms: its answer is a training response
        assert any(t["response"] == r["response"] for t in train), r
    assert not set(prose.split(". ")) & set(held_prose.split(". "))  # held-out prose is other text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("tok"))


def test_candidate_contexts_never_ask_a_held_out_question(tok):
    files = [FACTS / "prose.txt", FACTS / "qa.jsonl"]
    docs = list(read_documents(files))
    contexts = document_contexts(files, tok, len(docs), max_context=96)
    assert len(contexts) == len(docs)
    held = {r["prompt"] for r in _records("heldout.jsonl")}
    asked = {tok.decode(c.context[1:]) for c in contexts}
    assert not asked & held
    tasks = [c for c in contexts if c.reference]
    assert len(tasks) == len(_records("qa.jsonl"))  # every task record, and no prose half, has a reference
    for c in tasks:
        assert answer(tok.decode(c.gold[:-1])) is not None
