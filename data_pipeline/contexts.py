"""Contexts for candidate groups: what the teacher is asked to continue, with the corpus's own continuation.

Two sources, chosen by the corpus:
- the built-in bios corpus (`bios_contexts`): three in four contexts ask about one attribute of a trained
  person (a question such as "Anna Rosa Abbott was born in", from `bios.CONTEXT_TEMPLATES` only: the
  report's probe asks with the others), one in four starts a free biography
  (the person's name). The gold continuation is the true value followed by more true sentences about
  the person, in corpus style, so a gold row reads like a training biography.
- any other corpus (`document_contexts`): a task record's prompt, gold = its (first) response
  (data_pipeline/tasks.py); a plain document's first half (at most `max_context` tokens), gold = what
  follows.

`tokenize_contexts` turns text pairs into token lists. Every context starts with EOS: in the packed
training stream a document always follows the previous one's EOS, so that is what the teacher has seen
before a biography begins.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from stablekd.data_pipeline.bios import (
    ATTRIBUTES,
    CONTEXT_TEMPLATES,
    TEMPLATES,
    Person,
    bio_prompt,
    extract_attributes,
    parse_answer,
    probe_prompts,
    render,
)
from stablekd.data_pipeline.sources import read_documents
from stablekd.data_pipeline.tasks import encode_documents
from stablekd.data_pipeline.tokenize import encode

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
            t = rng.choice(CONTEXT_TEMPLATES)  # never a probe template (DESIGN §7)
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
    """The first n documents of at least 2 tokens as ([EOS] + context, gold + [EOS]).

    A task record: context = the tokens before its first learned token (the prompt, its last
    `max_context` tokens), gold = the first run of learned tokens (the response). A plain document (or a
    task record learned from its first token): split in half, the context keeps at most `max_context`
    tokens of the first half (its start) and the rest is gold.
    """
    eos = tok.eos_token_id
    out: list[tuple[list[int], list[int]]] = []
    for doc in read_documents(files):
        if len(out) == n:
            break
        ids, learned = encode_documents(tok, [doc])[0]
        if len(ids) < 2:
            continue
        start = learned.index(True) if doc.is_task and True in learned else 0
        if start > 0:
            end = learned.index(False, start) if False in learned[start:] else len(ids)
            out.append(([eos, *ids[:start][-max_context:]], [*ids[start:end], eos]))
            continue
        c = min(len(ids) // 2, max_context)
        out.append(([eos, *ids[:c]], [*ids[c:], eos]))
    return out


def bios_truth(people: Sequence[Person]) -> dict[str, tuple[Person, str | None]]:
    """Context text -> (person, attribute asked; None for a biography start) for every context
    `bios_contexts` can produce about `people` (each question template of CONTEXT_TEMPLATES, each name)."""
    truth: dict[str, tuple[Person, str | None]] = {}
    for person in people:
        truth[bio_prompt(person)] = (person, None)
        for attribute in ATTRIBUTES:
            prompts = probe_prompts(person, attribute)
            for t in CONTEXT_TEMPLATES:
                truth[prompts[t]] = (person, attribute)
    return truth


def _answer_key(attribute: str, value: str) -> int:
    # A stable non-negative id of (attribute, value): continuations of different contexts that state the
    # same answer share it (false negatives of a contrastive loss).
    return zlib.crc32(f"{attribute}\0{value}".encode())


class Judgement(NamedTuple):
    verdicts: list[int]  # per continuation: +1 true, -1 contradiction, 0 nothing verifiable
    keys: list[int]  # per continuation: answer key of a question's stated answer, -1 otherwise
    truth_key: int  # answer key of a question context's true answer, -1 otherwise
    known: bool  # the context's person is in the ground truth: verdict 0 means "unverifiable"
    attribute: int  # index in bios.ATTRIBUTES of what a question context asks, -1 otherwise


def judge_continuations(
    tok, context_ids: Sequence[int], continuations: Sequence[Sequence[int]], truth: dict
) -> Judgement:
    """A `Judgement` of a group's continuations against the ground truth of its context: verdicts, answer
    keys, the truth key, whether the truth is known and which attribute a question asks.

    verdict +1: states the true value (question) / every attribute it states is true (biography);
    −1: states another value (a contradiction: a hard negative); 0: nothing parseable or no known truth.
    key: `_answer_key` of the (attribute, value) a question's continuation states, −1 otherwise; truth key:
    that of the true answer of a question context, −1 otherwise.
    Texts are decoded from ids: the continuation is decode(context + continuation) minus decode(context),
    since SentencePiece drops a leading space when a piece is decoded alone.
    """
    ctx_text = tok.decode(list(context_ids), skip_special_tokens=True)
    person, attribute = truth.get(ctx_text.strip(), (None, None))
    verdicts, keys = [], []
    for cont in continuations:
        whole = tok.decode([*context_ids, *cont], skip_special_tokens=True)
        text = whole[len(ctx_text) :]
        verdict, key = 0, -1
        if person is not None and attribute is not None:
            value = parse_answer(attribute, text)
            if value is not None:
                verdict = 1 if value == person.value(attribute) else -1
                key = _answer_key(attribute, value)
        elif person is not None:
            stated = extract_attributes(whole, person.name)
            values = [(a, v) for a, vs in stated.items() for v in vs]
            if values:
                verdict = -1 if any(v != person.value(a) for a, v in values) else 1
        verdicts.append(verdict)
        keys.append(key)
    truth_key = _answer_key(attribute, person.value(attribute)) if person and attribute else -1
    asked = ATTRIBUTES.index(attribute) if attribute is not None else -1
    return Judgement(verdicts, keys, truth_key, person is not None, asked)
