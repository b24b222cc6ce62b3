"""The task probe: how a model answers held-out task prompts (prompt/response or chat records).

Per held-out task record: its prompt (what precedes the first learned span, rendered as training renders
it: the tokenizer's chat template for chat records where it has one) is answered once greedily and K times
sampled (evaluate.samples, evaluate.temperature, evaluate.top_p), each answer ending at end-of-text or
after evaluate.max_new_tokens. Answers are compared as the contrastive stage labels them
(data_pipeline/answers.py): the text up to data.answer_stop (the first line or sentence), normalised
(case, whitespace, the punctuation at either end), so "Paris." and " paris" agree, and so do
"Paris.\nQ: ..." and "Paris"; an answer that is empty there is no answer.

Keys: task_exact_match (greedy answer == the record's reference response), task_agreement (share of the
1 + K answers that agree with their modal answer, averaged over prompts), task_contradiction (share of
prompts whose answers take >= 2 values), task_rep_2 / task_rep_3 (SimCTG rep-n of the sampled answers:
loops within an answer). With evaluate.task_templates (ParaRel-style paraphrase check): each prompt is asked
again in every template, greedily; task_paraphrase_contradiction = share of prompts whose greedy answers
to the 1 + T phrasings take >= 2 values, task_paraphrase_exact_match = exact match over the T templates. Each has its sample size; rep-n over fewer than MIN_CONTINUATION_TOKENS words is
missing with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from stablekd.data_pipeline.answers import ANSWER_STOP, answer
from stablekd.data_pipeline.sources import Corpus, read_documents
from stablekd.data_pipeline.tasks import Document, render
from stablekd.evaluation import metrics
from stablekd.evaluation.bios_probe import ProbeSettings, TextGenerator
from stablekd.evaluation.report import MIN_CONTINUATION_TOKENS


def held_out_tasks(files: Corpus, n: int) -> list[Document]:
    """The first `n` task records of the held-out text (rundir.eval_files)."""
    out: list[Document] = []
    for doc in read_documents(files):
        if doc.is_task:
            out.append(doc)
            if len(out) == n:
                break
    return out


@dataclass
class TaskProbeResult:
    metrics: dict[str, float]
    sizes: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)


def probe_tasks(
    gen: TextGenerator, tok, docs: Sequence[Document], cfg: ProbeSettings, stop: str = ANSWER_STOP
) -> TaskProbeResult:
    """Ask every record's prompt (greedy + evaluate.samples samples) and score the answers up to `stop`
    (data.answer_stop); see the module doc."""
    pairs = []
    for doc in docs:
        text, spans = render(tok, doc)
        pairs.append((text[: spans[0][0]], text[slice(*spans[0])]))
    prompts = [p for p, _ in pairs]
    greedy = gen(prompts, 1, True, cfg.max_new_tokens)
    torch.manual_seed(cfg.seed + 3)  # the bios probe uses seed and seed + 1, the prefixes seed + 2
    sampled = (
        gen(prompts, cfg.samples, False, cfg.max_new_tokens) if cfg.samples > 0 else [[] for _ in prompts]
    )
    raw = [g + s for g, s in zip(greedy, sampled, strict=True)]
    answers = [[answer(a, stop) for a in r] for r in raw]
    truth = [answer(ref, stop) or "" for _, ref in pairs]  # "" matches no answer
    result = TaskProbeResult(
        {
            "task_exact_match": metrics.accuracy(answers, truth),
            "task_agreement": metrics.self_consistency(answers),
            "task_contradiction": metrics.cross_contradiction(answers),
        }
    )
    asked = f"{len(docs)} held-out prompts"
    result.sizes["task_exact_match"] = asked
    for key in ("task_agreement", "task_contradiction"):
        result.sizes[key] = f"{asked} × {1 + cfg.samples} answers"
    if cfg.task_templates:
        T = len(cfg.task_templates)
        greedy_t = [
            gen([t.format(prompt=p) for p in prompts], 1, True, cfg.max_new_tokens)
            for t in cfg.task_templates
        ]
        phrased = [
            [answer(g[i][0], stop) for g in greedy_t] for i in range(len(prompts))
        ]  # [prompt][template]
        result.metrics["task_paraphrase_contradiction"] = metrics.cross_contradiction(
            [[a[0], *p] for a, p in zip(answers, phrased, strict=True)]
        )
        result.metrics["task_paraphrase_exact_match"] = (
            sum(metrics.accuracy([[p[t]] for p in phrased], truth) for t in range(T)) / T
        )
        result.sizes["task_paraphrase_contradiction"] = f"{asked} × {1 + T} phrasings (greedy)"
        result.sizes["task_paraphrase_exact_match"] = f"{asked} × {T} templates"
    texts = [a for r in sampled for a in r]
    words = sum(len(t.split()) for t in texts)
    for n in (2, 3):
        key = f"task_rep_{n}"
        result.metrics[key] = metrics.rep_n(texts, n)
        result.sizes[key] = f"{len(texts)} sampled answers, {words} words"
        if words < MIN_CONTINUATION_TOKENS:
            result.missing[key] = f"{words} words of sampled answers < {MIN_CONTINUATION_TOKENS}"
    result.examples = [
        {"group": "task", "prompt": p, "truth": ref, "answers": r}
        for (p, ref), r in zip(pairs[:3], raw[:3], strict=True)
    ]
    return result
