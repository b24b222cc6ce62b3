"""Soft-label encodings: bytes per token, fidelity, write/read speed, and the student each one trains.

    python benchmarks/soft_label_encodings.py --run runs/quickstart [--sequences 512] [--steps 300]

--run is a run directory with a finished teacher (teacher/hf, tokenizer/, config.yaml); it is never
written. The teacher (loaded whole, one process) labels the first --sequences sequences of the run's
training stream once; its logits are kept in memory and every arm encodes the same logits
(`SoftLabelWriter.add_logits`, shards + manifest in a temp folder), so arms differ only in what they store.

Per arm: bytes per token on disk (shards / tokens), write throughput (encode + serialise + sha256 +
rename, tokens/s), read throughput (`Decoded(ShardLoader(...))`, tokens/s), kept mass and KL(teacher ‖
stored + flat tail) on every position of the first 8 sequences (`data_pipeline.fidelity`). Then a student
(the run's `student.model`, same seed) trains --steps steps at world size 1 with the distill stage's
loss (`distill.kind` fkl, alpha 1) on that arm's shards, all arms on the same sequences in the same
order, and is scored like the evaluate stage: held-out perplexity and expected calibration error
(`report.held_out_scores`), bios accuracy on trained people where the run has the bios corpus. Step time is
the median of the loop's `perf/step_time_s` after --warmup, relative to the CE control's (the same
shards, alpha 0: next-token cross-entropy on the same sequences).

The reference arm `full` stores every id (topk with k = V): the loss is then the exact full-vocabulary
forward KL (the tail bin is empty), i.e. full-logit KD, read from shards instead of a teacher in the job
(online labelling computes the same numbers; benchmarks/distill.py times the online path).

Goal (issue: soft labels at a quarter of the bytes): an encoding at <= 32 bytes/token whose student is
within 1 % of the full-logit student's perplexity and no worse calibrated. Prints a table, writes
benchmarks/results/soft_label_encodings[-<name>].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import single_rank  # noqa: E402
from distill import score, step_times, train_arm  # noqa: E402  (benchmarks/distill.py: the arm loop)

from stablekd.data_pipeline import bios, encodings  # noqa: E402
from stablekd.data_pipeline.encodings import Decoded  # noqa: E402
from stablekd.data_pipeline.fidelity import fidelity  # noqa: E402
from stablekd.data_pipeline.shards.loader import ShardLoader  # noqa: E402
from stablekd.data_pipeline.soft_labels import (  # noqa: E402
    SoftLabelWriter,
    config_meta,
    encoding_meta,
    finalize_soft_labels,
    soft_label_reader,
)
from stablekd.data_pipeline.stream import PackedStream  # noqa: E402
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash  # noqa: E402
from stablekd.launcher import models, rundir  # noqa: E402
from stablekd.launcher.config import load_config, save_config  # noqa: E402
from stablekd.model.build import export_hf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_BYTES = 32
GOAL_PPL = 0.01

# name -> soft_labels settings (the rest of the section as the run has it): the reference, then each
# registered encoding's arms (data_pipeline/encodings.py)
ARMS: dict[str, dict] = {
    "full": {"encoding": encodings.TopK.name, "k": -1, "logprob_bits": 16},  # k = V: the full-logit loss
    **{
        arm: {"encoding": name, **params}
        for name, enc in encodings.REGISTRY.items()
        for arm, params in enc.arms.items()
    },
}


def teacher_logits(cfg, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(input_ids [n, L], labels [n, L], teacher logits [n, L, V] fp32) of the first n training sequences,
    and the teacher's tokens/s."""
    tok_dir, L = models.tokenizer_dir(cfg), cfg.data.seq_len
    model = AutoModelForCausalLM.from_pretrained(
        str(cfg.run_dir / "teacher" / "hf"), dtype=torch.float32
    ).eval()
    ids, labels = [], []
    for b in PackedStream(rundir.train_files(cfg), tok_dir, L, 8, loop=True):
        ids.append(b["input_ids"])
        labels.append(b["labels"])
        if sum(x.shape[0] for x in ids) >= n:
            break
    ids, labels = torch.cat(ids)[:n], torch.cat(labels)[:n]
    t0 = time.perf_counter()
    with torch.no_grad():
        vocab = len(load_tokenizer(models.tokenizer_dir(cfg)))  # padded embedding rows cut, as the stage does
        logits = torch.cat(
            [model(input_ids=ids[i : i + 8]).logits[..., :vocab].float() for i in range(0, n, 8)]
        )
    return ids, labels, logits, ids.numel() / (time.perf_counter() - t0)


def arm_run(src: Path, work: Path, name: str, settings: dict, vocab: int, args) -> tuple:
    """The arm's run directory (linking the run's tokenizer and data) and its config."""
    arm = work / name
    arm.mkdir(parents=True)
    for part in ("tokenizer", "data"):
        if (src / part).exists():
            (arm / part).symlink_to(src / part)
    (arm / "ds").mkdir()
    sl = {**settings, "k": vocab if settings.get("k") == -1 else settings.get("k", encodings.K.default)}
    overrides = [f"soft_labels.{k}={v}" for k, v in sl.items()] + [
        f"run.out_dir={arm}", "launch.nproc_per_node=1", "launch.hostfile=", "distill.log_every=1",
        "distill.eval_every=0", "distill.save_every=1000000000", "distill.export_hf=false",
        "distill.follow=false", "distill.online=false", "distill.kind=fkl", f"distill.alpha={args.alpha}",
    ]  # fmt: skip
    if args.student:
        overrides.append(f"student.model={args.student}")
    if args.seed is not None:  # another student initialisation (the labelled sequences stay the same)
        overrides.append(f"run.seed={args.seed}")
    cfg = load_config(src / "config.yaml", overrides)
    save_config(cfg, arm / "config.yaml")
    return arm, cfg


def write_arm(cfg, ids: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, vocab: int) -> dict:
    """Encode the logits into <arm>/soft_labels; bytes, write and read speed, fidelity."""
    sl, L = cfg.soft_labels, cfg.data.seq_len
    out = rundir.stage_dir(cfg, "soft_labels")
    meta = config_meta(sl, "bench", tokenizer_hash(models.tokenizer_dir(cfg)), vocab, L)
    fid = fidelity(logits[:8].reshape(-1, vocab), meta)
    t0 = time.perf_counter()
    w = SoftLabelWriter(out, 0, meta, records_per_shard=64, seed=cfg.run.seed)
    for i in range(0, ids.shape[0], 8):
        w.add_logits(ids[i : i + 8], logits[i : i + 8], labels[i : i + 8] != -100)
    w.close()
    manifest = finalize_soft_labels(out, 1, fid)
    write_s = time.perf_counter() - t0
    tokens = ids.numel()
    t0 = time.perf_counter()
    read = sum(
        b["input_ids"].numel() for b in Decoded(ShardLoader(soft_label_reader(out), 8), encoding_meta(sl, L))
    )
    read_s = time.perf_counter() - t0
    assert read == tokens
    bytes_ = sum(s["bytes"] for s in manifest["shards"])
    return {
        "bytes_per_token": bytes_ / tokens,
        "write_tokens_per_s": tokens / write_s,
        "read_tokens_per_s": tokens / read_s,
        "kept_mass": fid["topk_mass"],
        "kl_nats": fid["kl"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "quickstart")
    ap.add_argument("--sequences", type=int, default=512, help="training sequences labelled (once)")
    ap.add_argument("--steps", type=int, default=300, help="student optimizer steps per arm")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the median step time")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--student", default="")
    ap.add_argument(
        "--seed", type=int, default=None, help="run.seed of the arms (student init); default the run's"
    )
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    single_rank.start(29535)
    hf_logging.disable_progress_bar()
    src = args.run.resolve()
    base = load_config(src / "config.yaml", [f"run.out_dir={src}"])
    ids, labels, logits, teacher_tps = teacher_logits(base, args.sequences)
    vocab = logits.shape[-1]
    people = []
    if not base.data.paths and (src / "data" / "truth.json").is_file():
        people, _ = bios.load_truth(src / "data" / "truth.json")
    speed_prompts = ["The"] * 8
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="slenc-"))

    def train_and_score(cfg, row: dict) -> None:
        trained = train_arm(cfg, "kd", args.steps)
        times = step_times(cfg, args.warmup)
        row["step_s"] = statistics.median(times) if times else None
        hf = cfg.run_dir / "student" / "hf"
        export_hf(trained["result"].engine.module, trained["tokenizer"], hf, trained["zero3"])
        del trained["result"].engine
        gc.collect()
        row.update(score(hf, cfg, people, speed_prompts))
        rows.append(row)
        print(
            f"  {row['arm']}: {json.dumps({k: v for k, v in row.items() if k != 'arm'}, default=str)}",
            flush=True,
        )

    try:
        for name in [n for n in args.arms.split(",") if n]:
            _, cfg = arm_run(src, work, name, ARMS[name], vocab, args)
            train_and_score(cfg, {"arm": name, **write_arm(cfg, ids, labels, logits, vocab)})
        # The control: alpha 0 (next-token cross-entropy) on the smallest arm's shards, same sequences.
        smallest = min(rows, key=lambda r: r["bytes_per_token"])["arm"]
        arm, cfg = arm_run(src, work, "CE", ARMS[smallest], vocab, args)
        shutil.copytree(work / smallest / "soft_labels", arm / "soft_labels")
        cfg.distill.alpha = 0.0
        train_and_score(cfg, {"arm": "CE"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = summarize(rows)
    seed = "" if args.seed is None else f"-seed{args.seed}"
    out = args.out or REPO / "benchmarks" / "results" / f"soft_label_encodings-{src.name}{seed}.json"
    result = {
        **provenance.header(),
        "run": str(src), "sequences": args.sequences, "steps": args.steps, "seed": args.seed,
        "teacher_tokens_per_s": teacher_tps, "threads": torch.get_num_threads(), **result,
    }  # fmt: skip
    print(table(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"-> {out}")


def summarize(rows: list[dict]) -> dict:
    """Each arm's step time over CE's and perplexity over full logits'; the arms that meet the goal."""
    ref = next((r for r in rows if r["arm"] == "full"), None)
    ce = next(r for r in rows if r["arm"] == "CE")
    for r in rows:
        r["step_vs_ce"] = r["step_s"] / ce["step_s"] if r.get("step_s") and ce.get("step_s") else None
        if ref and "ppl" in r and "ppl" in ref:
            r["ppl_vs_full"] = r["ppl"] / ref["ppl"] - 1
    ok = [
        r for r in rows
        if ref and r["arm"] not in ("full", "CE") and r["bytes_per_token"] <= GOAL_BYTES
        and r.get("ppl_vs_full", 1) <= GOAL_PPL and r.get("ece", 1) <= ref.get("ece", 0) + 1e-9
    ]  # fmt: skip
    choice = min(ok, key=lambda r: r["bytes_per_token"])["arm"] if ok else None
    return {"rows": rows, "meets_goal": [r["arm"] for r in ok], "smallest_meeting_goal": choice}


def _rate(v: float | None) -> str:
    """Tokens/s as the table shows them: 8.2k, 2.1M."""
    if v is None:
        return "–"
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:,.0f}"


def table(result: dict) -> str:
    """docs/results.md's table: one row per encoding arm and the CE control, then which arms meet the goal."""
    f = provenance.cell
    header = ["arm", "bytes/token", "kept mass", "KL to stored", "write tok/s", "read tok/s", "step / CE",
              "student ppl", "vs full", "ECE", "bios acc"]  # fmt: skip
    rows = [
        [r["arm"], f(r.get("bytes_per_token"), ",.0f"), f(r.get("kept_mass"), ".4f"), f(r.get("kl_nats"), ".4f"),
         _rate(r.get("write_tokens_per_s")), _rate(r.get("read_tokens_per_s")), f(r.get("step_vs_ce"), ".2f"),
         f(r.get("ppl"), ".3f"), f(r.get("ppl_vs_full"), "+.1%"), f(r.get("ece"), ".4f"), f(r.get("bios_accuracy"), ".3f")]
        for r in result["rows"]
    ]  # fmt: skip
    lines = [provenance.markdown_table(header, rows)]
    meets = ", ".join(result["meets_goal"]) or "none"
    lines += [
        "",
        f"Meeting the goal (at most {GOAL_BYTES} bytes/token, perplexity within {GOAL_PPL:.0%} of full logits', ECE "
        f"at most full's): {meets}; the smallest: {result['smallest_meeting_goal'] or 'none'}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
