"""Stage `evaluate`: the stability and efficiency report of every model the run has (docs/architecture.md).

Models are the Hugging Face exports <run>/{teacher,student,contrastive}/hf, whichever exist, each loaded
whole (fp32 on CPU, bf16 on a GPU) and evaluated with the same prompts and seeds. When every model has
an export the stage runs in the launching process. A teacher with a complete ZeRO-3 checkpoint
(teacher/ckpt/complete.json) and no teacher/hf is evaluated from its shards, never consolidated: the
stage then runs on the teacher's ranks (`needs_ranks`; the deepspeed runner, like the other stages),
every rank loads the teacher partitioned (`artifacts.sharded_teacher`) and runs the same
prompts, batches and seeds (so the ZeRO-3 collectives stay in lockstep; `generate` with synced_gpus),
models with an export are loaded whole on every rank, and only rank 0 prints and writes.
Writes eval/report.json ({"models": {name: {metric: value}}, "ratios", "notes", ...}), eval/report.md
(one row per metric, one column per model, sample generations), TensorBoard runs tb/evaluate/<model>
with the same tags for every model (`stability/<metric>`, `efficiency/<metric>`: one chart per metric,
one point per model; `report.write_tensorboard`), and eval/DONE.json.

Under ranks, peak_mem_mib is rank 0's (its share of the sharded teacher) and gen_tokens_per_s includes
the collectives that gather the teacher's parameters at every forward.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.align import TokenBytes
from stablekd.data_pipeline.stream import eval_batches
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.evaluation import metrics, report
from stablekd.evaluation.bios_probe import HFGenerator, probe
from stablekd.evaluation.task_probe import held_out_tasks, probe_tasks
from stablekd.launcher import done, models, placement, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig, to_dict
from stablekd.launcher.rank import artifacts
from stablekd.launcher.stages import model_stage
from stablekd.model.build import count_params, load_model


def _sharded(path: Path) -> bool:
    return path.name == "ckpt"


def needs_ranks(cfg: ExperimentConfig) -> bool:
    """True when a model is evaluated from ZeRO-3 shards: the stage then runs on ranks, not in-process."""
    try:
        return any(_sharded(p) for p in models.find_models(cfg.run_dir).values())
    except ConfigError:
        return False  # nothing to evaluate: preflight says so


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def _device_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # fp32 on CPU: for the small quickstart models generation is overhead-bound and bf16 was no faster
    return torch.device("cpu"), torch.float32


def _load(
    path: Path, fallback_tok: Path, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    tok_dir = path if _has_tokenizer(path) else fallback_tok
    tokenizer = load_tokenizer(tok_dir)
    return load_model(path, tokenizer, dtype).to(device).eval(), tokenizer, tok_dir


def _perplexity(
    model: PreTrainedModel,
    files: Sequence[Path],
    tok_dir: Path,
    cfg: ExperimentConfig,
    tok: PreTrainedTokenizerBase,
) -> report.HeldOutScores | None:
    """`report.held_out_scores` on the first evaluate.ppl_batches held-out batches of the model's own tokenizer
    (its ids, and the bytes they stand for: bits per byte); None when `files` yield no batch."""
    batches = eval_batches(
        files, tok_dir, cfg.data.seq_len, report.PPL_MICRO_BATCH, cfg.evaluate.ppl_batches, 0, 1
    )
    if not batches:
        return None
    return report.held_out_scores(model, batches, TokenBytes.from_tokenizer(tok).lengths)


def _trained_task_records(cfg: ExperimentConfig) -> int:
    """Task records the teacher trained on (its DONE.json data counts; 0 when it has none)."""
    path = rundir.done_path(cfg, "teacher")
    if not path.is_file():
        return 0
    return int(json.loads(path.read_text()).get("produced", {}).get("data_stats", {}).get("task_records", 0))


def _contrastive_labels(cfg: ExperimentConfig) -> dict | None:
    """How the contrastive stage labelled its candidate groups (its DONE.json), None when it did not say."""
    path = rundir.done_path(cfg, "contrastive")
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("produced", {}).get("labels")


def run(cfg: ExperimentConfig) -> None:
    if needs_ranks(cfg):  # started by the deepspeed runner on every rank (pipeline.run)
        from stablekd.launcher.rank import engine

        rank, _ = engine.setup_distributed(cfg.launch.threads_per_rank, cfg.launch.timeout_s)
        if torch.cuda.is_available():  # whole models go to "cuda": this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        hf_logging.disable_progress_bar()
        if rank != 0:  # rank 0 speaks for all
            hf_logging.set_verbosity_error()
            logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        # no_grad, not inference_mode: ZeRO-3 re-partitions gathered parameters in place after each forward
        with torch.no_grad():
            _evaluate(cfg, rank)
        torch.distributed.barrier()
        return
    # One rank's share of the cores, as a training rank gets (launch.threads_per_rank; 0 = cores ÷ ranks
    # per node); restored after, since the stage runs inside the launching process. Decoding is thousands
    # of small ops per token, each an OpenMP barrier: on 2 cores shared with other work the quickstart
    # teacher took 145 s with 2 threads and 28 s with 1 (1 thread was ~1.2x slower on idle cores).
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(placement.threads_per_rank(cfg))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load says nothing here
    try:
        with torch.inference_mode():
            _evaluate(cfg, 0)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _evaluate(cfg: ExperimentConfig, rank: int) -> None:
    """Every model of the run; under ranks (rank = this rank) every rank runs it all, rank 0 writes."""
    t_start = time.perf_counter()
    say = rundir.say if rank == 0 else (lambda msg: None)
    ecfg, run_dir = cfg.evaluate, cfg.run_dir
    found = models.find_models(run_dir)
    encoder_src = models.encoder_dir(ecfg.coherence_encoder) if ecfg.coherence_encoder else None
    device, dtype = _device_dtype()
    run_tok_dir = models.tokenizer_dir(cfg)
    run_tok = load_tokenizer(run_tok_dir)
    notes: list[str] = []
    sharded = None  # the teacher from its shards, loaded once (its load is a DeepSpeed engine)

    def load(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Path]:
        nonlocal sharded
        if not _sharded(path):
            return _load(path, run_tok_dir, device, dtype)
        if sharded is None:
            with torch.enable_grad():  # deepspeed.initialize builds an optimizer: not under no_grad
                sharded = artifacts.sharded_teacher(cfg)
            notes.append(
                f"teacher: evaluated from its ZeRO-3 shards ({sharded.checkpoint_id}) on "
                f"{torch.distributed.get_world_size()} ranks"
            )
        return sharded.engine.module, sharded.tokenizer, run_tok_dir

    builtin = not cfg.data.paths
    people: list[bios.Person] = []
    unseen: list[bios.Person] = []
    bios_heldout = run_dir / "data" / "heldout.txt"
    if builtin:
        people, unseen = bios.load_truth(run_dir / "data" / "truth.json")
    else:
        notes.append(
            "bios_* keys absent: the run trains on a user corpus (data.paths); the bios probe needs the "
            "built-in corpus and its ground truth"
        )
    # Held-out text (rundir.eval_files): data.eval_paths, the share of data.paths every training stage
    # left out (data.eval_fraction), or the bios held-out biographies. It may hold no document at all.
    held = rundir.eval_files(cfg)
    # Prefixes from held-out text only: a continuation of training text measures recall, not generation.
    prefixes = report.load_prefixes(held, run_tok, ecfg.prefixes, ecfg.prefix_tokens) if held else []
    sizes, missing = report.continuation_sizes(len(prefixes), ecfg)
    if not prefixes:
        why = (
            f"no held-out plain document longer than {ecfg.prefix_tokens} tokens"
            if held
            else "no held-out text"
        )
        missing = dict.fromkeys(sizes, why)
    speed_prompts = (prefixes or ["The"])[: report.SPEED_BATCH]
    tasks = held_out_tasks(held, ecfg.task_prompts) if held else []
    if not tasks and _trained_task_records(cfg):
        notes.append("task_* keys absent: the training data has task records but the held-out text has none")

    # Warm-up outside every measurement: lazy imports, kernel set-up and allocator pools that the first
    # model would otherwise pay for alone in peak memory and tokens/s.
    # (A sharded teacher pays it itself: its load is what would be measured.)
    whole = [p for p in found.values() if not _sharded(p)]
    if whole:
        model, tok, _ = _load(whole[0], run_tok_dir, device, dtype)
        HFGenerator(model, tok)(speed_prompts[:2], 2, False, 4)
        del model, tok

    results: dict[str, dict[str, float]] = {}
    no_ppl: list[str] = []
    samples: dict[str, dict] = {}
    greedy: dict[str, list[str]] = {}
    for name, path in found.items():
        t0 = time.perf_counter()
        meter = report.MemoryMeter(device)
        meter.start()
        model, tok, tok_dir = load(path)
        synced = _sharded(path) and sharded.zero3 and torch.distributed.get_world_size() > 1
        gen = HFGenerator(model, tok, ecfg.temperature, ecfg.top_p, ecfg.batch_size, synced_gpus=synced)
        m: dict[str, float] = {}
        ppl = _perplexity(model, held, tok_dir, cfg, tok) if held else None
        if ppl is not None:
            m["ppl"], m["ece"], m["bpb"] = ppl.ppl, ppl.ece, ppl.bits_per_byte
            sizes["ppl"] = sizes["bpb"] = f"{ppl.tokens} held-out tokens"
            sizes["ece"] = f"{ppl.tokens} held-out tokens, {metrics.ECE_BINS} bins"
            if ppl.tokens < report.MIN_PPL_TOKENS:
                why = f"{ppl.tokens} held-out tokens < {report.MIN_PPL_TOKENS}"
                missing["ppl"] = missing["ece"] = missing["bpb"] = why
        else:
            no_ppl.append(name)
        if builtin:
            same = not cfg.data.eval_paths  # held is then the bios held-out file itself
            bios_ppl = ppl if same else _perplexity(model, [bios_heldout], tok_dir, cfg, tok)
            if bios_ppl is not None:
                m["bios_ppl"] = bios_ppl.ppl
                sizes["bios_ppl"] = f"{bios_ppl.tokens} held-out biography tokens"
            result = probe(gen, people, unseen, ecfg)
            m.update(result.metrics)
            sizes.update(result.sizes)
            samples[name] = {"probe": result.examples}
        if tasks:
            asked = probe_tasks(gen, tok, tasks, ecfg, cfg.data.answer_stop)
            m.update(asked.metrics)
            sizes.update(asked.sizes)
            missing.update(asked.missing)
            samples.setdefault(name, {}).setdefault("probe", []).extend(asked.examples)
        if prefixes:
            cont = report.continue_prefixes(gen, prefixes, ecfg)
            m.update(report.degeneration(cont))
            greedy[name] = cont.greedy
            samples.setdefault(name, {})["continuations"] = list(
                zip(prefixes[:3], cont.greedy[:3], strict=True)
            )
        for key in missing:
            m.pop(key, None)
        m["params"] = count_params(model)
        m["gen_tokens_per_s"] = report.generation_speed(gen, speed_prompts, ecfg.max_new_tokens)
        m["peak_mem_mib"] = meter.peak_mib()
        results[name] = m
        del gen, model
        say(
            f"evaluate: {name}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in m.items() if k in ("ppl", "bios_accuracy", "rep_2"))
            + f" ({time.perf_counter() - t0:.1f}s)"
        )

    labels = _contrastive_labels(cfg) if "contrastive" in found else None
    if labels:
        notes.append(
            f"contrastive: candidate groups labelled with contrastive.labels={labels['rule']}: "
            + ", ".join(f"{n} by {r}" for r, n in sorted(labels["groups"].items()))
            + "".join(f"; {n} {v} rows" for v, n in sorted(labels["rows"].items()))
        )
    if no_ppl:
        notes.append(
            f"ppl absent for {', '.join(no_ppl)}: no held-out text (set data.eval_paths, or "
            "data.eval_fraction > 0 for a share of data.paths)"
        )

    # Coherence last, with one encoder for every model, so the numbers compare across columns.
    encoder_name = (
        str(encoder_src) if encoder_src else ("teacher" if "teacher" in found else next(iter(found)))
    )
    if prefixes and "coherence" not in missing:
        if encoder_src:
            encoder = AutoModel.from_pretrained(str(encoder_src)).to(device).eval()
            enc_tok = AutoTokenizer.from_pretrained(str(encoder_src))
        else:
            encoder, enc_tok, _ = load(found[encoder_name])
            if encoder_name != "teacher":
                notes.append(f"coherence encoder: {encoder_name} (the run has no teacher/hf)")
        for name in found:
            pairs = report.embed(encoder, enc_tok, prefixes), report.embed(encoder, enc_tok, greedy[name])
            results[name]["coherence"] = metrics.coherence(*pairs)
        del encoder
    if rank != 0:
        return

    out = {
        "models": results,
        "ratios": report.ratios(results),
        "sizes": sizes,  # what each figure was computed on
        "missing": missing,  # figures not shown, and why
        "notes": notes,
        "contrastive_labels": labels,
        "coherence_encoder": encoder_name,
        "device": str(device),
        "settings": to_dict(ecfg),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    paths = report.write_report(out, samples, run_dir / "eval", rundir.tb_dir(cfg, "evaluate"))
    produced = {"report_json": str(paths["json"]), "report_md": str(paths["md"]), "models": list(found)}
    inputs = {
        "models": {n: str(p) for n, p in found.items()},
        "model_config_hashes": {
            n: json.loads(rundir.done_path(cfg, model_stage(n).name).read_text())["config_hash"]
            for n in found
            if rundir.done_path(cfg, model_stage(n).name).is_file()
        },
        "tokenizer_hash": tokenizer_hash(run_tok_dir),
    }
    done.write_done(cfg, "evaluate", produced, inputs)
    say(f"evaluate: report -> {paths['md']} ({out['seconds']}s)")
