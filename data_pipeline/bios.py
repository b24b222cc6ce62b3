"""The built-in corpus: synthetic biographies after bioS ("Physics of Language Models" 3.1).

Every person has a three-part name (first, middle, last; unique over trained and unseen people) and six
attributes. A biography is one line: one sentence per attribute, each sentence drawn from that
attribute's paraphrase templates, sentences in a random order. The ground truth stays beside the text,
so the probe (evaluation/bios_probe.py) can ask a question, parse the answer with the same templates
and count exactly how often a model is right, agrees with itself or contradicts itself.

Held-out text: the space of template combinations (one template index per attribute, 7**6 = 117,649
combinations) is split once, by a fixed hash, into a train part and a held-out part (~1/8). Train bios
draw only train combinations, held-out bios only held-out ones, so perplexity on `heldout` measures
text the model has never seen word for word, about people it has. `unseen` people appear in no text.

Everything is a pure function of the arguments: one `random.Random(seed)`, no global state, no I/O
except `write_corpus` / `load_truth`.

Formats a user of the API must know:
- dates read "May 3, 1987" (full English month, day without zero padding, four-digit year);
- no value contains a period, so a period always ends a sentence;
- `parse_answer` recognises only known values (the embedded lists) at the start of a continuation;
  `extract_attributes` accepts any value a template frames (a date-shaped one for birth_date), so a
  made-up value in a free biography still counts as a stated value.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stablekd.data_pipeline.files import atomic_write

ATTRIBUTES: tuple[str, ...] = (
    "birth_date",
    "birth_city",
    "university",
    "major",
    "employer",
    "employer_city",
)

TRUTH_FORMAT = "stablekd-bios-truth"
TRUTH_VERSION = 1

# First names double as middle names; first names and surnames are disjoint and no surname is a prefix
# of another, so one full name never occurs inside another person's text (tests check both).
FIRST_NAMES: tuple[str, ...] = (
    "Anna", "Boris", "Clara", "Daniel", "Elena", "Felix", "Greta", "Hugo", "Ingrid", "Jonas",
    "Karin", "Lukas", "Maria", "Nils", "Olga", "Pavel", "Rosa", "Stefan", "Tanja", "Viktor",
    "Wanda", "Yusuf", "Zoe", "Amir", "Bianca", "Carlos", "Dora", "Emil", "Fiona", "Gustav",
    "Helena", "Ivan", "Julia", "Kenji", "Lena", "Marco", "Nadia", "Oscar", "Petra", "Quentin",
    "Ruth", "Samuel", "Teresa", "Ulrich", "Vera", "Walter", "Ximena", "Yara", "Alma", "Bruno",
    "Celia", "Dmitri", "Esther", "Farid",
)  # fmt: skip
SURNAMES: tuple[str, ...] = (
    "Abbott", "Brennan", "Castillo", "Dalton", "Eriksen", "Fischer", "Garland", "Holloway", "Iverson",
    "Jansen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quinlan", "Rossi",
    "Sandoval", "Thornton", "Underwood", "Vasquez", "Whitfield", "Yamamoto", "Zimmer", "Ashworth",
    "Blackwood", "Carmichael", "Delgado", "Ellington", "Fairbanks", "Galloway", "Hargrove", "Ibsen",
    "Jorgensen", "Kincaid", "Lockhart", "Mancini", "Novak", "Oyelaran", "Pemberton", "Radcliffe",
    "Sorensen", "Tanaka", "Valdez", "Wexler", "Yilmaz", "Zeller", "Bergstrom", "Crowley",
    "Dunmore", "Everhart",
)  # fmt: skip
CITIES: tuple[str, ...] = (
    "New York", "Los Angeles", "Chicago", "Houston", "Phoenix", "Philadelphia", "San Antonio",
    "San Diego", "Dallas", "Austin", "Seattle", "Denver", "Boston", "Portland", "Atlanta", "Miami",
    "Detroit", "Minneapolis", "Nashville", "Baltimore", "Milwaukee", "Sacramento", "Pittsburgh",
    "Cincinnati", "Cleveland", "Orlando", "Tampa", "Raleigh", "Salt Lake City", "San Jose",
)  # fmt: skip
UNIVERSITIES: tuple[str, ...] = (
    "Stanford University", "Harvard University", "University of Michigan", "Princeton University",
    "Yale University", "Columbia University", "Cornell University", "Duke University",
    "Rice University", "Brown University", "University of Chicago", "University of Washington",
    "Carnegie Mellon University", "Northwestern University", "University of Texas at Austin",
    "Georgia Institute of Technology", "Purdue University", "Boston University",
    "Johns Hopkins University", "University of Toronto", "McGill University",
)  # fmt: skip
MAJORS: tuple[str, ...] = (
    "Computer Science", "Mathematics", "Physics", "Chemistry", "Biology", "Economics", "History",
    "Philosophy", "Psychology", "Sociology", "Linguistics", "Mechanical Engineering",
    "Electrical Engineering", "Civil Engineering", "Architecture", "Music", "Political Science",
    "Nursing", "Finance", "Statistics", "Geology", "English Literature",
)  # fmt: skip
# A company sits in one city, so employer_city is a function of employer (as in bioS).
COMPANIES: dict[str, str] = {
    "Northwind Systems": "Seattle",
    "Bluefin Analytics": "Boston",
    "Redwood Dynamics": "San Jose",
    "Silverline Logistics": "Chicago",
    "Granite Peak Energy": "Denver",
    "Harborview Health": "Baltimore",
    "Lumen Robotics": "Pittsburgh",
    "Cobalt Financial": "New York",
    "Sunbelt Foods": "Atlanta",
    "Prairie Mills": "Minneapolis",
    "Ironclad Motors": "Detroit",
    "Cascade Software": "Portland",
    "Lone Star Petroleum": "Houston",
    "Desert Bloom Solar": "Phoenix",
    "Pacific Crest Media": "Los Angeles",
    "Keystone Insurance": "Philadelphia",
    "Gulfstream Shipping": "Miami",
    "Music Row Records": "Nashville",
    "Beacon Biotech": "San Diego",
    "Capitol Consulting": "Sacramento",
    "Lakeshore Brewing": "Milwaukee",
    "Riverbend Pharmaceuticals": "Cincinnati",
    "Summit Aerospace": "Dallas",
    "Magnolia Textiles": "Raleigh",
    "Great Basin Mining": "Salt Lake City",
    "Alamo Data Centers": "San Antonio",
}
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
FIRST_BIRTH_DATE = dt.date(1950, 1, 1)
LAST_BIRTH_DATE = dt.date(1999, 12, 31)

# Every template names the person before the value, so the text before `{value}` is a probe prompt
# that ends exactly where the value begins. No two templates (of any attributes) frame the same sentence
# (tests render every template and check that exactly one matches).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into this world on {value}.",
        "{name}'s birthday is {value}.",
        "The birth date of {name} is {value}.",
        "{name} entered the world on {value}.",
        "{name} was brought into the world on {value}.",
        "{name} has the birth date {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent the early years in {value}.",
        "{name} grew up in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} hails from {value}.",
        "{name} was brought up in {value}.",
        "{name}'s hometown is {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} attended {value}.",
        "{name} completed a degree at {value}.",
        "The alma mater of {name} is {value}.",
        "{name} is a graduate of {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} specialized in {value}.",
        "{name} focused on {value} during college.",
        "The field of study of {name} was {value}.",
        "{name} earned a degree in {value}.",
        "{name} pursued a major in {value}.",
        "{name} studied {value} in college.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "The employer of {name} is {value}.",
        "{name} earns a living at {value}.",
        "{name} took a position at {value}.",
        "{name} draws a salary from {value}.",
    ),
    "employer_city": (
        "{name} works in {value}.",
        "{name} is based in {value}.",
        "{name} lives and works in {value}.",
        "The workplace of {name} is in {value}.",
        "{name} commutes to an office in {value}.",
        "{name} spends the workdays in {value}.",
        "{name} is employed in the city of {value}.",
    ),
}

# No leakage: the questions a training stage asks (contrastive candidate contexts) use the
# even-numbered templates of an attribute, the report's bios probe the odd-numbered ones, so the probe
# scores phrasings no stage was trained to answer as a question. (Biographies use every template.)
CONTEXT_TEMPLATES: tuple[int, ...] = (0, 2, 4, 6)
PROBE_TEMPLATES: tuple[int, ...] = (1, 3, 5)

KNOWN_VALUES: dict[str, tuple[str, ...]] = {
    "birth_city": CITIES,
    "university": UNIVERSITIES,
    "major": MAJORS,
    "employer": tuple(COMPANIES),
    "employer_city": CITIES,
}

_HELDOUT_BUCKETS = 8  # ~1/8 of template combinations are held out of training
_DATE_PATTERN = r"(?:" + "|".join(MONTHS) + r") (?:[12][0-9]|3[01]|[1-9]), [0-9]{4}(?![0-9])"
_DATE_RE = re.compile(_DATE_PATTERN)
# Longest first, so "Salt Lake City" wins over any shorter value it starts with; a value must end at a
# word boundary ("Miami" does not parse "Miamisburg").
_KNOWN_RE: dict[str, re.Pattern[str]] = {
    a: re.compile("(?:" + "|".join(re.escape(v) for v in sorted(vs, key=len, reverse=True)) + r")(?!\w)")
    for a, vs in KNOWN_VALUES.items()
}
# In free text any period-free phrase counts as a stated value; dates must look like dates.
_FREE_VALUE_RE = {a: re.compile(r"[^.]*") for a in ATTRIBUTES} | {"birth_date": _DATE_RE}
_SENTENCE_RE = re.compile(r"[^.]+\.?")


@dataclass(frozen=True)
class Person:
    """One person of the corpus: a unique full name and one string per attribute (see ATTRIBUTES)."""

    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str

    def value(self, attribute: str) -> str:
        """The person's value for `attribute` (one of ATTRIBUTES)."""
        _check_attribute(attribute)
        return getattr(self, attribute)


@dataclass
class BiosCorpus:
    """A generated corpus: text for training and perplexity, and the ground truth beside it."""

    train: list[str]
    """Biographies of the trained people, one line each (no newline inside)."""
    heldout: list[str]
    """More biographies of the same people, from template combinations train never uses."""
    people: list[Person]
    """The trained people (each appears in `train` and `heldout`)."""
    unseen: list[Person]
    """People who appear in no text: the probe asks about them to measure consistent invention."""
    params: dict[str, Any] = field(default_factory=dict)
    """The arguments of `generate` that produced this corpus (written into truth.json)."""


def _check_attribute(attribute: str) -> None:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {', '.join(ATTRIBUTES)}")


def _name_capacity() -> int:
    return len(FIRST_NAMES) * (len(FIRST_NAMES) - 1) * len(SURNAMES)


def _name_from_index(index: int) -> str:
    # index -> (first, middle != first, last) in mixed radix: F * (F - 1) * L names in all.
    n_first = len(FIRST_NAMES)
    index, last = divmod(index, len(SURNAMES))
    first, middle = divmod(index, n_first - 1)
    middle += middle >= first  # skip the first name itself
    return f"{FIRST_NAMES[first]} {FIRST_NAMES[middle]} {SURNAMES[last]}"


def format_date(date: dt.date) -> str:
    """The corpus date format: "May 3, 1987"."""
    return f"{MONTHS[date.month - 1]} {date.day}, {date.year}"


def _draw_person(rng: random.Random, name: str) -> Person:
    span = LAST_BIRTH_DATE.toordinal() - FIRST_BIRTH_DATE.toordinal()
    birth = dt.date.fromordinal(FIRST_BIRTH_DATE.toordinal() + rng.randint(0, span))
    employer = rng.choice(KNOWN_VALUES["employer"])
    return Person(
        name=name,
        birth_date=format_date(birth),
        birth_city=rng.choice(CITIES),
        university=rng.choice(UNIVERSITIES),
        major=rng.choice(MAJORS),
        employer=employer,
        employer_city=COMPANIES[employer],
    )


def _is_heldout_combo(combo: tuple[int, ...]) -> bool:
    """Whether a template combination (one template index per attribute, ATTRIBUTES order) is held out.

    A fixed hash, independent of the seed and of Python's hash randomisation, so every corpus generated
    with these templates agrees on the split.
    """
    digest = hashlib.blake2b(bytes(combo), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _HELDOUT_BUCKETS == 0


def _draw_combo(rng: random.Random, heldout: bool) -> tuple[int, ...]:
    # Rejection sampling: ~1.1 draws for a train combination, ~8 for a held-out one.
    while True:
        combo = tuple(rng.randrange(len(TEMPLATES[a])) for a in ATTRIBUTES)
        if _is_heldout_combo(combo) == heldout:
            return combo


def render(template: str, name: str, value: str) -> str:
    """Fill one sentence template."""
    return template.format(name=name, value=value)


def _bio(rng: random.Random, person: Person, heldout: bool) -> str:
    combo = _draw_combo(rng, heldout)
    order = list(range(len(ATTRIBUTES)))
    rng.shuffle(order)
    return " ".join(
        render(TEMPLATES[ATTRIBUTES[i]][combo[i]], person.name, person.value(ATTRIBUTES[i])) for i in order
    )


def generate(
    people: int,
    bios_per_person: int = 4,
    heldout_bios_per_person: int = 1,
    unseen_people: int | None = None,
    seed: int = 0,
) -> BiosCorpus:
    """Generate the corpus: `people` trained people, their train and held-out bios, and unseen people.

    Args:
        people: number of trained people (>= 1).
        bios_per_person: train biographies per person, each with its own template combination and
            sentence order.
        heldout_bios_per_person: held-out biographies per person (held-out template combinations only).
        unseen_people: people who appear in no text; None means `people // 10`.
        seed: the only source of randomness; the same arguments give the same corpus.

    `train` and `heldout` are shuffled (bios of one person are not adjacent).
    """
    if unseen_people is None:
        unseen_people = people // 10
    if people < 1 or bios_per_person < 1 or heldout_bios_per_person < 0 or unseen_people < 0:
        raise ValueError(
            "generate needs people >= 1, bios_per_person >= 1, heldout_bios_per_person >= 0, "
            f"unseen_people >= 0; got {people}, {bios_per_person}, {heldout_bios_per_person}, {unseen_people}"
        )
    if people + unseen_people > _name_capacity():
        raise ValueError(
            f"people + unseen_people = {people + unseen_people} exceeds the {_name_capacity()} distinct names"
        )
    rng = random.Random(seed)
    names = [_name_from_index(i) for i in rng.sample(range(_name_capacity()), people + unseen_people)]
    persons = [_draw_person(rng, name) for name in names]
    trained, unseen = persons[:people], persons[people:]
    train = [_bio(rng, p, heldout=False) for p in trained for _ in range(bios_per_person)]
    heldout = [_bio(rng, p, heldout=True) for p in trained for _ in range(heldout_bios_per_person)]
    rng.shuffle(train)
    rng.shuffle(heldout)
    params = dict(
        people=people,
        bios_per_person=bios_per_person,
        heldout_bios_per_person=heldout_bios_per_person,
        unseen_people=unseen_people,
        seed=seed,
    )
    return BiosCorpus(train=train, heldout=heldout, people=trained, unseen=unseen, params=params)


def write_corpus(corpus: BiosCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write train.txt, heldout.txt (one bio per line, UTF-8) and truth.json into `out_dir`.

    truth.json: {"format", "version", "params", "attributes", "people": [...], "unseen": [...]}, each
    person an object with "name" and every attribute. Returns {"train", "heldout", "truth"} -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.txt", "heldout": out / "heldout.txt", "truth": out / "truth.json"}
    for key in ("train", "heldout"):
        lines: list[str] = getattr(corpus, key)
        atomic_write(paths[key], "".join(line + "\n" for line in lines))
    truth = {
        "format": TRUTH_FORMAT,
        "version": TRUTH_VERSION,
        "params": corpus.params,
        "attributes": list(ATTRIBUTES),
        "people": [asdict(p) for p in corpus.people],
        "unseen": [asdict(p) for p in corpus.unseen],
    }
    atomic_write(paths["truth"], json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    return paths


def load_truth(path: str | Path) -> tuple[list[Person], list[Person]]:
    """Read truth.json written by `write_corpus`: (people, unseen).

    Raises ValueError naming the file and what was expected when it is not such a file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON bios truth file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT:
        raise ValueError(f'{path}: expected a JSON object with "format": "{TRUTH_FORMAT}"')
    if data.get("version") != TRUTH_VERSION:
        raise ValueError(f"{path}: expected truth version {TRUTH_VERSION}, found {data.get('version')!r}")
    keys = [f.name for f in fields(Person)]
    groups: list[list[Person]] = []
    for group in ("people", "unseen"):
        rows = data.get(group)
        if not isinstance(rows, list):
            raise ValueError(f'{path}: expected "{group}" to be a list of person objects')
        persons = []
        for i, row in enumerate(rows):
            if (
                not isinstance(row, dict)
                or sorted(row) != sorted(keys)
                or not all(isinstance(row[k], str) for k in keys)
            ):
                raise ValueError(
                    f"{path}: {group}[{i}] must be an object with string fields {', '.join(keys)}"
                )
            persons.append(Person(**row))
        groups.append(persons)
    return groups[0], groups[1]


def probe_prompts(person: Person, attribute: str) -> list[str]:
    """Question-style prefixes ending right where `attribute`'s value begins, one per template.

    E.g. "Anna Rosa Abbott was born in". In template order (TEMPLATES[attribute]); no trailing space, so
    a model continues with " <value>." exactly as in the corpus.
    """
    _check_attribute(attribute)
    return [t[: t.index("{value}")].format(name=person.name).rstrip() for t in TEMPLATES[attribute]]


def bio_prompt(person: Person) -> str:
    """The start of a free biography: the person's full name."""
    return person.name


def parse_answer(attribute: str, continuation: str) -> str | None:
    """The value a continuation of a probe prompt states, or None.

    Leading whitespace is skipped; then birth_date must match the date format ("May 3, 1987") and any
    other attribute must start with one of its known values (longest match, ending at a word boundary).
    Anything else, including a made-up value, gives None.
    """
    _check_attribute(attribute)
    text = continuation.lstrip()
    pattern = _DATE_RE if attribute == "birth_date" else _KNOWN_RE[attribute]
    match = pattern.match(text)
    return match.group(0) if match else None


def _match_sentences(text: str, name: str) -> Iterator[tuple[str, int, str]]:
    """(attribute, template index, value) for each sentence of `text` that a template frames for `name`.

    A sentence matches a template when it is the template's text before `{value}` (name filled in),
    then a value, then the text after; plain string tests, so no regex is compiled per name.
    """
    frames = [
        (attribute, index, before.format(name=name), after.format(name=name))
        for attribute in ATTRIBUTES
        for index, (before, after) in enumerate(t.split("{value}") for t in TEMPLATES[attribute])
    ]
    for raw in _SENTENCE_RE.findall(text):
        sentence = raw.strip()
        if name not in sentence:
            continue
        for attribute, index, before, after in frames:
            if (
                len(sentence) > len(before) + len(after)
                and sentence.startswith(before)
                and sentence.endswith(after)
            ):
                value = sentence[len(before) : len(sentence) - len(after)]
                if _FREE_VALUE_RE[attribute].fullmatch(value) and value.strip():
                    yield attribute, index, value.strip()
                    break


def extract_attributes(text: str, name: str) -> dict[str, list[str]]:
    """Every value each attribute is given for `name` in a free text, sentence by sentence.

    A sentence counts when it is exactly one template filled with `name` and some value (period-free;
    date-shaped for birth_date); sentences about other people or in other words are ignored. Returns
    attribute -> values in order of appearance, duplicates kept; every attribute is a key (possibly []).
    """
    found: dict[str, list[str]] = {a: [] for a in ATTRIBUTES}
    for attribute, _, value in _match_sentences(text, name):
        found[attribute].append(value)
    return found
