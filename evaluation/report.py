"""Measuring one model (held-out scores, degeneration, the embeddings coherence compares, efficiency) and the
report of all of them.

The pieces take a model (or a `TextGenerator`) and return numbers; each metric itself is defined once, in
evaluation/metrics.py (pure functions on counts, texts, answers and embeddings), under the name its report
key has (`ppl` = `metrics.perplexity`, `coherence` = `metrics.coherence`), with its row of the report
(`metrics.METRICS`); the metrics of continuations are computed from `metrics.CONTINUATION_METRICS`. `launcher/stages/evaluate.py`
wires the pieces for every model of a run and calls `write_report`.

- Perplexity: exp(mean next-token NLL) over the first `ppl_batches` packed held-out batches of
  `PPL_MICRO_BATCH` sequences (the stream the teacher's eval loss reads, so ppl = exp(eval loss)).
- Degeneration: each prefix (the first `prefix_tokens` tokens of a held-out document) is continued
  greedily and K times by sampling. rep-2/3/4 and diversity are computed on the greedy continuations
  (SimCTG's set-up: greedy decoding is where a model's loops show; sampling at T=1 hides them);
  distinct-2 is the mean over prefixes of distinct-2 within that prefix's K samples.
- Coherence: mean cosine between the embedding of a prefix and of its greedy continuation, each the
  mean-pooled last hidden states of one encoder for every model (default: the teacher).
- Efficiency: parameters; generation tokens/s on one fixed batch with a forced length; peak memory
  while the model is loaded and evaluated (CPU: the process's peak RSS above its RSS before loading;
  GPU: `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import io
import itertools
import json
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stablekd.data_pipeline.files import atomic_write
from stablekd.data_pipeline.sources import read_documents
from stablekd.data_pipeline.tokenizer import encode
from stablekd.evaluation import chart, metrics
from stablekd.evaluation.bios_probe import HFGenerator, ProbeSettings, TextGenerator
from stablekd.objectives.lm import HeadLoss, ce_fn, next_token_rows

PPL_MICRO_BATCH = 8  # sequences per perplexity forward: 8 × seq_len tokens
SPEED_BATCH = 8  # prompts in the fixed tokens/s batch

EFFICIENCY_KEYS = ("params", "gen_tokens_per_s", "peak_mem_mib")
# Student/teacher ratios in the report (issue: "ratios of parameters, accuracy, contradiction, perplexity
# and generation speed"): what the smaller model costs and what it keeps.
RATIO_KEYS = (*EFFICIENCY_KEYS, "bios_accuracy", "bios_cross_contradiction", "ppl", "bpb")


# --- held-out scores: perplexity, calibration, bits per byte ---------------------------------


class HeldOutScores(NamedTuple):
    ppl: float  # exp(summed NLL / counted tokens)
    tokens: int  # counted tokens
    ece: float  # expected calibration error of the next-token top-1
    bits_per_byte: float | None  # summed NLL / ln 2 / bytes of the counted tokens (None: no byte lengths)


@torch.no_grad()
def held_out_scores(
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    byte_lengths: np.ndarray | None = None,
) -> HeldOutScores:
    """Perplexity, counted tokens, calibration error and bits per byte over `batches` (dicts with
    input_ids and labels, (B, T)), from the last hidden state one chunk of logits at a time (model/head.py:
    over the tokenizer's ids, a padded vocabulary's rows cut as in training). The calibration error is that
    of the next-token top-1 prediction: confidence = its probability, correct = it is the next token,
    metrics.ECE_BINS equal-width bins (`metrics.calibration_error`). Bits per byte divide the same NLL (in bits) by
    the UTF-8 bytes of the counted tokens (`byte_lengths` per id: data_pipeline/align.py TokenBytes; a
    special token has none), so models with different tokenizers compare on it where perplexity cannot."""
    device = next(model.parameters()).device
    total, count, size = 0.0, 0, 0
    bins = torch.zeros(3, metrics.ECE_BINS, dtype=torch.float64)  # counts, confidence sums, correct sums
    for batch in batches:
        labels = batch["labels"].to(device)
        nll, counted = ce_fn(labels)
        targets = next_token_rows(labels)[0][:, 0]  # (B*T,): the token each position predicts

        loss, _ = model(
            input_ids=batch["input_ids"].to(device),
            head_loss=HeadLoss(nll, counted, _calibration(bins, counted, targets)),
        )
        total, count = total + loss.item(), count + int(counted.sum())
        if byte_lengths is not None:
            size += int(byte_lengths[targets[counted].cpu().numpy()].sum())
    bpb = metrics.bits_per_byte(total, size) if size else None
    ece = metrics.calibration_error(*bins.tolist())
    return HeldOutScores(metrics.perplexity(total, count), count, ece, bpb)


def _calibration(bins: torch.Tensor, counted: torch.Tensor, targets: torch.Tensor):
    """A HeadLoss observer adding each chunk's counted rows into the ECE bins (counts, confidence sums,
    correct sums): confidence = the top-1 probability exp(max − logsumexp), correct = it is the target."""

    def observe(z: torch.Tensor, s: slice) -> None:
        keep = counted[s]
        z = z.float()
        top, pred = z.max(-1)
        conf = (top - z.logsumexp(-1)).exp()[keep]
        b = (conf * metrics.ECE_BINS).long().clamp(max=metrics.ECE_BINS - 1).cpu()
        correct = (pred[keep] == targets[s][keep]).float()
        for row, values in enumerate((torch.ones_like(conf), conf, correct)):
            bins[row].index_add_(0, b, values.double().cpu())

    return observe


# --- degeneration --------------------------------------------------------------------------------


def load_prefixes(
    files: Sequence[Path], tokenizer: PreTrainedTokenizerBase, n: int, prefix_tokens: int
) -> list[str]:
    """The first `prefix_tokens` tokens (as text) of the first `n` plain documents longer than that.

    Only documents with text beyond the prefix count, so every prefix has a corpus continuation. Task
    records are the task probe's (evaluation/task_probe.py): a question cut at a token count says little
    about how a model continues text.
    """
    out: list[str] = []
    docs = (d.text for d in read_documents(files) if not d.is_task)
    for text in itertools.islice(docs, 50 * n):  # bounded: a corpus of short lines ends it
        ids = encode(tokenizer, [text])[0]
        if len(ids) > prefix_tokens:
            out.append(tokenizer.decode(ids[:prefix_tokens], skip_special_tokens=True))
        if len(out) == n:
            break
    return out


@dataclass
class Continuations:
    greedy: list[str]
    """One greedy continuation per prefix."""
    samples: list[list[str]]
    """K sampled continuations per prefix."""


def continue_prefixes(gen: TextGenerator, prefixes: Sequence[str], cfg: ProbeSettings) -> Continuations:
    """Every continuation exactly `max_new_tokens` long (end-of-text is not generated before): a model
    that stops early would otherwise show fewer n-grams, hence fewer repeats, for less text."""
    n = cfg.max_new_tokens
    greedy = [c[0] for c in gen(prefixes, 1, True, n, min_new_tokens=n)]
    torch.manual_seed(cfg.seed + 2)  # the probe uses seed and seed + 1
    samples = gen(prefixes, cfg.samples, False, n, min_new_tokens=n) if cfg.samples > 0 else []
    return Continuations(greedy, samples)


# Below these, a figure moves by more than its differences between models: shown missing, with why.
MIN_CONTINUATION_TOKENS = 256  # rep-n, diversity, distinct-2: one repeated 4-gram in 256 tokens is 0.4 points
MIN_PREFIXES = 8  # coherence: a mean cosine over fewer prefixes
MIN_PPL_TOKENS = 256  # perplexity


def continuation_sizes(n_prefixes: int, cfg: ProbeSettings) -> tuple[dict[str, str], dict[str, str]]:
    """(sample size, reason it is missing) of the degeneration and coherence rows, for `n_prefixes`
    held-out prefixes continued to evaluate.max_new_tokens tokens."""
    tokens = n_prefixes * cfg.max_new_tokens
    greedy = f"{n_prefixes} held-out prefixes × {cfg.max_new_tokens} tokens"
    size = {
        "greedy": greedy,
        "samples": f"{n_prefixes} prefixes × {cfg.samples} samples × {cfg.max_new_tokens} tokens",
    }
    sizes = {k: size[reads] for k, (reads, _) in metrics.CONTINUATION_METRICS.items()}
    sizes["coherence"] = greedy
    missing = {}
    if tokens < MIN_CONTINUATION_TOKENS:
        why = (
            f"{tokens} generated tokens < {MIN_CONTINUATION_TOKENS} (raise evaluate.prefixes or "
            "evaluate.max_new_tokens, or give more held-out text)"
        )
        missing = dict.fromkeys(metrics.CONTINUATION_METRICS, why)
    if n_prefixes < MIN_PREFIXES:
        missing["coherence"] = f"{n_prefixes} held-out prefixes < {MIN_PREFIXES}"
    return sizes, missing


def degeneration(cont: Continuations) -> dict[str, float]:
    """Every `metrics.CONTINUATION_METRICS` (rep-2/3/4 and diversity of the greedy continuations, distinct-2
    within each prefix's samples, ...) of one model's continuations; those on samples only when K > 0."""
    texts = {"greedy": cont.greedy, "samples": cont.samples}
    return {k: fn(texts[reads]) for k, (reads, fn) in metrics.CONTINUATION_METRICS.items() if texts[reads]}


# --- embeddings, for coherence -------------------------------------------------------------------


@torch.no_grad()
def embed(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """(N, D) mean of the last hidden states over each text's tokens (causal LM or encoder alike).

    An empty text (a continuation that ended at once) embeds to zeros, whose cosine with anything is 0.
    """
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = encode(tokenizer, list(texts[start : start + batch_size]))
        width = max(1, max(len(i) for i in ids))
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)  # (b, T)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)  # (b, T)
        # an all-zero mask row makes attention softmax NaN; give it one token and zero it after pooling
        safe = mask.clone()
        safe[:, 0] = 1
        hidden = model(input_ids=input_ids, attention_mask=safe, output_hidden_states=True).hidden_states[-1]
        m = mask.unsqueeze(-1).float()  # (b, T, 1)
        rows.append((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1))  # (b, D)
    return torch.cat(rows)


# --- efficiency ----------------------------------------------------------------------------------


def generation_speed(gen: HFGenerator, prompts: Sequence[str], max_new_tokens: int) -> float:
    """Tokens/s of one greedy batch of `prompts` forced to `max_new_tokens` new tokens each."""
    ids = gen.encode(prompts)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gen.generate_ids(ids, 1, True, max_new_tokens, min_new_tokens=max_new_tokens)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) * max_new_tokens / (time.perf_counter() - t0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of what happens between `start()` and `peak_mib()`.

    GPU: `max_memory_allocated` after a reset. CPU: Linux lets a process reset its peak RSS (write 5 to
    /proc/self/clear_refs); after garbage collection and glibc's `malloc_trim` the peak above the RSS at
    start is then this model's alone (give or take what a first model pays once, such as lazy imports). Where that is not
    allowed, the growth of the lifetime peak (`ru_maxrss`) is used, which reads 0 for a model that needs
    less than an earlier one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_kib = 0
        self.reset_peak = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Memory an earlier model freed but the allocator kept would be reused without raising RSS, and
        # the next model would read ~0: collect it and hand it back to the OS before the baseline.
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_peak = True
            self.base_kib = _status_kib("VmRSS") or 0
        except OSError:
            self.base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_kib("VmHWM") if self.reset_peak else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base_kib) / 1024


# --- the report ----------------------------------------------------------------------------------


def ratios(models: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """student/teacher and contrastive/teacher of each RATIO_KEYS metric, where both exist (and the teacher's is not 0)."""
    out: dict[str, dict[str, float]] = {}
    teacher = models.get("teacher")
    if not teacher:
        return out
    for name, values in models.items():
        if name == "teacher":
            continue
        r = {k: values[k] / teacher[k] for k in RATIO_KEYS if k in values and teacher.get(k)}
        if r:
            out[f"{name}/teacher"] = r
    return out


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if key in ("ppl", "bios_ppl"):
        return f"{value:.3f}"  # a 2 % change of a perplexity near 3 must show
    if key in ("gen_tokens_per_s", "peak_mem_mib") or "rep_" in key:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _quote(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def samples_markdown(samples: dict) -> str:
    """One model's sample generations: probe answers, free bios, prefix continuations."""
    lines = []
    for ex in samples.get("probe", []):
        if "prompt" in ex:
            answers = " / ".join(f"`{_quote(a.strip())}`" for a in ex["answers"])
            lines.append(
                f"- [{ex['group']}] *{_quote(ex['prompt'])}* → {answers} (truth: {_quote(ex['truth'])})"
            )
        else:
            lines.append(f"- [{ex['group']} free bio] {_quote(ex['bio'])}")
    for prefix, cont in samples.get("continuations", []):
        lines.append(f"- [prefix] *{_quote(prefix)}* → {_quote(cont)}")
    return "\n".join(lines)


def markdown(report: dict, samples: dict[str, dict], picture: str | None = None) -> str:
    """report.md: the side-by-side table (one row per metric, one column per model), ratios, samples;
    `picture`: the chart's file name beside it, shown first."""
    names = list(report["models"])
    sizes, missing = report.get("sizes", {}), report.get("missing", {})
    shown = {k for n in names for k in report["models"][n]} | set(missing)
    keys = [k for k in metrics.METRICS if k in shown]
    keys += sorted(shown - set(keys))
    out = ["# Stability report", ""] + ([f"![the key metrics per model]({picture})", ""] if picture else [])
    out += [
        "| metric | " + " | ".join(names) + " | computed on | note |",
        "| --- | " + " | ".join("---:" for _ in names) + " | --- | --- |",
    ]
    for k in keys:
        label, note = metrics.METRICS.get(k, (k, ""))
        if k in missing:
            note = f"missing: {missing[k]}"
        cells = [_fmt(k, report["models"][n].get(k)) for n in names]
        out.append(f"| {label} (`{k}`) | " + " | ".join(cells) + f" | {sizes.get(k, '')} | {note} |")
    if report.get("ratios"):
        out += ["", "| ratio | " + " | ".join(RATIO_KEYS) + " |", "| --- |" + " ---: |" * len(RATIO_KEYS)]
        for pair, r in report["ratios"].items():
            out.append(
                f"| {pair} | " + " | ".join(f"{r[k]:.3f}" if k in r else "–" for k in RATIO_KEYS) + " |"
            )
    if report.get("notes"):
        out += ["", "Notes:", *[f"- {n}" for n in report["notes"]]]
    for name in names:
        if samples.get(name):
            out += ["", f"## Samples: {name}", "", samples_markdown(samples[name])]
    return "\n".join(out) + "\n"


def write_report(report: dict, samples: dict[str, dict], eval_dir: Path, tb_dir: Path) -> dict[str, Path]:
    """eval/report.json, eval/report.md, eval/report.png (evaluation/chart.py; when the report has a
    charted metric), and the same report in TensorBoard under `tb_dir` (`write_tensorboard`)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": eval_dir / "report.json", "md": eval_dir / "report.md", "png": eval_dir / "report.png"}
    picture = chart.draw(report["models"], {k: label for k, (label, _) in metrics.METRICS.items()})
    if picture is None:
        paths.pop("png").unlink(missing_ok=True)  # a stale picture would contradict the new table
    else:
        png = io.BytesIO()
        picture.save(png, format="PNG")
        atomic_write(paths["png"], png.getvalue())
    text = markdown(report, samples, paths["png"].name if picture else None)
    for key, data in (("json", json.dumps(report, indent=2) + "\n"), ("md", text)):
        atomic_write(paths[key], data)
    write_tensorboard(report, samples, tb_dir, picture)
    return paths


def tensorboard_tag(metric: str) -> str:
    """The tag of a report metric: `efficiency/<metric>` for parameters, speed and memory, else `stability/<metric>`."""
    return f"{'efficiency' if metric in EFFICIENCY_KEYS else 'stability'}/{metric}"


def write_tensorboard(
    report: dict, samples: dict[str, dict], tb_dir: Path, picture: Image.Image | None = None
) -> None:
    """The report as TensorBoard shows it best: one run per model, the same tags in every run.

    `tb_dir`/<model>/ holds that model's metrics at step 0 under `tensorboard_tag(metric)` and, for the
    models other than the teacher, `<tag>_vs_teacher` (the report's ratios, e.g. `efficiency/params_vs_teacher`). Runs that share a
    tag are drawn in one chart, so each metric is one chart with a point per model (teacher, student,
    contrastive). TEXT tab: `samples` in each model's run (its sample generations) and `report` in
    `tb_dir` itself (the report.md table, ratios and notes). IMAGES tab: `picture` (report.png) as `report`.

    The event files of an earlier evaluation are deleted first: a re-run (the stage repeats when a model
    changed) would otherwise leave two points per model at step 0, the stale one beside the new.
    """
    for old in tb_dir.rglob("events.out.tfevents.*"):
        old.unlink()
    writers: list[SummaryWriter] = []
    try:
        summary = SummaryWriter(str(tb_dir))
        writers.append(summary)
        summary.add_text("report", markdown(report, {}), 0)  # no samples: they are in each model's run
        if picture is not None:
            summary.add_image("report", chart.as_array(picture), 0, dataformats="HWC")
        for name, values in report["models"].items():
            run = SummaryWriter(str(tb_dir / name))
            writers.append(run)
            for k, v in values.items():
                run.add_scalar(tensorboard_tag(k), v, 0)
            for k, v in report.get("ratios", {}).get(f"{name}/teacher", {}).items():
                run.add_scalar(f"{tensorboard_tag(k)}_vs_teacher", v, 0)
            if samples.get(name):
                run.add_text("samples", samples_markdown(samples[name]), 0)
    finally:
        for w in writers:
            w.flush()
            w.close()
