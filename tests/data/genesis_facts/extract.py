"""Extract the Genesis fact set from the KJV text in tests/data (deterministic; rerun to regenerate).

    python tests/data/genesis_facts/extract.py

Reads ../kjv_genesis_exodus.txt (public domain, see ../README.md) and writes beside this script:

    prose.txt         the Genesis paragraphs that state a fact, with their neighbours: the text as printed
    qa.jsonl          question/answer records: every fact asked in two of its relation's three forms
    heldout.jsonl     every fact asked in its third form (fact i: form i mod 3), the report's probe: no
                      held-out question is a training record, yet every fact and every question form is
                      trained (the fact in the other forms, the form on other facts)
    heldout_prose.txt genealogies of Exodus and Genesis paragraphs far from any fact: held-out perplexity and
                      the prefixes of the degeneration metrics

Facts are what the verses say, found by patterns on the text itself (nothing is generated but the
question wording): whom a patriarch begat and at what age ("And Seth lived an hundred and five years, and
begat Enos"), how long he lived after ("lived after he begat Enos eight hundred and seven years"), all his
days ("all the days of Seth were nine hundred and twelve years"), and the sons listed of a man ("The sons
of Ham; Cush, and Mizraim, and Phut, and Canaan"). Answers are the verse's own words. A subject asked the
same question twice with different answers in the text is dropped (the answer must be unique).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parent / "kjv_genesis_exodus.txt"
EXODUS_STARTS = "Now these are the names of the children of Israel"
MAX_LIST = 5  # sons lists of at most this many names: answers a small model can state in one line

NAME = r"([A-Z][a-z]+)"
NAMES = r"([A-Z][a-z]+(?:,? (?:and )?[A-Z][a-z]+)*)"  # "Abram, Nahor, and Haran"
NUM = r"([a-z][a-z ]*?)"  # KJV number words: "an hundred eighty and seven"
PATTERNS = {
    "age": re.compile(rf"(?:And )?{NAME} (?:lived|was) {NUM} years?(?: old)?,? and begat {NAMES}"),
    "begat": re.compile(rf"(?:And )?{NAME} begat {NAMES}"),
    "after": re.compile(rf"And {NAME} lived after he begat {NAME} {NUM} years"),
    "days": re.compile(rf"[Aa]ll the days of {NAME} were {NUM} years"),
    "sons": re.compile(rf"[Tt]he sons of {NAME}; ([A-Z][A-Za-z ,]+?)[.:;]"),
}
# Per relation: three question forms; each fact is held out in one of them (rotating).
QUESTIONS = {
    "son": ("Whom did {x} beget?", "Who was born to {x}?", "Name the child that {x} begat."),
    "age": (
        "How old was {x} when he begat {y}?",
        "At what age did {x} beget {y}?",
        "How many years had {x} lived when {y} was born to him?",
    ),
    "after": (
        "How many years did {x} live after he begat {y}?",
        "After {y} was born, how long did {x} live?",
        "For how many years did {x} live on after begetting {y}?",
    ),
    "days": (
        "How long did {x} live in all?",
        "How many were all the days of {x}?",
        "What was the whole lifespan of {x}?",
    ),
    "sons": ("Who were the sons of {x}?", "Name the sons of {x}.", "Which sons did {x} have?"),
}


def paragraphs() -> tuple[list[str], list[str]]:
    paras = SOURCE.read_text().split("\n\n")
    split = next(i for i, p in enumerate(paras) if EXODUS_STARTS in p)
    return paras[:split], paras[split:]


def facts(text: str) -> list[tuple[str, str, str, str]]:
    """(relation, subject, other person or "", answer) in the order the text states them; ambiguous dropped."""
    flat = " ".join(text.split())
    found: dict[tuple[str, str], tuple[str, str]] = {}
    ambiguous: set[tuple[str, str]] = set()

    def add(rel: str, x: str, y: str, answer: str) -> None:
        key = (rel, x)
        if key in found and found[key] != (y, answer):
            ambiguous.add(key)
        found.setdefault(key, (y, answer))

    for x, n, y in PATTERNS["age"].findall(flat):
        add("age", x, re.findall(NAME, y)[0], f"{n} years")
        add("son", x, "", y)
    for x, y in PATTERNS["begat"].findall(flat):
        if ("son", x) not in found and len(re.findall(NAME, y)) <= MAX_LIST:
            add("son", x, "", y)
    for x, y, n in PATTERNS["after"].findall(flat):
        add("after", x, y, f"{n} years")
    for x, n in PATTERNS["days"].findall(flat):
        add("days", x, "", f"{n} years")
    for x, names in PATTERNS["sons"].findall(flat):
        if 2 <= len(re.findall(NAME, names)) <= MAX_LIST:
            add("sons", x, "", names.strip())
    return [(rel, x, y, a) for (rel, x), (y, a) in found.items() if (rel, x) not in ambiguous]


def record(rel: str, x: str, y: str, answer: str, form: int) -> dict:
    return {"prompt": f"Q: {QUESTIONS[rel][form].format(x=x, y=y)}\nA:", "response": f" {answer}."}


def main(out: Path = HERE) -> None:
    genesis, exodus = paragraphs()
    flat = [" ".join(p.split()) for p in genesis]
    stating = {i for i, p in enumerate(flat) if any(pat.search(p) for pat in PATTERNS.values())}
    keep = sorted({j for i in stating for j in (i - 1, i, i + 1) if 0 <= j < len(genesis)})
    prose = [genesis[i] for i in keep]
    far = [i for i in range(len(genesis)) if all(abs(i - k) > 2 for k in keep)][::12]
    held_prose = [p for p in exodus if "sons of" in p][:8] + [genesis[i] for i in far]
    all_facts = facts("\n\n".join(prose))
    (out / "prose.txt").write_text("\n\n".join(prose) + "\n")
    (out / "heldout_prose.txt").write_text("\n\n".join(held_prose) + "\n")
    forms = len(next(iter(QUESTIONS.values())))
    with (out / "qa.jsonl").open("w") as f:
        for shift in range(1, forms):
            for i, fact in enumerate(all_facts):
                f.write(json.dumps(record(*fact, (i + shift) % forms)) + "\n")
    with (out / "heldout.jsonl").open("w") as f:
        for i, fact in enumerate(all_facts):
            f.write(json.dumps(record(*fact, i % forms)) + "\n")
    print(f"{len(prose)} paragraphs, {len(all_facts)} facts, {len(held_prose)} held-out paragraphs")


if __name__ == "__main__":
    main()
