"""Soft-label generation: the 2-rank ZeRO-3 teacher vs one unsharded process; bytes per token; top-k fidelity.

    python benchmarks/soft_labels.py --teacher-run runs/quickstart [--sequences 256] [--ranks 2] [--repeats 2]

--teacher-run is a run directory whose teacher stage is done (its ZeRO-3 checkpoint is read, never
written). The benchmark works in a fresh directory that links that run's teacher/ and ds/ and reads
its corpus and tokenizer in place, so the run itself is left untouched.

Rows (same sequences count, same seq_len, same micro batch, same encoding and T (the run's
`soft_labels` section), same work per batch: forward, encoding, fidelity sample, shard writing with sha256):
- `ZeRO-3 × N ranks`: `stablekd stage soft_labels` on N ranks (one thread each on a 2-core machine),
  the teacher loaded from its shards; tokens/s of the labelling loop from the stage's DONE.json
  (all ranks' tokens / the slowest rank's time; loading not counted).
- `one process`: the same teacher consolidated with DeepSpeed's zero_to_fp32, run in one plain
  process with every core, in the teacher's dtype (and in fp32 when that differs: bf16 is emulated,
  hence slow, on CPUs without AMX/AVX512-BF16).
Each side is the best of --repeats runs, and the 1-minute load average before and after is recorded:
another process on the same cores slows a 2-thread process far more than two 1-thread ranks (its
OpenMP threads wait for each other), so only a quiet machine gives a fair ratio.
Bytes per token: what the shards take on disk / labelled tokens. Fidelity at k = 4 ... 64: top-k mass and
KL(teacher ‖ top-k + uniform tail) over every position of the one-process logits.
Prints a table, writes benchmarks/results/soft_labels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stablekd.data_pipeline.fidelity import fidelity, merge_fidelity
from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.soft_labels import FIDELITY_RATE, SoftLabelWriter, config_meta
from stablekd.data_pipeline.stream import PackedStream
from stablekd.data_pipeline.tokenizer import load_tokenizer, tokenizer_hash
from stablekd.launcher import models, rundir
from stablekd.launcher.config import load_config, save_config
from stablekd.launcher.driver.supervise import run_stage
from stablekd.model.build import build_model, count_params

REPO = Path(__file__).resolve().parent.parent
KS = (4, 8, 16, 32, 64)


def one_process(
    cfg, dtype: torch.dtype, sequences: int, out: Path, repeats: int
) -> tuple[float, torch.Tensor]:
    """Best tokens/s over `repeats` of soft-label generation by the consolidated teacher in one process;
    also its logits [N, L, V] (fp32) for the fidelity table."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = cfg.run_dir / "teacher" / "ckpt"
    tok_dir, sl, L = models.tokenizer_dir(cfg), cfg.soft_labels, cfg.data.seq_len
    model = build_model(models.teacher_source(cfg), load_tokenizer(tok_dir), L, cfg.run.seed)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=read_marker(ckpt)["tag"]))
    model = model.to(dtype).eval()
    V = len(load_tokenizer(tok_dir))  # the run's ids: padded embedding rows are cut, as the stage does
    meta = config_meta(sl, "bench", tokenizer_hash(tok_dir), V, L)  # the encoding the stage writes
    stream = PackedStream(rundir.train_files(cfg), tok_dir, L, sl.micro_batch_size, loop=False)
    batches = []  # tokenized up front: the stage's ranks tokenize while they label, a small share
    for b in stream:
        batches.append(b["input_ids"][: sequences - sum(x.shape[0] for x in batches)])
        if sum(x.shape[0] for x in batches) >= sequences:
            break
    best, kept = 0.0, []
    for r in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        writer = SoftLabelWriter(out, 0, meta, sl.records_per_shard, seed=cfg.run.seed)
        gen = torch.Generator().manual_seed(0)
        budget, fid = sl.fidelity_positions, merge_fidelity([])
        t0 = time.perf_counter()
        for ids in batches:  # [b, L]
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[..., :V]  # [b, L, V]: padded rows cut
            if budget > 0:  # the stage's fidelity sample, so both sides do the same work
                take = min(budget, -(-ids.numel() // FIDELITY_RATE))
                pos = torch.randperm(ids.numel(), generator=gen)[:take]
                fid = merge_fidelity([fid, fidelity(logits.reshape(-1, V)[pos], meta)])
                budget -= take
            writer.add_logits(ids, logits)
            if r == 0:
                kept.append(logits.float())
        writer.close()
        best = max(best, sum(x.numel() for x in batches) / (time.perf_counter() - t0))
    return best, torch.cat(kept)


def zero3_stage(cfg, work: Path, repeats: int) -> dict:
    """The stage's DONE summary of the fastest of `repeats` runs (`stablekd stage soft_labels` on the ranks)."""
    best = None
    for _ in range(repeats):
        for d in (work / "soft_labels", work / "tb"):
            shutil.rmtree(d, ignore_errors=True)
        run_stage(cfg, "soft_labels")
        done = json.loads((work / "soft_labels" / "DONE.json").read_text())["produced"]["soft_labels"]
        best = done if best is None or done["tokens_per_s"] > best["tokens_per_s"] else best
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-run", required=True, help="run directory with a finished teacher stage")
    ap.add_argument("--sequences", type=int, default=256, help="sequences labelled by each side")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="each side's best of this many runs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soft_labels.json"))
    args = ap.parse_args()

    src = Path(args.teacher_run).resolve()
    work = Path(tempfile.mkdtemp(prefix="stablekd_bench_sl_"))
    for part in ("teacher", "ds"):
        (work / part).symlink_to(src / part)  # read only: the stage loads the checkpoint, writes elsewhere
    base = load_config(src / "config.yaml")
    # The run's own corpus and tokenizer, named as explicit paths: nothing is regenerated or retrained.
    tok_dir = base.tokenizer.path or str(src / "tokenizer")
    paths = base.data.paths or [str(src / "data" / "train.txt")]
    cfg = load_config(
        src / "config.yaml",
        [
            f"run.out_dir={work}",
            f"tokenizer.path={tok_dir}",
            f"data.paths={json.dumps(paths)}",
            # the bios train.txt as the run read it: one biography per line, nothing held out
            *([] if base.data.paths else ["data.text_unit=line", "data.eval_fraction=0"]),
            f"launch.nproc_per_node={args.ranks}",
            f"soft_labels.max_sequences={args.sequences}",
            "soft_labels.candidates=false",
        ],
    )
    save_config(cfg, work / "config.yaml")
    ds = json.loads((src / "ds" / "teacher.json").read_text())
    teacher_dtype = "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"

    load_before = os.getloadavg()[0]
    done = zero3_stage(cfg, work, args.repeats)
    L = cfg.data.seq_len
    rows = [{"side": f"ZeRO-3 × {args.ranks} ranks, {teacher_dtype}", "tokens_per_s": done["tokens_per_s"]}]

    logits = None
    for name in dict.fromkeys([teacher_dtype, "fp32"]):
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        out = work / f"plain_{name}"
        rate, lg = one_process(cfg, dtype, args.sequences, out, args.repeats)
        rows.append({"side": f"one process, {torch.get_num_threads()} threads, {name}", "tokens_per_s": rate})
        logits = lg if name == teacher_dtype else logits
    base_rate = rows[1]["tokens_per_s"]
    for r in rows:
        r["vs_one_process"] = r["tokens_per_s"] / base_rate

    T, V = cfg.soft_labels.temperature, logits.shape[-1]
    fid_rows = []
    for k in KS:
        f = fidelity(logits, {"encoding": "topk", "k": k, "temperature": T, "vocab_size": V})
        # per token on disk: k uint16 ids (int32 above 65,536 ids) + k float16 log-probs + the token id
        # (uint16) + its loss mask (uint8)
        fid_rows.append(
            {"k": k, "topk_mass": f["topk_mass"], "kl_nats": f["kl"], "bytes_per_token": k * 4 + 3}
        )
    shard_bytes = done["bytes"]
    result = {
        "teacher_run": str(src),
        "teacher_checkpoint": read_marker(src / "teacher" / "ckpt")["tag"],
        "params": count_params(build_model(models.teacher_source(cfg), load_tokenizer(tok_dir), L, 0)),
        "vocab_size": V,
        "seq_len": L,
        "micro_batch_size": cfg.soft_labels.micro_batch_size,
        "k": cfg.soft_labels.k,
        "temperature": T,
        "sequences": done["records"],
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        # Other processes on the same cores skew every rate: the 1-minute load before and after.
        "load_average": [load_before, os.getloadavg()[0]],
        "throughput": rows,
        "bytes_per_token_on_disk": shard_bytes / (done["records"] * L),
        "stage_fidelity": done["fidelity"],
        "fidelity_by_k": fid_rows,
        "fidelity_positions": int(logits.shape[0] * logits.shape[1]),
    }
    print(
        f"\nteacher {result['params'] / 1e6:.1f}M params, vocab {V}, {done['records']} sequences × {L} tokens, "
        f"micro {cfg.soft_labels.micro_batch_size}, k {cfg.soft_labels.k}, T {T}"
    )
    print(f"{'soft-label generation':40} {'tokens/s':>10} {'vs one process':>15}")
    for r in rows:
        print(f"{r['side']:40} {r['tokens_per_s']:10.0f} {r['vs_one_process']:15.2f}")
    print(
        f"on disk: {result['bytes_per_token_on_disk']:.1f} bytes/token, soft_labels.encoding "
        f"{cfg.soft_labels.encoding} ({cfg.soft_labels.logprob_bits}-bit log-probs), safetensors headers included"
    )
    print(
        f"\n{'k':>4} {'top-k mass':>11} {'KL nats':>10} {'bytes/token':>12}   ({result['fidelity_positions']} positions; float16 top-k)"
    )
    for f in fid_rows:
        print(f"{f['k']:>4} {f['topk_mass']:11.4f} {f['kl_nats']:10.4g} {f['bytes_per_token']:12d}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
