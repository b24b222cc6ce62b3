"""The real-text proving ground: the whole King James Bible as a corpus held out by books, and a fact set
over what its prose states (deterministic; rerun to regenerate).

    apt-get install bible-kjv-text                      # the text (public domain), its `bible` program
    python benchmarks/kjv_corpus.py runs/kjv/corpus     # ~2 s

Reads every verse with `bible -f Ge1:1-Rev22:21` (or --verses FILE: lines "Ge1:1 In the beginning ...",
what that command prints) and writes into OUT:

    train/NN_Book.txt       the 59 training books: every five verses of a chapter one paragraph, hard-wrapped
                            at 72 columns, paragraphs separated by a blank line (the corpus reader's unit)
    heldout/NN_Book.txt     the 7 held-out books, whole (HELDOUT: one of each kind of book: history, wisdom,
                            two prophets, a gospel, two epistles): bits per byte and the prefixes of the
                            degeneration metrics; nothing of them is trained on, no fact comes from them
    qa.jsonl                question/answer records of the asked facts, each in two of its relation's three
                            question forms
    probe_rephrased.jsonl   kind (a): every asked fact in its third form (fact i: form i mod 3): the fact and
                            the form are trained, this phrasing of this fact is not
    probe_unasked.jsonl     kind (b): facts the training prose states that no training record asks (every
                            UNASKED_EVERY-th fact of each relation), each in one form (trained on other facts)
    mixed.jsonl             the fine-tuning and distillation data: every training paragraph ({"text": ...}, in
                            book order) with the qa.jsonl records spread evenly among them, QA_REPEAT times
                            each (~31 % of the tokens): the facts are asked often enough to be learned, the
                            prose keeps the model a model of the language
    facts.json              every fact: relation, subject, other person, answer, kind, where the text states it
    manifest.json           counts and the sha256 of each file (what a test compares to see the build is the same)

Facts are what the verses say, found by patterns on the flattened prose of the training books (nothing is
generated but the question wording): whom a man begat (and at what age), how long he lived after, all his
days, the sons of a man, whose son someone was, a king's age when he began to reign, how long and where he
reigned, his mother's name, where someone was buried. Answers are the text's own words. A subject asked
the same question with different answers anywhere in the training text is dropped (the answer must be
unique); the same for a father named with two sons of the same name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import textwrap
from pathlib import Path

# (abbreviation `bible -f` prints, the name of the book's file), in canonical order
BOOKS = [
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"), ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"), ("1Sm", "1_Samuel"), ("2Sm", "2_Samuel"),
    ("1Ki", "1_Kings"), ("2Ki", "2_Kings"), ("1Chr", "1_Chronicles"), ("2Chr", "2_Chronicles"),
    ("Ezra", "Ezra"), ("Neh", "Nehemiah"), ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"),
    ("Prv", "Proverbs"), ("Eccl", "Ecclesiastes"), ("SSol", "Song_of_Solomon"), ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"),
    ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"),
    ("Nahum", "Nahum"), ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"),
    ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"),
    ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "1_Corinthians"), ("2Cor", "2_Corinthians"),
    ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1_Thessalonians"), ("2Th", "2_Thessalonians"), ("1Tim", "1_Timothy"), ("2Tim", "2_Timothy"),
    ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"), ("Jas", "James"), ("1Pet", "1_Peter"),
    ("2Pet", "2_Peter"), ("1Jn", "1_John"), ("2Jn", "2_John"), ("3Jn", "3_John"), ("Jude", "Jude"),
    ("Rev", "Revelation"),
]  # fmt: skip
HELDOUT = ("Ruth", "Eccl", "Jonah", "Mic", "Mark", "Gal", "1Jn")
VERSES_PER_PARAGRAPH = 5
WIDTH = 72
MAX_LIST = 5  # lists of at most this many names: an answer a small model can state in one line
UNASKED_EVERY = 4  # every 4th fact of each relation is never asked in training (kind b)
# Each training question appears this many times in mixed.jsonl. 6 (~9 % of the tokens) taught a 10M teacher
# no fact in 450 steps (exact match 0.005); 30 reached 0.47 on rephrased questions in 600 (docs/results.md).
QA_REPEAT = 30

NAME = r"([A-Z][a-z]+)"
# "Abram, Nahor, and Haran"; a name that begins the next clause ("Kish, and Kish begat Saul") is not listed
NAMES = r"([A-Z][a-z]+(?:,? (?:and )?[A-Z][a-z]+\b(?! begat))*)"
NUM = r"([a-z][a-z ]*?)"  # KJV number words: "an hundred eighty and seven"
# Capitalised words that are no person (a sentence start, a title, a land): never a subject or a listed name
NOT_A_NAME = frozenset(
    "And The Then But For Now So Thus Behold Lord God Son Man King Israel Judah Egypt".split()
)
PATTERNS = {
    "age": re.compile(rf"\b{NAME} (?:lived|was) {NUM} years?(?: old)?,? and begat {NAMES}"),
    "begat": re.compile(rf"\b{NAME} begat {NAMES}"),
    "after": re.compile(rf"\b{NAME} lived after he begat {NAME} {NUM} years"),
    "days": re.compile(rf"[Aa]ll the days of {NAME} were {NUM} years"),
    "sons": re.compile(rf"[Tt]he sons of {NAME}; ([A-Z][A-Za-z ,]+?)[.:;]"),
    "father": re.compile(rf"\b{NAME},? the son of {NAME}\b"),
    "reign": re.compile(
        rf"\b{NAME} was {NUM} years old when he began to reign[;,] and he reigned {NUM} years? in {NAME}"
        rf"(?:[^.]*\. And his mother's name was {NAME})?"
    ),
    "buried": re.compile(
        rf"\b{NAME}(?: the son of {NAME})? (?:died|slept with his fathers),? and was buried "
        rf"(?:with his fathers )?in ((?:the city of )?[A-Z][a-z]+)"
    ),
    "wife": re.compile(rf"[Tt]he name of {NAME}'s wife(?: was)?,? {NAME}"),
}
# Per relation: three question forms; an asked fact is trained in two and probed in the third (rotating)
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
    "days": ("How long did {x} live in all?", "How many were all the days of {x}?", "What was the whole lifespan of {x}?"),
    "sons": ("Who were the sons of {x}?", "Name the sons of {x}.", "Which sons did {x} have?"),
    "father": ("Whose son was {x}?", "Who was the father of {x}?", "Name the father of {x}."),
    "reign_age": (
        "How old was {x} when he began to reign?",
        "At what age did {x} begin to reign?",
        "How many years old was {x} when he became king?",
    ),
    "reign_years": ("How long did {x} reign?", "How many years did {x} reign?", "For how many years was {x} king?"),
    "reign_city": ("Where did {x} reign?", "In which city did {x} reign?", "From what city did {x} rule as king?"),
    "mother": ("Who was the mother of {x}?", "What was the name of the mother of {x}?", "Name the mother of {x}."),
    "buried": ("Where was {x} buried?", "In what place was {x} buried?", "Name the place where {x} was buried."),
    "wife": ("Who was the wife of {x}?", "What was the name of the wife of {x}?", "Name the wife of {x}."),
}  # fmt: skip
FORMS = 3
LISTS = ("son", "sons", "father", "mother", "wife")  # relations whose answer is people


def read_verses(path: Path | None) -> list[tuple[str, int, str]]:
    """(book abbreviation, chapter, text) per verse: from `path`, else from the `bible` program."""
    if path is None:
        try:
            out = subprocess.run(
                ["bible", "-f", "Ge1:1-Rev22:21"], capture_output=True, text=True, check=True
            )
        except FileNotFoundError:
            raise SystemExit("the `bible` program is missing: apt-get install bible-kjv-text") from None
        lines = out.stdout.splitlines()
    else:
        lines = path.read_text().splitlines()
    known = {abbr for abbr, _ in BOOKS}
    verses = []
    for n, line in enumerate(lines, 1):
        m = re.match(r"([1-3]?[A-Za-z]+)(\d+):\d+ (.*)$", line)
        if not m or m.group(1) not in known:
            raise SystemExit(f"{path or 'bible -f'}: line {n}: expected 'Book C:V text', got {line[:60]!r}")
        verses.append((m.group(1), int(m.group(2)), m.group(3).strip()))
    return verses


def book_texts(verses: list[tuple[str, int, str]]) -> dict[str, str]:
    """Each book's text: every VERSES_PER_PARAGRAPH verses of a chapter one paragraph, wrapped at WIDTH."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for book, chapter, text in verses:
        chapters.setdefault((book, chapter), []).append(text)
    paragraphs: dict[str, list[str]] = {}
    for (book, _), texts in chapters.items():
        for i in range(0, len(texts), VERSES_PER_PARAGRAPH):
            para = " ".join(texts[i : i + VERSES_PER_PARAGRAPH])
            paragraphs.setdefault(book, []).append(textwrap.fill(para, WIDTH, break_on_hyphens=False))
    return {book: "\n\n".join(paras) + "\n" for book, paras in paragraphs.items()}


def _names(s: str) -> list[str]:
    return re.findall(NAME, s)


def facts(books: dict[str, str]) -> list[dict]:
    """Every fact the books state, in text order: relation, subject x, other person y ("" if none), answer,
    the book stating it first and how often the text states it; questions with two answers dropped."""
    found: dict[tuple[str, str], dict] = {}
    ambiguous: set[tuple[str, str]] = set()

    def add(rel: str, x: str, y: str, answer: str, book: str) -> None:
        if x in NOT_A_NAME or y in NOT_A_NAME or (rel in LISTS and set(_names(answer)) & NOT_A_NAME):
            return
        key = (rel, x)
        if key in found:
            if (found[key]["y"], found[key]["answer"]) != (y, answer):
                ambiguous.add(key)
            found[key]["stated"] += 1
            return
        found[key] = {"relation": rel, "x": x, "y": y, "answer": answer, "book": book, "stated": 1}

    for book, text in books.items():
        flat = " ".join(text.split())
        for x, n, y in PATTERNS["age"].findall(flat):
            add("age", x, _names(y)[0], f"{n} years", book)
            add("son", x, "", y, book)
        for x, y in PATTERNS["begat"].findall(flat):
            if len(_names(y)) <= MAX_LIST and ("son", x) not in found:
                add("son", x, "", y, book)
        for x, y, n in PATTERNS["after"].findall(flat):
            add("after", x, y, f"{n} years", book)
        for x, n in PATTERNS["days"].findall(flat):
            add("days", x, "", f"{n} years", book)
        for x, names in PATTERNS["sons"].findall(flat):
            if 2 <= len(_names(names)) <= MAX_LIST:
                add("sons", x, "", names.strip(), book)
        for x, y in PATTERNS["father"].findall(flat):
            add("father", x, "", y, book)
        for x, age, years, city, mother in PATTERNS["reign"].findall(flat):
            add("reign_age", x, "", f"{age} years old", book)
            add("reign_years", x, "", f"{years} years", book)
            add("reign_city", x, "", f"in {city}", book)
            if mother:
                add("mother", x, "", mother, book)
        for x, _, place in PATTERNS["buried"].findall(flat):
            add("buried", x, "", f"in {place}", book)
        for x, y in PATTERNS["wife"].findall(flat):
            add("wife", x, "", y, book)
    kept = [f for key, f in found.items() if key not in ambiguous]
    per_relation: dict[str, int] = {}
    for f in kept:  # every UNASKED_EVERY-th fact of a relation is kind (b): stated, never asked
        i = per_relation.get(f["relation"], 0)
        per_relation[f["relation"]] = i + 1
        f["kind"] = "unasked" if i % UNASKED_EVERY == UNASKED_EVERY - 1 else "asked"
        f["form"] = i % FORMS  # the probe's form
    return kept


def record(fact: dict, form: int) -> dict:
    q = QUESTIONS[fact["relation"]][form].format(x=fact["x"], y=fact["y"])
    return {"prompt": f"Q: {q}\nA:", "response": f" {fact['answer']}."}


def mixed(texts: list[str], qa: list[dict]) -> list[dict]:
    """Every paragraph of `texts` as a text record, with the `qa` records spread evenly among them."""
    paras = [{"text": " ".join(p.split())} for t in texts for p in t.split("\n\n")]
    out, q = [], 0
    for i, para in enumerate(paras, 1):
        out.append(para)
        while q < len(qa) and q * len(paras) < i * len(qa):  # q/len(qa) of the way once i/len(paras) is
            out.append(qa[q])
            q += 1
    return out


def build(out: Path, verses: list[tuple[str, int, str]]) -> dict:
    """Write the corpus and the fact set into `out` (see the module doc); returns the manifest."""
    texts = book_texts(verses)
    order = {abbr: i for i, (abbr, _) in enumerate(BOOKS, 1)}
    names = dict(BOOKS)
    train = {b: t for b, t in texts.items() if b not in HELDOUT}
    for sub in ("train", "heldout"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for book, text in texts.items():
        sub = "heldout" if book in HELDOUT else "train"
        (out / sub / f"{order[book]:02d}_{names[book]}.txt").write_text(text)
    all_facts = facts(train)
    asked = [f for f in all_facts if f["kind"] == "asked"]
    unasked = [f for f in all_facts if f["kind"] == "unasked"]
    qa = [record(f, (f["form"] + s) % FORMS) for s in range(1, FORMS) for f in asked]
    write_jsonl(out / "qa.jsonl", qa)
    write_jsonl(out / "mixed.jsonl", mixed(list(train.values()), qa * QA_REPEAT))
    write_jsonl(out / "probe_rephrased.jsonl", [record(f, f["form"]) for f in asked])
    write_jsonl(out / "probe_unasked.jsonl", [record(f, f["form"]) for f in unasked])
    (out / "facts.json").write_text(json.dumps(all_facts, indent=1) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {
        "verses": len(verses),
        "train_books": len(train),
        "heldout_books": [names[b] for b in HELDOUT if b in texts],
        "train_bytes": sum(len(t.encode()) for t in train.values()),
        "heldout_bytes": sum(len(t.encode()) for b, t in texts.items() if b in HELDOUT),
        "facts": {"asked": len(asked), "unasked": len(unasked)},
        "relations": {r: sum(f["relation"] == r for f in all_facts) for r in QUESTIONS},
        "sha256": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--verses", type=Path, help="a file of `bible -f` lines instead of the bible program")
    a = p.parse_args()
    m = build(a.out, read_verses(a.verses))
    print(
        f"{a.out}: {m['train_books']} training books ({m['train_bytes']:,} bytes), held out "
        f"{', '.join(m['heldout_books'])} ({m['heldout_bytes']:,} bytes); facts asked {m['facts']['asked']}, "
        f"unasked {m['facts']['unasked']}: {m['relations']}"
    )


if __name__ == "__main__":
    main()
