"""Labels of candidate groups without a truth table (data_pipeline/answers.py): by a task's reference
response and by the teacher's majority answer; where an answer ends and when two answers are one."""

from __future__ import annotations

import pytest

from stablekd.data_pipeline.answers import answer, answer_key, judge_answers, majority, normalize


def test_an_answer_is_the_first_line_or_sentence_normalised():
    assert normalize("  Nine  Hundred and\tFive years. ") == "nine hundred and five years"
    assert answer(" Enos.") == answer("enos") == answer("ENOS!") == "enos"
    assert answer(" Enos.\nQ: Whom did Enos beget?\nA: Cainan.") == "enos"  # the next question is not it
    assert answer(" Enos. And Seth lived after he begat Enos") == "enos"  # the first sentence
    assert answer(" Gomer, and Magog, and Madai.") == "gomer, and magog, and madai"  # commas stay inside
    assert answer(" 3.5 years") == "3.5 years"  # a decimal point is no sentence end
    assert answer("   ") is None and answer(" ...") is None
    assert answer("\nEnos") == "enos"  # leading whitespace is no empty first line
    assert answer(" Enos; Cainan", stop=";") == "enos"  # data.answer_stop
    assert answer_key("enos") == answer_key(answer(" Enos.")) >= 0 and answer_key("enos") != answer_key(
        "seth"
    )


def _texts(*rows: str) -> list[str]:
    return list(rows)


def test_reference_labels_matching_samples_positive_and_others_hard_negatives():
    # four teacher samples, then the gold row: the task record's reference response
    texts = _texts(" Enos.", " enos", " Cainan.", "\n", " Enos.")
    j = judge_answers(texts, voters=4, gold=True, reference=True, rule="auto")
    assert j.rule == "reference" and j.known
    assert j.verdicts == [1, 1, -1, 0, 1]  # match, match (normalised), contradiction, no answer, the gold
    assert j.truth_key == answer_key("enos") == j.keys[0] == j.keys[1] and j.keys[3] == -1
    # rule=reference leaves a group without one unlabelled; rule=majority ignores the reference
    assert judge_answers(texts, 4, True, False, "reference").rule == "unlabelled"
    m = judge_answers(_texts(" Cainan.", " Cainan", " Enos.", " x", " Enos."), 4, True, True, "majority")
    assert m.rule == "majority" and m.verdicts == [1, 1, -1, -1, 0]  # the gold row neither votes nor counts


def test_majority_vote_on_hand_made_groups():
    # a clear majority: agreeing samples positive, the minority hard negatives, no answer left out
    j = majority(["enos", "enos", "cainan", None, "enos"], voters=4, gold=True)
    assert j.rule == "majority" and j.verdicts == [1, 1, -1, 0, 0] and j.truth_key == answer_key("enos")
    # a tie at the top: unlabelled, every row left out
    tie = majority(["enos", "cainan", "enos", "cainan"], voters=4, gold=False)
    assert tie.rule == "unlabelled" and tie.verdicts == [0] * 4 and tie.truth_key == -1 and tie.known
    # all different: no answer has two votes
    assert majority(["a", "b", "c", "d"], voters=4, gold=False).rule == "unlabelled"
    # nothing parseable
    assert majority([None, None, None, None], voters=4, gold=False).rule == "unlabelled"
    # a plurality is enough when the runner-up has fewer votes
    assert majority(["a", "a", "b", "c"], voters=4, gold=False).verdicts == [1, 1, -1, -1]
    # only the voters vote: the gold row's answer cannot break a tie
    assert majority(["a", "b", "a", "b", "a"], voters=4, gold=True).rule == "unlabelled"
    # rows after the voters (the student's own samples) are judged without voting; the gold row is not
    own = majority(["a", "a", "b", "a", "c", None, "a"], voters=3, gold=True)
    assert own.verdicts == [1, 1, -1, 1, -1, 0, 0]
    assert majority(["a", "b", "c", "a", "a"], voters=3, gold=False).rule == "unlabelled"
    # keys still let other contexts' rows drop out as false negatives in an unlabelled group
    assert tie.keys == [answer_key("enos"), answer_key("cainan")] * 2


def test_the_default_stop_is_what_the_config_says():
    from stablekd.launcher.config import ConfigError, ExperimentConfig

    # The config's default ends an answer at the first line or sentence, as its help says, and the
    # functions' own default (the task probe's, called without a stop) cuts the same texts alike.
    stop = ExperimentConfig().data.answer_stop
    cases = {
        " Enos. He begat Cainan.": "enos",
        " Enos\nQ: who begat Cainan?": "enos",
        " Enos! And Seth": "enos",
        " 3.5 cubits high": "3.5 cubits high",  # a dot inside a number ends no sentence
        " Enos begat Cainan": "enos begat cainan",
    }
    for text, expected in cases.items():
        assert answer(text, stop=stop) == answer(text) == expected, text
    with pytest.raises(ConfigError, match="answer_stop: not a regular expression"):
        from stablekd.launcher.config import DataConfig

        DataConfig(answer_stop="(")
