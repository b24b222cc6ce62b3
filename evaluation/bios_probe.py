"""The bios probe (docs/architecture.md): ask a model about people of the built-in corpus and count exactly.

A question is one (person, attribute) with one of the attribute's probe prompts ("Anna Rosa Abbott was
born in"). Each question gets 1 greedy + K sampled answers of `ANSWER_TOKENS` tokens, parsed with the
corpus templates (`bios.parse_answer`), so answers[i] = [greedy, sample_1, ..., sample_K] is exactly
the input `evaluation.metrics` expects. Trained people (recall) and unseen people (how consistently a
model makes things up) are asked and reported apart; the unseen keys carry a `bios_unseen_` prefix.
Free biographies (prompt: the name alone) are sampled and checked for one attribute stated with two
values (in-text contradiction).

The model is only a `TextGenerator`: `gen(prompts, n, greedy, max_new_tokens) -> n continuations per
prompt`. `HFGenerator` wraps a Hugging Face causal LM; tests pass fakes, so the counting here is tested
without a model. Question choice depends only on the people and the seed, and the torch RNG is reseeded
before every sampling call, so every model sees the same prompts from the same RNG state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.bios import ATTRIBUTES, Person
from stablekd.evaluation import metrics
from stablekd.model.build import generation_config, pad_id

# The longest value of the corpus is 6 tokens with the quickstart tokenizer (" Georgia Institute of
# Technology." and dates such as " September 30, 1987."); 12 leaves room for a larger vocabulary's
# splits and for a model that hesitates, while keeping 1 + K answers per question cheap.
ANSWER_TOKENS = 12


class ProbeSettings(Protocol):
    """How the probes sample (the evaluate section, launcher.config.EvaluateConfig, has these fields)."""

    samples: int  # K sampled answers beside the greedy one
    max_new_tokens: int
    max_prompts: int
    free_bios: int
    task_templates: list[str]  # the task probe's paraphrase templates ("{prompt}")


class TextGenerator(Protocol):
    """What the probe and the report need from a model: text continuations of text prompts."""

    def __call__(
        self, prompts: Sequence[str], n: int, greedy: bool, max_new_tokens: int, min_new_tokens: int = 0
    ) -> list[list[str]]:
        """n continuations (text after the prompt, specials removed) per prompt, in prompt order.

        greedy=True means deterministic decoding and n == 1; otherwise samples from the torch RNG.
        min_new_tokens: end-of-text is not generated before that many tokens (a fixed length when equal
        to max_new_tokens).
        """
        ...


class HFGenerator:
    """A `TextGenerator` over a Hugging Face causal LM: batched `generate` with left padding.

    Each prompt is prefixed with EOS: the training stream packs documents each followed by EOS, so a
    document start follows an EOS there too. Sequences per `generate` call are at most `batch_size`
    (prompts × n). Decoded text is the decode of prompt + continuation minus the decode of the prompt:
    SentencePiece drops a leading space when a continuation is decoded alone ("Boston." for " Boston.").
    synced_gpus=True is for a model whose parameters ZeRO-3 partitions over ranks (every rank makes the
    same calls; each keeps forwarding until all have finished).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 64,
        bf16: bool = False,
        synced_gpus: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = max(1, batch_size)
        self.bf16 = bf16
        self.synced_gpus = synced_gpus
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = pad_id(tokenizer)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [([self.eos] if self.eos is not None else []) + list(p) for p in ids]

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        greedy: bool,
        max_new_tokens: int,
        min_new_tokens: int = 0,
    ) -> list[list[list[int]]]:
        """Generated token ids (EOS and what follows cut off) per prompt: out[i][j] = sample j of prompt i."""
        if greedy and n != 1:
            raise ValueError(f"greedy decoding gives one answer per prompt, asked for n={n}")
        out: list[list[list[int]]] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start : start + per_call]
            width = max(len(p) for p in chunk)
            # left padding: every prompt ends at column `width`, where generation starts
            ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in chunk])  # (b, width)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])  # (b, width)
            sampling = {} if greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                seqs = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    synced_gpus=self.synced_gpus,
                    generation_config=generation_config(
                        self.tokenizer, do_sample=not greedy, num_return_sequences=n,
                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, **sampling,
                    ),
                )  # fmt: skip  # (b * n, width + new), rows prompt-major: prompt 0's n samples first
            new = seqs[:, width:].tolist()
            for i in range(len(chunk)):
                out.append([_cut_at(new[i * n + j], self.eos) for j in range(n)])
        return out

    def __call__(
        self, prompts: Sequence[str], n: int, greedy: bool, max_new_tokens: int, min_new_tokens: int = 0
    ) -> list[list[str]]:
        prompt_ids = self.encode(prompts)
        generated = self.generate_ids(prompt_ids, n, greedy, max_new_tokens, min_new_tokens)
        texts = []
        for p, samples in zip(prompt_ids, generated, strict=True):
            head = self.tokenizer.decode(p, skip_special_tokens=True)
            row = []
            for g in samples:
                full = self.tokenizer.decode(p + g, skip_special_tokens=True)
                row.append(full[len(head) :] if full.startswith(head) else self.tokenizer.decode(g))
            texts.append(row)
        return texts


def _cut_at(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


@dataclass(frozen=True)
class Question:
    person: Person
    attribute: str
    prompt: str

    @property
    def truth(self) -> str:
        return self.person.value(self.attribute)


def build_questions(people: Sequence[Person], max_prompts: int, seed: int) -> list[Question]:
    """The first `max_prompts` (person, attribute) pairs after a seeded shuffle, each with a seeded probe template."""
    rng = random.Random(seed)
    pairs = [(p, a) for p in people for a in ATTRIBUTES]
    rng.shuffle(pairs)
    # Probe templates only: no training stage asks with them (bios.PROBE_TEMPLATES).
    return [
        Question(p, a, bios.probe_prompts(p, a)[rng.choice(bios.PROBE_TEMPLATES)])
        for p, a in pairs[:max_prompts]
    ]


def ask(gen: TextGenerator, questions: Sequence[Question], samples: int, seed: int) -> list[list[str]]:
    """Raw continuations per question: [greedy, sample_1, ..., sample_K]."""
    prompts = [q.prompt for q in questions]
    greedy = gen(prompts, 1, True, ANSWER_TOKENS)
    torch.manual_seed(seed)
    sampled = gen(prompts, samples, False, ANSWER_TOKENS) if samples > 0 else [[] for _ in prompts]
    return [g + s for g, s in zip(greedy, sampled, strict=True)]


def free_bios(gen: TextGenerator, people: Sequence[Person], max_new_tokens: int, seed: int) -> list[str]:
    """One sampled biography per person, prompt included (the name starts it)."""
    prompts = [bios.bio_prompt(p) for p in people]
    torch.manual_seed(seed)
    conts = gen(prompts, 1, False, max_new_tokens)
    return [p + c[0] for p, c in zip(prompts, conts, strict=True)]


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    """bios_* keys for trained people, bios_unseen_* for unseen ones (absent when there are none)."""
    examples: list[dict] = field(default_factory=list)
    """A few questions (prompt, truth, raw answers) and free biographies, for the report."""
    sizes: dict[str, str] = field(default_factory=dict)
    """What each metric was computed on ("60 questions × 4 answers"), for the report's sample column."""


def probe(
    gen: TextGenerator, people: Sequence[Person], unseen: Sequence[Person], cfg: ProbeSettings
) -> ProbeResult:
    """Ask trained and unseen people's questions and sample free biographies; see the module doc.

    Keys per group (prefix `bios_` or `bios_unseen_`): accuracy (greedy answer == truth), answered
    (greedy answer parses to some known value), self_consistency, cross_contradiction (over the 1 + K
    answers), intext_contradiction (over `cfg.free_bios` free biographies).
    """
    result = ProbeResult({})
    for group, persons, offset in (("bios", people, 0), ("bios_unseen", unseen, 1)):
        if not persons:
            continue
        seed = cfg.seed + offset  # another shuffle per group; the same for every model
        questions = build_questions(persons, cfg.max_prompts, seed)
        raw = ask(gen, questions, cfg.samples, seed)
        answers = [
            [bios.parse_answer(q.attribute, t) for t in r] for q, r in zip(questions, raw, strict=True)
        ]
        truth = [q.truth for q in questions]
        m = result.metrics
        m[f"{group}_accuracy"] = metrics.accuracy(answers, truth)
        m[f"{group}_answered"] = sum(a[0] is not None for a in answers) / len(answers)
        m[f"{group}_self_consistency"] = metrics.self_consistency(answers)
        m[f"{group}_cross_contradiction"] = metrics.cross_contradiction(answers)
        asked = f"{len(questions)} questions"
        for key in ("accuracy", "answered"):
            result.sizes[f"{group}_{key}"] = asked
        for key in ("self_consistency", "cross_contradiction"):
            result.sizes[f"{group}_{key}"] = f"{asked} × {1 + cfg.samples} answers"
        result.examples += [
            {"group": group, "prompt": q.prompt, "truth": q.truth, "answers": r}
            for q, r in zip(questions[:3], raw[:3], strict=True)
        ]

        writers = random.Random(seed).sample(list(persons), min(cfg.free_bios, len(persons)))
        if writers:
            texts = free_bios(gen, writers, cfg.max_new_tokens, seed)
            extracted = [bios.extract_attributes(t, p.name) for t, p in zip(texts, writers, strict=True)]
            m[f"{group}_intext_contradiction"] = metrics.intext_contradiction(extracted)
            result.sizes[f"{group}_intext_contradiction"] = (
                f"{len(writers)} free bios × {cfg.max_new_tokens} tokens"
            )
            result.examples += [{"group": group, "bio": t} for t in texts[:2]]
    return result
