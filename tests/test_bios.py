"""The built-in bios corpus: templates parse back, generation is deterministic and split as designed."""

import json
import re

import pytest

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.bios import ATTRIBUTES, TEMPLATES, Person

ANNA = Person(
    name="Anna Rosa Abbott",
    birth_date="May 3, 1987",
    birth_city="Salt Lake City",
    university="University of Texas at Austin",
    major="Computer Science",
    employer="Great Basin Mining",
    employer_city="Salt Lake City",
)


@pytest.fixture(scope="module")
def corpus() -> bios.BiosCorpus:
    return bios.generate(people=200, bios_per_person=4, heldout_bios_per_person=2, unseen_people=50, seed=3)


def test_template_counts_and_lists():
    for attribute in ATTRIBUTES:
        assert len(TEMPLATES[attribute]) >= 6
        assert len(set(TEMPLATES[attribute])) == len(TEMPLATES[attribute])
        for template in TEMPLATES[attribute]:
            # name before value: the prefix up to {value} is a probe prompt
            assert template.count("{value}") == 1 and template.index("{name}") < template.index("{value}")
    assert set(bios.COMPANIES.values()) <= set(bios.CITIES)
    assert not set(bios.FIRST_NAMES) & set(bios.SURNAMES)
    for a in bios.SURNAMES:
        assert not any(b != a and b.startswith(a) for b in bios.SURNAMES)
    for values in [*bios.KNOWN_VALUES.values(), bios.FIRST_NAMES, bios.SURNAMES]:
        assert len(set(values)) == len(values)
        assert not any("." in v or "\n" in v for v in values)


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_every_template_parses_back(attribute):
    prompts = bios.probe_prompts(ANNA, attribute)
    assert len(prompts) == len(TEMPLATES[attribute])
    value = ANNA.value(attribute)
    for index, (template, prompt) in enumerate(zip(TEMPLATES[attribute], prompts, strict=True)):
        sentence = bios.render(template, ANNA.name, value)
        assert sentence.startswith(prompt + " ")
        continuation = sentence[len(prompt) :]
        assert bios.parse_answer(attribute, continuation) == value
        # the sentence fits exactly this template and no other of any attribute (any period-free value)
        fits = [
            (a, i)
            for a in ATTRIBUTES
            for i, t in enumerate(TEMPLATES[a])
            if re.fullmatch(re.escape(t.format(name=ANNA.name, value="@")).replace("@", "[^.]+"), sentence)
        ]
        assert fits == [(attribute, index)]
        assert list(bios._match_sentences(sentence, ANNA.name)) == [(attribute, index, value)]
        expected = {a: [] for a in ATTRIBUTES} | {attribute: [value]}
        assert bios.extract_attributes(sentence, ANNA.name) == expected
        # the same sentence about someone else says nothing about Anna
        other = bios.render(template, "Boris Clara Brennan", value)
        assert bios.extract_attributes(other, ANNA.name) == {a: [] for a in ATTRIBUTES}


def test_parse_answer_edges():
    assert bios.parse_answer("birth_city", " Salt Lake City. Anna ...") == "Salt Lake City"
    assert bios.parse_answer("birth_city", " Miamisburg.") is None  # not a known value at a word boundary
    assert bios.parse_answer("birth_city", " in Miami.") is None  # only at the start
    assert bios.parse_answer("birth_date", " December 31, 1999.") == "December 31, 1999"
    assert bios.parse_answer("birth_date", " May 03, 1987.") is None  # the format never zero-pads
    assert bios.parse_answer("birth_date", " 1987") is None
    with pytest.raises(ValueError, match="unknown attribute"):
        bios.parse_answer("height", " tall")


def test_extract_keeps_order_and_duplicates_and_free_values():
    text = (
        "Anna Rosa Abbott was born in Boston. Anna Rosa Abbott hails from Atlantis. "
        "Boris Clara Brennan was born in Denver. Anna Rosa Abbott grew up in Boston. Some noise here"
    )
    got = bios.extract_attributes(text, "Anna Rosa Abbott")
    # a made-up city (Atlantis) still counts as a stated value
    assert got["birth_city"] == ["Boston", "Atlantis", "Boston"]
    assert all(got[a] == [] for a in ATTRIBUTES if a != "birth_city")


def test_generate_shapes_and_determinism(corpus):
    assert len(corpus.people) == 200 and len(corpus.unseen) == 50
    assert len(corpus.train) == 200 * 4 and len(corpus.heldout) == 200 * 2
    assert bios.generate(200, 4, 2, 50, seed=3) == corpus
    other = bios.generate(200, 4, 2, 50, seed=4)
    assert other.train != corpus.train and other.people != corpus.people
    names = [p.name for p in corpus.people + corpus.unseen]
    assert len(set(names)) == len(names)
    for p in corpus.people + corpus.unseen:
        assert p.employer_city == bios.COMPANIES[p.employer]
    assert len(bios.generate(30).unseen) == 3  # None -> people // 10


def test_unseen_never_in_text(corpus):
    text = "\n".join(corpus.train + corpus.heldout)
    for p in corpus.unseen:
        assert p.name not in text


def test_bios_state_the_truth_and_split_template_combinations(corpus):
    by_name = {p.name: p for p in corpus.people}
    seen_train, seen_heldout = set(), set()
    for part, heldout, seen in ((corpus.train, False, seen_train), (corpus.heldout, True, seen_heldout)):
        for line in part:
            assert "\n" not in line
            name = next(n for n in by_name if n in line)
            matches = list(bios._match_sentences(line, name))
            assert len(matches) == len(ATTRIBUTES) == line.count(name)
            extracted = bios.extract_attributes(line, name)
            assert extracted == {a: [by_name[name].value(a)] for a in ATTRIBUTES}
            # re-derive the template combination from the text itself
            index = {attribute: i for attribute, i, _ in matches}
            combo = tuple(index[a] for a in ATTRIBUTES)
            assert bios._is_heldout_combo(combo) == heldout
            seen.add(combo)
    assert not seen_train & seen_heldout
    # held out are combinations, not templates: every single template occurs in both parts
    for k, attribute in enumerate(ATTRIBUTES):
        for i in range(len(TEMPLATES[attribute])):
            assert any(c[k] == i for c in seen_train) and any(c[k] == i for c in seen_heldout)


def test_sentence_order_is_permuted(corpus):
    first_attribute = set()
    for line in corpus.train[:200]:
        name = next(p.name for p in corpus.people if p.name in line)
        first_attribute.add(next(bios._match_sentences(line, name))[0])
    assert first_attribute == set(ATTRIBUTES)


def test_heldout_share_is_about_one_eighth():
    import itertools

    combos = list(itertools.product(*(range(len(TEMPLATES[a])) for a in ATTRIBUTES)))
    share = sum(map(bios._is_heldout_combo, combos)) / len(combos)
    assert 0.11 < share < 0.14


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="people >= 1"):
        bios.generate(0)
    with pytest.raises(ValueError, match="distinct names"):
        bios.generate(10**6)


def test_write_and_load_truth_round_trip(tmp_path, corpus):
    paths = bios.write_corpus(corpus, tmp_path / "bios")
    assert set(paths) == {"train", "heldout", "truth"}
    assert paths["train"].read_text(encoding="utf-8").splitlines() == corpus.train
    assert paths["heldout"].read_text(encoding="utf-8").splitlines() == corpus.heldout
    people, unseen = bios.load_truth(paths["truth"])
    assert people == corpus.people and unseen == corpus.unseen
    assert json.loads(paths["truth"].read_text())["params"]["seed"] == 3
    assert sorted(p.name for p in (tmp_path / "bios").iterdir()) == ["heldout.txt", "train.txt", "truth.json"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not a valid JSON"),
        ("[]", "format"),
        (json.dumps({"format": "stablekd-bios-truth", "version": 1, "people": []}), '"unseen"'),
        (
            json.dumps(
                {"format": "stablekd-bios-truth", "version": 1, "people": [{"name": "x"}], "unseen": []}
            ),
            r"people\[0\]",
        ),
        (json.dumps({"format": "stablekd-bios-truth", "version": 9, "people": [], "unseen": []}), "version"),
    ],
)
def test_load_truth_rejects_bad_files(tmp_path, content, expected):
    path = tmp_path / "truth.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected) as err:
        bios.load_truth(path)
    assert str(path) in str(err.value)


def test_prompts():
    assert bios.bio_prompt(ANNA) == "Anna Rosa Abbott"
    assert bios.probe_prompts(ANNA, "birth_city")[0] == "Anna Rosa Abbott was born in"
    with pytest.raises(ValueError):
        bios.probe_prompts(ANNA, "height")
