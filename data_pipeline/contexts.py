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
before a biography begins. A context also says whether its gold continuation is a reference answer (a
task record's response, a bios question's truth): what the contrastive stage labels groups by
(data_pipeline/answers.py); a plain document's second half or a biography is no answer to compare with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from stablekd.data_pipeline.answers import Judgement, answer_key, continuation_texts
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
from stablekd.data_pipeline.tokenizer import encode

QUESTION_SHARE = 4  # every 4th context starts a biography, the other three ask a question


def _sentences(rng: random.Random, person: Person, skip: str) -> list[str]:
    """True sentences about `person` for every attribute but `skip`, random templates, random order."""
    others = [a for a in ATTRIBUTES if a != skip]
    rng.shuffle(others)
    return [render(rng.choice(TEMPLATES[a]), person.name, person.value(a)) for a in others]


class Context(NamedTuple):
    context: list[int]  # [EOS] + the prompt's ids
    gold: list[int]  # the corpus's continuation + [EOS]
    reference: bool  # gold answers the context (a task's response, a bios question's truth)


def bios_contexts(people: Sequence[Person], n: int, seed: int) -> list[tuple[str, str, bool]]:
    """n (prompt, gold continuation, is a question) texts about trained people; a pure function of the
    arguments."""
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
            t = rng.choice(CONTEXT_TEMPLATES)  # never a probe template (no leakage)
            template, prompt = TEMPLATES[attribute][t], probe_prompts(person, attribute)[t]
        first = render(template, person.name, person.value(attribute))
        rest = _sentences(rng, person, skip=attribute)
        out.append(
            (prompt, " ".join([first, *rest])[len(prompt) :], i % QUESTION_SHARE != QUESTION_SHARE - 1)
        )
    return out


def tokenize_contexts(tok, texts: Sequence[tuple[str, str, bool]]) -> list[Context]:
    """(prompt, gold, reference) texts -> Contexts ([EOS] + prompt ids, gold ids + [EOS], reference).

    The gold ids are cut from the tokens of prompt + gold, so they are the ids the training stream holds
    for that text (SentencePiece merges across the boundary differ from tokenizing the gold alone); when
    the prompt's tokens are not a prefix of the whole, the gold is tokenized on its own.
    """
    eos = tok.eos_token_id
    prompts = encode(tok, [p for p, _, _ in texts])
    wholes = encode(tok, [p + g for p, g, _ in texts])
    out = []
    for (_, gold, ref), p, w in zip(texts, prompts, wholes, strict=True):
        g = w[len(p) :] if w[: len(p)] == p else encode(tok, [gold])[0]
        out.append(Context([eos, *p], [*g, eos], ref))
    return out


def document_contexts(
    files: Sequence[Path], tok, n: int, max_context: int, tasks_only: bool = False
) -> list[Context]:
    """The first n documents of at least 2 tokens as Contexts ([EOS] + context, gold + [EOS], reference).

    A task record: context = the tokens before its first learned token (the prompt, its last
    `max_context` tokens), gold = the first run of learned tokens (the response). A plain document (or a
    task record learned from its first token): split in half, the context keeps at most `max_context`
    tokens of the first half (its start) and the rest is gold. Only a task's response is a reference.
    `tasks_only`: the first n task prompts, plain documents skipped (every group has a reference; a
    prose half widens every stored context to its length).
    """
    eos = tok.eos_token_id
    out: list[Context] = []
    for doc in read_documents(files):
        if len(out) == n:
            break
        ids, learned = encode_documents(tok, [doc])[0]
        if len(ids) < 2:
            continue
        start = learned.index(True) if doc.is_task and True in learned else 0
        if start > 0:
            end = learned.index(False, start) if False in learned[start:] else len(ids)
            out.append(Context([eos, *ids[:start][-max_context:]], [*ids[start:end], eos], True))
            continue
        if tasks_only:
            continue
        c = min(len(ids) // 2, max_context)
        out.append(Context([eos, *ids[:c]], [*ids[c:], eos], False))
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
    # Continuations of different contexts that state the same answer share it (false negatives).
    return answer_key(f"{attribute}\0{value}")


def judge_continuations(
    tok, context_ids: Sequence[int], continuations: Sequence[Sequence[int]], truth: dict
) -> Judgement:
    """A `Judgement` of a group's continuations against the ground truth of its context: verdicts, answer
    keys, the truth key, whether the truth is known and which attribute a question asks.

    verdict +1: states the true value (question) / every attribute it states is true (biography);
    −1: states another value (a contradiction: a hard negative); 0: nothing parseable or no known truth.
    key: `_answer_key` of the (attribute, value) a question's continuation states, −1 otherwise; truth key:
    that of the true answer of a question context, −1 otherwise.
    Texts are decoded from ids (`answers.continuation_texts`).
    """
    ctx_text = tok.decode(list(context_ids), skip_special_tokens=True)
    person, attribute = truth.get(ctx_text.strip(), (None, None))
    verdicts, keys = [], []
    for text in continuation_texts(tok, context_ids, continuations):
        whole = ctx_text + text
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
    return Judgement(verdicts, keys, truth_key, person is not None, asked, "truth")
