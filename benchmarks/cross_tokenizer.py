"""Distillation across tokenizers: a student with a byte-level BPE tokenizer learns from the SentencePiece
teacher's soft labels, beside the same-tokenizer student, on the same records.

    python benchmarks/cross_tokenizer.py --run runs/quickstart [--steps 450] [--cross-alpha 0.5]

--run is a run directory with a finished teacher (teacher/ckpt, teacher/hf) and soft labels (soft_labels/,
with token_bytes.safetensors). It is never written: each arm trains in its own directory under a temp
folder (benchmarks/arms.py `arm_config`, `train_arm`: DeepSpeed at world size 1, the run's
distill settings, the same micro batch, lr and schedule, every arm reading the same soft-label records in
the same order, so the same text).

The other tokenizer: byte-level BPE (GPT-2's convention, `Ġ` for a space; the teacher's SentencePiece
writes `▁` and falls back to bytes) trained with the `tokenizers` library on the run's training
documents, of --bpe-vocab ids (default: the teacher's vocabulary size); the student is the run's student
preset built with that vocabulary, from the same seed (a directory written into the temp folder).

Arms (--steps each):
- `same tok, CE`: the run's tokenizer, the distill loss at alpha 0 (cross-entropy on the records);
- `same tok, KD`: the run's tokenizer, the distill stage as configured (alpha 1 in the quickstart);
- `BPE, CE`: the BPE student, alpha 0 (cross-entropy on its own tokens of the same text);
- `BPE, ULD` and `BPE, hybrid`: `distill.cross_tokenizer=uld|hybrid` at --cross-alpha.

Scored as benchmarks/distill.py scores (benchmarks/arms.py `score`: each export loaded whole with its own tokenizer):
held-out bits per byte (comparable across tokenizers, unlike perplexity), perplexity (within one
tokenizer only), bios accuracy and cross-sample contradiction on trained people, generation tokens/s;
step time (median of perf/step_time_s after --warmup, with the realignment's cost included); the share
of counted teacher positions that align (train/aligned_share, mean over the run) and of the record's
text the BPE student keeps (student tokens past seq_len are cut).

Goal (issue #21): hybrid cross-tokenizer KD beats CE-only on bits per byte and recovers at least half of
the same-tokenizer KD gain over CE: (bpb(BPE, CE) − bpb(BPE, hybrid)) ≥ 0.5 · (bpb(same, CE) − bpb(same,
KD)). Prints a table and writes benchmarks/results/cross_tokenizer.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import arms as bench  # benchmarks/arms.py: this script's folder is on sys.path
import provenance
import single_rank
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.sources import iter_documents
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.evaluation import report
from stablekd.launcher import rundir
from stablekd.launcher.config import load_config
from stablekd.launcher.rank.monitor import read_scalars
from stablekd.model.build import build_model, export_hf

REPO = Path(__file__).resolve().parent.parent
GOAL_SHARE = 0.5
EOS = "<|endoftext|>"


def bpe_student(cfg, out: Path, vocab: int) -> Path:
    """A directory with the run's student preset built for a byte-level BPE tokenizer trained on the run's
    training documents (`vocab` ids), saved with that tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(iter_documents(rundir.train_files(cfg)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(out)
    model = build_model(cfg.student.model, load_tokenizer(out), cfg.data.seq_len, cfg.run.seed)
    model.save_pretrained(out, safe_serialization=True)
    return out


def kept_text(cfg, student_dir: Path) -> float:
    """Share of the records' bytes inside the BPE student's seq_len tokens, on the first 64 records."""
    from stablekd.data_pipeline.align import TOKEN_BYTES_FILE, Aligner, TokenBytes
    from stablekd.data_pipeline.shards.loader import ShardLoader
    from stablekd.data_pipeline.soft_labels import soft_label_reader

    out = rundir.stage_dir(cfg, "soft_labels")
    teacher = TokenBytes.load(out / TOKEN_BYTES_FILE)
    aligner = Aligner(teacher, load_tokenizer(student_dir), cfg.data.seq_len)
    kept = total = 0
    for _, batch in zip(range(8), ShardLoader(soft_label_reader(out, {}, 0, 1), 8), strict=False):
        ids = batch["input_ids"].numpy()
        for row, rec in zip(ids, aligner.records(ids, ids >= 0), strict=True):
            total += int(teacher.lengths[row].sum())
            kept += int(aligner.student.lengths[rec.input_ids].sum())  # padding and EOS: no bytes
    return min(1.0, kept / max(1, total))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--run", required=True, help="run directory with teacher/ckpt, teacher/hf and soft_labels/"
    )
    ap.add_argument("--steps", type=int, default=450, help="steps of every arm")
    ap.add_argument("--cross-alpha", type=float, default=0.5, help="alpha of the ULD and hybrid arms")
    ap.add_argument("--bpe-vocab", type=int, default=0, help="BPE ids (0: the teacher's vocabulary size)")
    ap.add_argument(
        "--warmup", type=int, default=10, help="first steps of each arm left out of the step time"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cross_tokenizer.json"))
    args = ap.parse_args()
    src = Path(args.run).resolve()
    for need in ("config.yaml", "soft_labels/manifest.json", "soft_labels/token_bytes.safetensors"):
        if not (src / need).is_file():
            ap.error(f"{src / need} missing: --run needs a finished soft_labels stage of this version")
    single_rank.start(29536, args.threads)
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="stablekd_bench_xtok_"))
    print(f"arms in {work}", flush=True)
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    run_cfg = load_config(src / "config.yaml")
    vocab = args.bpe_vocab or len(load_tokenizer(src / "tokenizer"))
    student_dir = bpe_student(run_cfg, work / "bpe_student", vocab)
    opts = argparse.Namespace(alpha=run_cfg.distill.alpha, student="", dtype="")

    plan = [
        ("same tok, CE", "same_ce", 0.0, []),
        ("same tok, KD", "same_kd", None, []),
        ("BPE, CE", "bpe_ce", 0.0, [f"student.model={student_dir}", "distill.cross_tokenizer=uld"]),
        (
            "BPE, ULD",
            "bpe_uld",
            args.cross_alpha,
            [f"student.model={student_dir}", "distill.cross_tokenizer=uld"],
        ),
        (
            "BPE, hybrid",
            "bpe_hybrid",
            args.cross_alpha,
            [f"student.model={student_dir}", "distill.cross_tokenizer=hybrid"],
        ),
    ]
    rows, exports = [], {}
    for name, folder, alpha, extra in plan:
        cfg = bench.arm_config(src, work / folder, opts, online=False, alpha=alpha, extra=extra)
        arm = bench.train_arm(cfg, "kd", args.steps)
        hf = cfg.run_dir / "student" / "hf"
        export_hf(arm["result"].engine.module, arm["tokenizer"], hf, arm["zero3"])
        exports[name] = hf
        times = bench.step_times(cfg, args.warmup)
        share = read_scalars(cfg.run_dir / "tb" / "distill", "train/aligned_share")
        rows.append({
            "arm": name, "alpha": cfg.distill.alpha, "cross_tokenizer": cfg.distill.cross_tokenizer,
            "tokenizer_ids": len(arm["tokenizer"]), "params": arm["params"], "steps": arm["result"].steps,
            "tokens": arm["result"].tokens, "step_time_s": statistics.median(times) if times else None,
            "aligned_share": statistics.mean(share.values()) if share else None,
            "train_wall_s": arm["wall_s"], "eval_loss": arm["result"].eval_loss,
        })  # fmt: skip
        del arm["result"].engine
        gc.collect()

    base = bench.arm_config(src, work / "score", opts, online=False)
    people = bios.load_truth(src / "data" / "truth.json")[0] if not base.data.paths else []
    prefixes = report.load_prefixes(
        rundir.eval_files(base) or rundir.train_files(base), load_tokenizer(src / "tokenizer"),
        report.SPEED_BATCH, base.evaluate.prefix_tokens,
    )  # fmt: skip
    keys = ("bpb", "ppl", "bios_accuracy", "bios_cross_contradiction", "gen_tokens_per_s")
    for r in rows:
        q = bench.score(exports[r["arm"]], base, people, prefixes or ["The"])
        r.update({k: q.get(k) for k in keys})
    teacher_q, teacher_from = bench.teacher_figures(src, base, people, prefixes or ["The"])
    if teacher_q:
        rows.append({"arm": "teacher", **{k: teacher_q.get(k) for k in ("params", *keys)}})
    by = {r["arm"]: r for r in rows}
    same_gain = by["same tok, CE"]["bpb"] - by["same tok, KD"]["bpb"]
    cross_gain = {m: by["BPE, CE"]["bpb"] - by[f"BPE, {m}"]["bpb"] for m in ("ULD", "hybrid")}
    recovered = {m: g / same_gain if same_gain > 0 else None for m, g in cross_gain.items()}
    goals = {
        "hybrid bpb < BPE CE bpb": cross_gain["hybrid"] > 0,
        f"hybrid recovers >= {GOAL_SHARE} of the same-tokenizer KD gain": (recovered["hybrid"] or 0)
        >= GOAL_SHARE,
    }
    result = {
        **provenance.header(),
        "run": str(src),
        "student": run_cfg.student.model,
        "bpe_vocab": vocab,
        "teacher_tokenizer": f"SentencePiece, {len(load_tokenizer(src / 'tokenizer'))} ids",
        "seq_len": run_cfg.data.seq_len,
        "micro_batch_size": run_cfg.distill.micro_batch_size,
        "steps": args.steps,
        "kind": run_cfg.distill.kind,
        "temperature": run_cfg.distill.temperature,
        "encoding": run_cfg.soft_labels.encoding,
        "k": run_cfg.soft_labels.k,
        "bpe_text_kept": kept_text(bench.arm_config(src, work / "kept", opts, online=False), student_dir),
        "dtype_path": "fp32" if not torch.cuda.is_available() else "see rows",
        "threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]],
        "teacher_figures_from": teacher_from,
        "same_tokenizer_gain_bpb": same_gain,
        "cross_gain_bpb": cross_gain,
        "recovered": recovered,
        "rows": rows,
        "goals": goals,
        "seconds": round(time.perf_counter() - t_start, 1),
    }

    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out} ({result['seconds']}s)")


def table(result: dict) -> str:
    """docs/results.md's table: one row per arm (bits per byte compare across tokenizers, perplexity within
    one), then the gains over CE and the goals."""
    f = provenance.cell
    same, cross, rec = result["same_tokenizer_gain_bpb"], result["cross_gain_bpb"], result["recovered"]
    header = ["arm", "alpha", "bits/byte", "ppl (own tokens)", "bios accuracy", "contradiction", "aligned", "step s",
              "gen tok/s"]  # fmt: skip
    rows = [
        [r["arm"], f(r.get("alpha"), ".1f"), f(r["bpb"], ".4f"), f(r["ppl"], ".3f"), f(r["bios_accuracy"], ".3f"),
         f(r["bios_cross_contradiction"], ".3f"), f(r.get("aligned_share"), ".3f"), f(r.get("step_time_s"), ".4f"),
         f(r.get("gen_tokens_per_s"), ",.0f")]
        for r in result["rows"]
    ]  # fmt: skip
    lines = [provenance.markdown_table(header, rows)]
    lines += [
        "",
        f"Bits per byte gained over CE: same tokenizer {same:.4f}, ULD {cross['ULD']:.4f}, hybrid {cross['hybrid']:.4f} "
        f"(hybrid recovers {f(rec['hybrid'], '.2f')} of the same-tokenizer gain). BPE student {result['bpe_vocab']:,} "
        f"ids, {result['steps']} steps per arm, {result['encoding']} labels; it keeps {result['bpe_text_kept']:.1%} of "
        "the records' text within seq_len.",
        "",
        *(f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in result["goals"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
