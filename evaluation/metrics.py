"""Stability metrics: pure functions on texts, parsed answers and embeddings. No model, no I/O.

Answer lists (`answers[i]` = the K answers to question i, as `bios.parse_answer` returns them):
index 0 is the greedy answer, the rest are samples. `None` means "no recognisable value". The rule,
the same in every function: None is never a value. It is a wrong greedy answer (accuracy), a sample
that agrees with nothing (self-consistency), and it cannot contradict anything (contradiction counts
distinct non-None values only). A question list that is empty, or a question with no answers, is an
error: a probe that asked nothing is a bug, not a score.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _ngrams(texts: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.split()
        grams.extend(
            zip(*(tokens[i:] for i in range(n)), strict=False)
        )  # shifted views: stop at the shortest
    return grams


def rep_n(texts: list[str], n: int) -> float:
    """SimCTG rep-n: 100 * (1 - unique n-grams / total n-grams), in percent.

    Whitespace tokens; n-grams are taken within each text and pooled over all texts (an n-gram never
    spans two texts). 0.0 when there are no n-grams (every text shorter than n tokens).
    """
    grams = _ngrams(texts, n)
    if not grams:
        return 0.0
    return 100.0 * (1.0 - len(set(grams)) / len(grams))


def diversity(texts: list[str]) -> float:
    """SimCTG diversity: prod over n = 2, 3, 4 of (1 - rep_n(texts, n) / 100), in [0, 1].

    1.0 when there are no bigrams at all (each rep-n is 0.0 then).
    """
    return math.prod(1.0 - rep_n(texts, n) / 100.0 for n in (2, 3, 4))


def distinct_n(samples: list[str], n: int) -> float:
    """distinct-n of one group (the K samples of one prompt): unique n-grams / total n-grams, in [0, 1].

    Whitespace tokens, n-grams within each sample, pooled over the group. 0.0 when there are none.
    Average it over prompts yourself; pooling over prompts would measure something else.
    """
    grams = _ngrams(samples, n)
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def _check_answers(answers: Sequence[Sequence[str | None]]) -> None:
    if not answers:
        raise ValueError("no questions: answers is empty")
    for i, group in enumerate(answers):
        if not group:
            raise ValueError(f"question {i} has no answers (need K >= 1, index 0 = greedy)")


def accuracy(answers: list[list[str | None]], truth: list[str]) -> float:
    """Share of questions whose greedy answer (answers[i][0]) equals truth[i] exactly.

    A None greedy answer is wrong. Samples (answers[i][1:]) do not count here.
    """
    _check_answers(answers)
    if len(answers) != len(truth):
        raise ValueError(f"{len(answers)} answer groups but {len(truth)} truths")
    return sum(group[0] == t for group, t in zip(answers, truth, strict=True)) / len(answers)


def self_consistency(answers: list[list[str | None]]) -> float:
    """Mean over questions of (count of the modal answer among the K answers) / K, in [0, 1].

    The mode is taken over non-None answers only (ties do not matter: only the count is used); None
    answers still count in K. A question whose answers are all None scores 0.
    """
    _check_answers(answers)
    total = 0.0
    for group in answers:
        counts = Counter(a for a in group if a is not None)
        total += max(counts.values(), default=0) / len(group)
    return total / len(answers)


def cross_contradiction(answers: list[list[str | None]]) -> float:
    """Share of questions whose K answers give >= 2 distinct non-None values."""
    _check_answers(answers)
    return sum(len({a for a in group if a is not None}) >= 2 for group in answers) / len(answers)


def intext_contradiction(extracted: list[dict[str, list[str]]]) -> float:
    """Share of generated bios that state some attribute with >= 2 distinct values.

    `extracted[j]` is `bios.extract_attributes(bio_j, name_j)`: attribute -> values stated, in order,
    duplicates kept (a repeated identical value is not a contradiction). 0.0 for an empty list.
    """
    if not extracted:
        return 0.0
    return sum(any(len(set(v)) >= 2 for v in bio.values()) for bio in extracted) / len(extracted)


def coherence(prefix_emb: torch.Tensor, cont_emb: torch.Tensor) -> float:
    """Mean cosine similarity of row pairs: mean_i cos(prefix_emb[i], cont_emb[i]).

    Both (N, D), N >= 1; computed in fp32 whatever the input dtype. A zero row gives cosine 0
    (torch's eps guard).
    """
    if prefix_emb.dim() != 2 or prefix_emb.shape != cont_emb.shape or prefix_emb.shape[0] == 0:
        raise ValueError(
            f"coherence needs two (N, D) tensors of the same shape with N >= 1, "
            f"got {tuple(prefix_emb.shape)} and {tuple(cont_emb.shape)}"
        )
    return F.cosine_similarity(prefix_emb.float(), cont_emb.float(), dim=-1).mean().item()  # (N,) -> ()


def calibration_error(
    counts: Sequence[float], confidence: Sequence[float], correct: Sequence[float]
) -> float:
    """Expected calibration error (Guo et al. 2017) from per-bin sums over predictions: `counts[b]`
    predictions whose confidence falls in bin b, the sum of their confidences and of their correctness
    (1 right, 0 wrong). ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| = Σ_b |correct_b − confidence_b| / N,
    in [0, 1]; 0.0 with no prediction."""
    n = sum(counts)
    if n == 0:
        return 0.0
    return sum(abs(a - c) for a, c in zip(correct, confidence, strict=True)) / n


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(nll_sum / n_tokens): nll_sum in nats summed over n_tokens predicted tokens.

    ValueError when n_tokens <= 0; inf when the exponent overflows a float.
    """
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n_tokens}")
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """nll_sum (nats, summed over predicted tokens) / ln 2 / the UTF-8 bytes of those tokens: comparable
    across tokenizers, where perplexity is not. ValueError when n_bytes <= 0."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs n_bytes > 0, got {n_bytes}")
    return nll_sum / math.log(2) / n_bytes


# --- the report's rows: every metric's key, label and where it is computed ------------------------

ECE_BINS = 15  # equal-width confidence bins of the calibration error

# Every report key -> (label, how to read it), in report.md's row order. The keys are what eval/report.json,
# TensorBoard (`stability/<key>`) and the benchmarks' results JSONs carry: keep a key's meaning.
METRICS: dict[str, tuple[str, str]] = {
    "ppl": ("perplexity, held-out text", "lower is better; only between models of one tokenizer"),
    "bpb": ("bits per byte, held-out text", "lower is better; compares across tokenizers"),
    "ece": ("calibration error (ECE)", f"next-token top-1, {ECE_BINS} bins; lower is better"),
    "bios_ppl": ("perplexity, held-out biographies", "lower is better"),
    "bios_accuracy": ("bios accuracy (greedy)", "trained people"),
    "bios_answered": ("bios answered (greedy parses)", "trained people"),
    "bios_self_consistency": ("bios self-consistency", "share of 1+K answers = modal answer"),
    "bios_cross_contradiction": ("bios cross-sample contradiction", "share of questions with >=2 values"),
    "bios_intext_contradiction": ("bios in-text contradiction", "share of free bios"),
    "bios_unseen_accuracy": ("unseen: accuracy (chance level)", "people never trained on"),
    "bios_unseen_answered": ("unseen: answered", "people never trained on"),
    "bios_unseen_self_consistency": ("unseen: self-consistency", "consistent invention"),
    "bios_unseen_cross_contradiction": ("unseen: cross-sample contradiction", "people never trained on"),
    "bios_unseen_intext_contradiction": ("unseen: in-text contradiction", "people never trained on"),
    "task_exact_match": ("task: exact match", "greedy answer vs the reference response (normalised)"),
    "task_agreement": ("task: agreement", "share of 1 + K answers equal to the modal one"),
    "task_contradiction": ("task: contradiction", "prompts whose answers take >= 2 values"),
    "task_paraphrase_contradiction": (
        "task: paraphrase contradiction",
        "greedy answers differ across templates",
    ),
    "task_paraphrase_exact_match": (
        "task: exact match, templates",
        "greedy, mean over evaluate.task_templates",
    ),
    "task_rep_2": ("task: rep-2 (%)", "within sampled answers; lower is better"),
    "task_rep_3": ("task: rep-3 (%)", "within sampled answers; lower is better"),
    "rep_2": ("rep-2 (%)", "greedy continuations; lower is better"),
    "rep_3": ("rep-3 (%)", "greedy continuations; lower is better"),
    "rep_4": ("rep-4 (%)", "greedy continuations; lower is better"),
    "diversity": ("diversity", "prod (1 - rep-n/100); higher is better"),
    "distinct_2": ("distinct-2 within K samples", "higher = samples differ more"),
    "coherence": ("coherence (cosine)", "prefix vs greedy continuation"),
    "params": ("parameters", ""),
    "gen_tokens_per_s": ("generation tokens/s", "one fixed batch"),
    "peak_mem_mib": ("peak memory (MiB)", "load + evaluate"),
}

# The metrics of generated continuations, computed for every model by evaluation/report.py `degeneration`:
# key -> (what it reads, function). "greedy": one greedy continuation per held-out prefix (list[str]);
# "samples": each prefix's K sampled continuations (list[list[str]]). A new metric of generated text is a
# function above, its row in METRICS and its entry here: this file only (the report, its sample sizes, the
# "missing" rule, TensorBoard and report.md follow).
CONTINUATION_METRICS: dict[str, tuple[str, Callable[[Any], float]]] = {
    "rep_2": ("greedy", functools.partial(rep_n, n=2)),
    "rep_3": ("greedy", functools.partial(rep_n, n=3)),
    "rep_4": ("greedy", functools.partial(rep_n, n=4)),
    "diversity": ("greedy", diversity),
    "distinct_2": ("samples", lambda groups: sum(distinct_n(g, 2) for g in groups) / len(groups)),
}
