"""Answers in generated text: where an answer ends, its normal form, and labels of candidate groups by a
reference response or by the teacher's majority answer (docs/architecture.md, Contrastive).

The answer of a continuation is its text up to the first match of `data.answer_stop` (default: the first
line or the first sentence), normalised (`normalize`: case, runs of whitespace, punctuation at either end),
so " Enos." and "enos" are one answer and "Enos.\\nQ: ..." answers "enos". An empty answer is none
(unparseable). The task probe compares answers the same way (evaluation/task_probe.py).

A group's labels (`Judgement`), one rule per group:
- reference: the context is a task prompt and the group's gold row its reference response. Rows whose
  answer equals the reference's are positives (+1, the gold row among them), other answers hard negatives
  (−1), rows without an answer left out (0).
- majority (self-consistency as the label, after ScPO): the teacher's M samples vote; the answer given
  by the most samples, at least 2 of them and no tie, is the group's: rows giving it are positives,
  other answers hard negatives (rows after the voters, such as the student's own samples, are judged but
  do not vote). The gold row does not vote and is left out (corpus text, not a teacher answer: it may
  state more or other than the first sentence the others are compared on). Ties, all-different samples
  and groups with no answer are unlabelled: every row left out.
Answer keys (crc32 of the normal form) let the contrastive loss drop another context's row that gives
this context's answer from its negatives.
"""

from __future__ import annotations

import re
import string
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

ANSWER_STOP = r"\n|(?<=[.!?])\s"  # the first line, or the first sentence
_EDGES = string.whitespace + string.punctuation
RULES = ("reference", "majority", "unlabelled")


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space, whitespace and punctuation stripped from both ends."""
    return " ".join(text.lower().split()).strip(_EDGES)


def answer(text: str, stop: str = ANSWER_STOP) -> str | None:
    """The normalised answer `text` gives (its start, up to the first match of `stop`); None when empty."""
    head = re.split(stop, text.lstrip(), maxsplit=1)[0]
    return normalize(head) or None


def answer_key(value: str) -> int:
    """A stable non-negative id of an answer: rows of different contexts giving one answer share it."""
    return zlib.crc32(value.encode())


class Judgement(NamedTuple):
    verdicts: list[int]  # per row: +1 positive, -1 hard negative (contradiction), 0 left out
    keys: list[int]  # per row: answer key of the answer it gives, -1 when none
    truth_key: int  # answer key of the group's answer (reference or majority), -1 when unlabelled
    known: bool  # the group is labelled: verdict 0 means "left out", not "no label"
    attribute: int  # bios: index of the attribute a question asks; -1 otherwise
    rule: str = "unlabelled"  # truth (bios), reference, majority, unlabelled


def continuation_texts(tok, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[str]:
    """Each continuation's text: decode(context + continuation) minus decode(context), since SentencePiece
    drops a leading space when a piece is decoded alone."""
    ctx = tok.decode(list(context_ids), skip_special_tokens=True)
    return [tok.decode([*context_ids, *c], skip_special_tokens=True)[len(ctx) :] for c in continuations]


def _keys(answers: Sequence[str | None]) -> list[int]:
    return [-1 if a is None else answer_key(a) for a in answers]


def _unlabelled(answers: Sequence[str | None]) -> Judgement:
    return Judgement([0] * len(answers), _keys(answers), -1, True, -1, "unlabelled")


def _against(answers: Sequence[str | None], truth: str, rule: str, leave_out: Sequence[bool]) -> Judgement:
    verdicts = [
        0 if a is None or out else (1 if a == truth else -1)
        for a, out in zip(answers, leave_out, strict=True)
    ]
    return Judgement(verdicts, _keys(answers), answer_key(truth), True, -1, rule)


def by_reference(answers: Sequence[str | None], reference: str | None) -> Judgement:
    """Label rows by the reference answer (the gold row's); unlabelled when the reference has no answer."""
    if reference is None:
        return _unlabelled(answers)
    return _against(answers, reference, "reference", [False] * len(answers))


def majority(answers: Sequence[str | None], voters: int, gold: bool) -> Judgement:
    """Label rows by the answer most of the first `voters` rows give (>= 2 votes, no tie); the rows after
    them are judged by it, but the gold row (the last, with `gold`) is left out. Unlabelled on a tie,
    all-different answers or none."""
    votes = Counter(a for a in answers[:voters] if a is not None).most_common(2)
    if not votes or votes[0][1] < 2 or (len(votes) == 2 and votes[1][1] == votes[0][1]):
        return _unlabelled(answers)
    leave_out = [gold and i == len(answers) - 1 for i in range(len(answers))]
    return _against(answers, votes[0][0], "majority", leave_out)


def judge_answers(
    texts: Sequence[str], voters: int, gold: bool, reference: bool, rule: str, stop: str = ANSWER_STOP
) -> Judgement:
    """Label one group's rows (texts: the M teacher samples, any further samples to judge, then the gold
    row when `gold`).

    rule "auto": by the reference when the group has one (`reference`: the gold row is a task record's
    reference response), else by majority; "reference": groups without one are unlabelled; "majority":
    every group by majority, the reference unused.
    """
    answers = [answer(t, stop) for t in texts]
    if rule == "majority" or (rule == "auto" and not reference):
        return majority(answers, voters, gold)
    if not reference:
        return _unlabelled(answers)
    return by_reference(answers, answers[-1])
