"""Stability metrics on hand-made inputs whose answers are worked out in the comments."""

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stablekd.evaluation import metrics as m


def test_rep_n():
    # "a b a b": bigrams ab, ba, ab -> 2 unique of 3
    assert m.rep_n(["a b a b"], 2) == pytest.approx(100 * (1 - 2 / 3))
    # pooled over texts, never across them: "a b" + "a b c" -> bigrams ab | ab, bc -> 2 unique of 3
    assert m.rep_n(["a b", "a b c"], 2) == pytest.approx(100 * (1 - 2 / 3))
    # all-distinct trigrams: "a b c d" -> abc, bcd -> 0 repeated
    assert m.rep_n(["a b c d"], 3) == 0.0
    # "x x x x x": 4 bigrams, all "x x" -> 100 * (1 - 1/4) = 75
    assert m.rep_n(["x x x x x"], 2) == pytest.approx(75.0)
    assert m.rep_n(["a", ""], 2) == 0.0  # no bigrams
    assert m.rep_n([], 2) == 0.0
    with pytest.raises(ValueError):
        m.rep_n(["a b"], 0)


def test_diversity():
    # "x x x x x": rep-2 = 100(1-1/4), rep-3 = 100(1-1/3), rep-4 = 100(1-1/2)
    # diversity = 1/4 * 1/3 * 1/2 = 1/24
    assert m.diversity(["x x x x x"]) == pytest.approx(1 / 24)
    # "a b a b": rep-2 = 100/3 -> 2/3; trigrams aba, bab distinct -> 1; one 4-gram -> 1
    assert m.diversity(["a b a b"]) == pytest.approx(2 / 3)
    assert m.diversity(["a"]) == 1.0  # no n-grams: every rep-n is 0


def test_distinct_n():
    # samples "a b c", "a b d": bigrams ab, bc, ab, bd -> 3 unique / 4
    assert m.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    # unigrams a b c a b d -> 4 unique / 6
    assert m.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert m.distinct_n(["a"], 2) == 0.0


def test_answer_metrics_by_hand():
    answers = [
        ["Boston", "Boston", "Denver", None],  # greedy right; mode Boston 2/4; 2 distinct -> contradiction
        ["Miami", "Miami", "Miami", "Miami"],  # greedy wrong (truth Tampa); 4/4; no contradiction
        [None, None, None, None],  # greedy None = wrong; all None -> 0; no contradiction
        [None, "Austin", None, None],  # greedy wrong; mode Austin 1/4; one value -> no contradiction
    ]
    truth = ["Boston", "Tampa", "Chicago", "Austin"]
    assert m.accuracy(answers, truth) == pytest.approx(1 / 4)
    # (2/4 + 4/4 + 0 + 1/4) / 4 = (0.5 + 1 + 0 + 0.25) / 4 = 0.4375
    assert m.self_consistency(answers) == pytest.approx(0.4375)
    assert m.cross_contradiction(answers) == pytest.approx(1 / 4)
    # a tie: 2 x "a", 2 x "b" -> modal count 2 of 4
    assert m.self_consistency([["a", "a", "b", "b"]]) == pytest.approx(0.5)


def test_truthful_model_is_perfect():
    truth = ["v1", "v2", "v3"]
    answers = [[t] * 5 for t in truth]
    assert m.accuracy(answers, truth) == 1.0
    assert m.self_consistency(answers) == 1.0
    assert m.cross_contradiction(answers) == 0.0
    assert m.intext_contradiction([{"a": [t, t]} for t in truth]) == 0.0


def test_random_answers_match_an_independent_count():
    rng = random.Random(0)
    values = ["v0", "v1", "v2", None]  # V = 3 values plus "no answer"
    questions, k = 300, 6
    answers = [[rng.choice(values) for _ in range(k)] for _ in range(questions)]
    truth = [rng.choice(values[:3]) for _ in range(questions)]

    correct = 0
    agree = 0.0
    contradicting = 0
    for group, t in zip(answers, truth, strict=True):
        correct += group[0] == t
        best = 0
        for v in values[:3]:
            best = max(best, group.count(v))
        agree += best / k
        contradicting += sum(v in group for v in values[:3]) >= 2
    assert m.accuracy(answers, truth) == pytest.approx(correct / questions)
    assert m.self_consistency(answers) == pytest.approx(agree / questions)
    assert m.cross_contradiction(answers) == pytest.approx(contradicting / questions)
    # sanity on the magnitudes: uniform over 4 outcomes -> accuracy ~ 1/4, nearly always a contradiction
    assert 0.15 < m.accuracy(answers, truth) < 0.35
    assert m.cross_contradiction(answers) > 0.9


def test_answer_metrics_reject_empty_inputs():
    for fn in (m.self_consistency, m.cross_contradiction):
        with pytest.raises(ValueError):
            fn([])
        with pytest.raises(ValueError, match="question 1"):
            fn([["a"], []])
    with pytest.raises(ValueError):
        m.accuracy([], [])
    with pytest.raises(ValueError, match="2 answer groups but 1 truths"):
        m.accuracy([["a"], ["b"]], ["a"])


def test_intext_contradiction():
    bios = [
        {"birth_city": ["Boston", "Boston"], "major": ["Music"]},  # repeated, not contradicting
        {"birth_city": ["Boston", "Denver"], "major": []},  # contradiction
        {"birth_city": [], "major": ["Music", "Physics", "Music"]},  # contradiction
        {},  # states nothing
    ]
    # 2 of 4 bios contradict themselves
    assert m.intext_contradiction(bios) == pytest.approx(0.5)
    assert m.intext_contradiction([]) == 0.0


def test_coherence():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0]])
    # cosines 1, -1, 0 -> mean 0
    assert m.coherence(a, b) == pytest.approx(0.0, abs=1e-6)
    # identical rows -> 1, also from bf16 input (computed in fp32)
    assert m.coherence(a.bfloat16(), a.bfloat16()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        m.coherence(a, b[:2])
    with pytest.raises(ValueError):
        m.coherence(torch.zeros(0, 2), torch.zeros(0, 2))


def test_perplexity():
    # nll 2 ln 3 over 2 tokens -> exp(ln 3) = 3
    assert m.perplexity(2 * math.log(3), 2) == pytest.approx(3.0)
    assert m.perplexity(0.0, 5) == 1.0
    assert m.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        m.perplexity(1.0, 0)


def test_bits_per_byte():
    # 8 ln 2 nats = 8 bits over 4 bytes -> 2 bits per byte
    assert m.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        m.bits_per_byte(1.0, 0)


def test_calibration_error_by_hand_and_from_a_model():
    # bin 0: 2 predictions, confidence 0.1 + 0.3, one right -> |1 - 0.4| = 0.6; bin 1: 1 prediction,
    # confidence 0.9, right -> 0.1. ECE = (0.6 + 0.1) / 3.
    assert m.calibration_error([2, 1], [0.4, 0.9], [1, 1]) == pytest.approx(0.7 / 3)
    assert m.calibration_error([0, 0], [0, 0], [0, 0]) == 0.0

    # A "model" whose logits are fixed: every position is 80 % sure of token 0, and the next token is
    # token 0 in 4 of 5 positions -> perfectly calibrated (ECE 0); always right -> ECE 0.2.
    from stablekd.evaluation import report
    from tests.fixed_model import LogitsLM

    def trunk(input_ids, **_):
        logits = torch.full((*input_ids.shape, 5), math.log(0.05))
        logits[..., 0] = math.log(0.8)
        return logits

    Fixed = lambda: LogitsLM(trunk, 5, rows=2)  # noqa: E731  (chunks of 2 rows: the bins add up across chunks)

    ids = torch.tensor([[1, 0, 0, 0, 0, 2]])  # targets of positions 0..4: 0, 0, 0, 0, 2
    _, n, ece, bpb = report.held_out_scores(Fixed(), [{"input_ids": ids, "labels": ids}])
    assert n == 5 and ece == pytest.approx(0.0, abs=1e-6) and bpb is None
    # Bits per byte: the same NLL in bits over the bytes of the counted tokens (token 0: 2 bytes, 2: 3).
    scored = report.held_out_scores(
        Fixed(), [{"input_ids": ids, "labels": ids}], byte_lengths=np.array([2, 1, 3, 1, 1])
    )
    nll_bits = -(4 * math.log2(0.8) + math.log2(0.05))
    assert scored.bits_per_byte == pytest.approx(nll_bits / (4 * 2 + 3), rel=1e-6)
    right = torch.tensor([[1, 0, 0, 0, 0, 0]])
    assert report.held_out_scores(Fixed(), [{"input_ids": right, "labels": right}])[2] == pytest.approx(
        0.2, abs=1e-6
    )


def test_a_new_metric_of_generated_text_is_one_entry_in_metrics(monkeypatch):
    """CONTRIBUTING, Adding a metric: a function, its METRICS row and its CONTINUATION_METRICS entry, all in
    evaluation/metrics.py; the report computes it, sizes it, shows it missing when too little was generated
    and labels it in report.md without a change to evaluation/report.py."""
    from stablekd.evaluation import report

    assert set(m.CONTINUATION_METRICS) <= set(m.METRICS)  # every computed key has its row
    monkeypatch.setitem(m.METRICS, "mean_words", ("mean words per continuation", "greedy"))
    monkeypatch.setitem(
        m.CONTINUATION_METRICS,
        "mean_words",
        ("greedy", lambda texts: sum(len(t.split()) for t in texts) / len(texts)),
    )
    cont = report.Continuations(greedy=["a b c", "a b c d e"], samples=[["x y", "x y"], ["z", "z w"]])
    values = report.degeneration(cont)
    assert values["mean_words"] == 4.0 and values["rep_2"] == pytest.approx(
        100 / 3
    )  # "a b", "b c" twice of 6
    assert values["distinct_2"] == pytest.approx((1 / 2 + 1) / 2)
    cfg = SimpleNamespace(max_new_tokens=4, samples=2)  # the ProbeSettings fields it reads
    sizes, missing = report.continuation_sizes(2, cfg)
    assert sizes["mean_words"] == "2 held-out prefixes × 4 tokens" and "mean_words" in missing
    text = report.markdown({"models": {"teacher": values}}, {})
    assert "| mean words per continuation (`mean_words`) | 4.000 |" in text
    assert report.degeneration(report.Continuations(["a b"], [])).keys() == {
        "rep_2",
        "rep_3",
        "rep_4",
        "diversity",
        "mean_words",
    }
