"""The real-text proving ground's corpus and fact set (benchmarks/kjv_corpus.py) on the KJV slice in
tests/data, and the compressor anchor (benchmarks/compressors.py): deterministic, held out by whole
books, no question of either held-out kind leaked into training."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.conftest import benchmark_module

ROOT = Path(__file__).resolve().parent.parent
SLICE = ROOT / "tests" / "data" / "kjv_slice.txt"


kjv = benchmark_module("kjv_corpus")
compressors = benchmark_module("compressors")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kjv")
    kjv.build(out, kjv.read_verses(SLICE))
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_is_deterministic(built, tmp_path):
    again = json.loads(json.dumps(kjv.build(tmp_path, kjv.read_verses(SLICE))))
    first = json.loads((built / "manifest.json").read_text())
    assert again == first
    assert set(first["sha256"]) >= {"qa.jsonl", "probe_rephrased.jsonl", "probe_unasked.jsonl", "mixed.jsonl"}


def test_heldout_books_are_whole_and_state_no_fact(built):
    assert sorted(p.name for p in (built / "heldout").iterdir()) == ["08_Ruth.txt", "41_Mark.txt"]
    train_text = " ".join(" ".join(p.read_text().split()) for p in sorted((built / "train").iterdir()))
    assert "Boaz begat Obed" not in train_text  # Ruth 4:21, held out
    assert "Boaz begat Obed" in " ".join((built / "heldout" / "08_Ruth.txt").read_text().split())
    facts = json.loads((built / "facts.json").read_text())
    assert {f["book"] for f in facts} <= {"Ge", "1Ki", "1Chr", "Mat"}
    assert not any(f["x"] == "Boaz" for f in facts)
    for f in facts:  # every answer is the text's own words (a list may be flattened across a line wrap)
        assert f["answer"].removeprefix("in ") in train_text, f


def test_facts_found_by_the_text(built):
    facts = {(f["relation"], f["x"]): f["answer"] for f in json.loads((built / "facts.json").read_text())}
    assert facts[("age", "Seth")] == "an hundred and five years"  # Ge 5:6
    assert facts[("days", "Methuselah")] == "nine hundred sixty and nine years"  # Ge 5:27
    assert facts[("reign_age", "Rehoboam")] == "forty and one years old"  # 1 Ki 14:21
    assert facts[("mother", "Jehoshaphat")] == "Azubah"  # 1 Ki 22:42
    assert facts[("buried", "Asa")] == "in the city of David"  # 1 Ki 15:24
    assert facts[("wife", "Abram")] == "Sarai"  # Ge 11:29
    assert facts[("son", "Ner")] == "Kish"  # 1 Chr 8:33 "Ner begat Kish, and Kish begat Saul"
    assert ("son", "Abraham") in facts  # Mat 1:2


def test_no_heldout_question_is_trained(built):
    facts = json.loads((built / "facts.json").read_text())
    qa = {r["prompt"] for r in _jsonl(built / "qa.jsonl")}
    rephrased = _jsonl(built / "probe_rephrased.jsonl")
    unasked = _jsonl(built / "probe_unasked.jsonl")
    assert rephrased and unasked
    # kind (a): the probe's phrasing of a fact is no training record, its other two phrasings are
    assert not qa & {r["prompt"] for r in rephrased}
    asked = [f for f in facts if f["kind"] == "asked"]
    assert len(rephrased) == len(asked) and len(qa) == 2 * len(asked)
    for f in facts:
        if f["kind"] == "unasked":
            # kind (b): no training record asks an unasked fact in any phrasing ...
            assert not qa & {kjv.record(f, form)["prompt"] for form in range(kjv.FORMS)}, f
            # ... and its probe's phrasing is trained on another fact of the relation
            same = [a for a in asked if a["relation"] == f["relation"]]
            assert any(kjv.record(a, f["form"])["prompt"] in qa for a in same), f


def test_mixed_holds_every_paragraph_once_and_every_question_repeatedly(built):
    mixed = _jsonl(built / "mixed.jsonl")
    paragraphs = [
        " ".join(p.split()) for f in sorted((built / "train").iterdir()) for p in f.read_text().split("\n\n")
    ]
    assert [r["text"] for r in mixed if "text" in r] == paragraphs
    qa = _jsonl(built / "qa.jsonl")
    questions = [r for r in mixed if "prompt" in r]
    assert len(questions) == kjv.QA_REPEAT * len(qa)
    assert all(questions.count(r) == kjv.QA_REPEAT for r in random.Random(0).sample(qa, 10))
    first = next(i for i, r in enumerate(mixed) if "prompt" in r)
    assert first < len(mixed) // 10  # spread through the prose, not appended after it


def test_bad_verse_line_names_file_and_line(tmp_path):
    bad = tmp_path / "verses.txt"
    bad.write_text(SLICE.read_text().splitlines()[0] + "\nGenesis 1:2 And the earth\n")
    with pytest.raises(SystemExit, match=r"verses.txt: line 2: expected 'Book C:V text'"):
        kjv.read_verses(bad)


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv-text is not installed")
def test_whole_bible_build(tmp_path):
    m = kjv.build(tmp_path, kjv.read_verses(None))
    assert m["verses"] == 31102 and m["train_books"] == 59 and len(m["heldout_books"]) == 7
    assert m["facts"]["asked"] >= 300 and m["facts"]["unasked"] >= 100


def test_compressors_pay_less_for_text_they_have_seen():
    text = SLICE.read_text().encode()
    rng = random.Random(0)
    noise = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(4000))
    seen = compressors.conditional_bits_per_byte(text, text[:4000])
    unseen = compressors.conditional_bits_per_byte(text, noise)
    assert set(seen) >= {"xz", "bz2"}
    for name in seen:
        assert seen[name] < 1.0 < 4.0 < unseen[name], (name, seen[name], unseen[name])


def test_committed_real_text_results_are_what_the_docs_quote():
    """The README's sentence and table are the committed JSON's, not copies that drift."""
    result = json.loads((ROOT / "benchmarks" / "results" / "real_text.json").read_text())
    assert set(result) >= {"commit", "cpu", "compressors", "models"}
    assert set(result["models"]) >= {"teacher", "ce_twin", "student"}
    for arm in ("teacher", "ce_twin", "student"):
        assert set(result["models"][arm]) >= {
            "bpb",
            "rep_4",
            "task_contradiction",
            "fact_em_rephrased",
            "fact_em_unasked",
        }
    real_text = benchmark_module("real_text")
    readme = (ROOT / "README.md").read_text()
    assert real_text.summary(result) in readme
    # its rows of the models (the docs' whole table, every arm: tests/test_results.py)
    assert real_text.models_table(result, real_text.README_MODELS) in readme


def test_contrastive_goals_compare_each_arm_with_the_arm_it_starts_from():
    """Issue #28's goals, as real_text.py judges a contrastive arm: shares of its starting arm's contradiction
    and bits per byte, exact match within 0.01 below, each goal naming that arm."""
    real_text = benchmark_module("real_text")
    student = {"task_contradiction": 0.8, "task_paraphrase_contradiction": 0.4, "bpb": 1.5,
               "fact_em_rephrased": 0.5, "fact_em_unasked": 0.05}  # fmt: skip
    met = {**student, "task_contradiction": 0.4, "task_paraphrase_contradiction": 0.3, "bpb": 1.53,
           "fact_em_rephrased": 0.491, "fact_em_unasked": 0.05}  # fmt: skip
    for arm, (_, start, _) in real_text.CONTRASTIVE.items():
        goals = real_text.contrastive_goals({start: student, arm: met}, arm)
        assert len(goals) == 5 and all(goals.values()), goals
        missed = {**met, "task_contradiction": 0.41, "bpb": 1.531, "fact_em_unasked": 0.039}
        goals = real_text.contrastive_goals({start: student, arm: missed}, arm)
        assert [g for g, ok in goals.items() if not ok] == [
            f"{arm} task contradiction <= 0.5 x {start}'s",
            f"{arm} fact_em_unasked >= {start}'s - 0.01",
            f"{arm} bpb <= 1.02 x {start}'s",
        ]
