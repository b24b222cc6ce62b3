"""Contexts for candidate groups: what the teacher is asked to continue, with the corpus's own continuation.

Two sources, chosen by the corpus:
- the built-in bios corpus (`bios_contexts`): three in four contexts ask about one attribute of a trained
  person (a probe prompt such as "Anna Rosa Abbott was born in"), one in four starts a free biography
  (the person's name). The gold continuation is the true value followed by more true sentences about
  the person, in corpus style, so a gold row reads like a training biography.
- any other corpus (`document_contexts`): the first half of a document (at most `max_context` tokens),
  gold = what follows.

`tokenize_contexts` turns text pairs into token lists. Every context starts with EOS: in the packed
training stream a document always follows the previous one's EOS, so that is what the teacher has seen
before a biography begins.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from stablekd.data_pipeline.bios import ATTRIBUTES, TEMPLATES, Person, bio_prompt, probe_prompts, render
from stablekd.data_pipeline.sources import iter_documents
from stablekd.model.tokenizer import encode

QUESTION_SHARE = 4  # every 4th context starts a biography, the other three ask a question


def _sentences(rng: random.Random, person: Person, skip: str) -> list[str]:
    """True sentences about `person` for every attribute but `skip`, random templates, random order."""
    others = [a for a in ATTRIBUTES if a != skip]
    rng.shuffle(others)
    return [render(rng.choice(TEMPLATES[a]), person.name, person.value(a)) for a in others]


def bios_contexts(people: Sequence[Person], n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, gold continuation) text pairs about trained people; a pure function of the arguments."""
    if not people:
        raise ValueError("bios_contexts needs at least one person")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        person = rng.choice(people)
        attribute = rng.choice(ATTRIBUTES)
        if i % QUESTION_SHARE == QUESTION_SHARE - 1:
            # A biography start: the first sentence comes from a template that opens with the name.
            template = rng.choice([t for t in TEMPLATES[attribute] if t.startswith("{name}")])
            prompt = bio_prompt(person)
        else:
            t = rng.randrange(len(TEMPLATES[attribute]))
            template, prompt = TEMPLATES[attribute][t], probe_prompts(person, attribute)[t]
        first = render(template, person.name, person.value(attribute))
        rest = _sentences(rng, person, skip=attribute)
        out.append((prompt, " ".join([first, *rest])[len(prompt) :]))
    return out


def tokenize_contexts(tok, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, gold) texts -> ([EOS] + prompt ids, gold ids + [EOS]).

    The gold ids are cut from the tokens of prompt + gold, so they are the ids the training stream holds
    for that text (SentencePiece merges across the boundary differ from tokenizing the gold alone); when
    the prompt's tokens are not a prefix of the whole, the gold is tokenized on its own.
    """
    eos = tok.eos_token_id
    prompts = encode(tok, [p for p, _ in pairs])
    wholes = encode(tok, [p + g for p, g in pairs])
    out = []
    for (_, gold), p, w in zip(pairs, prompts, wholes, strict=True):
        g = w[len(p) :] if w[: len(p)] == p else encode(tok, [gold])[0]
        out.append(([eos, *p], [*g, eos]))
    return out


def document_contexts(
    files: Sequence[Path], tok, n: int, max_context: int
) -> list[tuple[list[int], list[int]]]:
    """The first n documents of at least 2 tokens, each split in half: ([EOS] + first half, second half + [EOS]).

    The context keeps at most `max_context` tokens of the first half (its start); the rest is gold.
    """
    eos = tok.eos_token_id
    out: list[tuple[list[int], list[int]]] = []
    for text in iter_documents(files):
        if len(out) == n:
            break
        ids = encode(tok, [text])[0]
        if len(ids) < 2:
            continue
        c = min(len(ids) // 2, max_context)
        out.append(([eos, *ids[:c]], [*ids[c:], eos]))
    return out
