"""Teacher step throughput: stablekd's DeepSpeed loop vs the same DeepSpeed engine driven by a bare loop vs
a plain PyTorch loop, one process, several repeats.

    python benchmarks/train_throughput.py [--model teacher-s] [--steps 20] [--repeats 3] \
        [--ds zero2.json zero3.json] [--dtypes fp32]

Every arm trains the same preset on the same packed bios batches (seq 128, micro 8) with AdamW and
gradient clipping, in each dtype (plain bf16 = fp32 weights under bf16 autocast; DeepSpeed bf16 = its bf16
mode; on CPUs without AMX/AVX512-BF16 bf16 is emulated and far slower: run `--dtypes fp32` there).
- plain PyTorch: torch AdamW, clip, the loss from objectives/lm.py;
- bare DeepSpeed: `deepspeed.initialize` with the very DeepSpeed JSON stablekd resolves for the stage,
  then forward, `engine.backward`, `engine.step` and nothing else;
- stablekd: `engine.train`, the loop every stage shares (counting, global-batch loss scaling, metric
  all-reduces, TensorBoard, progress bar).
Tokens/s: the first WINDOW steps are warm-up; the bare and plain arms time the same steps (batch fetch
included) as the stablekd loop's own perf/tokens_per_s scalars. The arms run interleaved, `--repeats` times;
the table has the median and the spread (min–max) of each, and stablekd / bare DeepSpeed per ZeRO stage.
MFU is against the best matmul peak (bf16 or fp32) measured at start-up. Prints a table, writes
benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import provenance  # benchmarks/: this script's folder is on sys.path
import single_rank
import torch

from stablekd.data_pipeline.stream import PackedStream, StreamLoader
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher import models, placement, rundir
from stablekd.launcher.config import load_config
from stablekd.launcher.driver import prepare
from stablekd.launcher.rank import engine
from stablekd.launcher.rank.monitor import measure_peak_flops, read_scalars
from stablekd.model.build import build_model, count_params, flops_per_token
from stablekd.objectives.lm import lm_loss, nll_sum

REPO = Path(__file__).resolve().parent.parent

WINDOW = 5


def _batches(cfg):
    """The training stream every arm reads, from its start."""
    tok_dir, t = models.tokenizer_dir(cfg), cfg.teacher
    return iter(
        StreamLoader(PackedStream(rundir.train_files(cfg), tok_dir, cfg.data.seq_len, t.micro_batch_size))
    )


def _timed(cfg, steps: int, step) -> float:
    """tokens/s of `step(batch)` over `steps` steps after WINDOW warm-up steps (the first TensorBoard window
    the stablekd arm drops), the batch fetch included as in the loop's own clock."""
    batches = _batches(cfg)
    tokens, elapsed = 0, 0.0
    for i in range(WINDOW + steps):
        t0 = time.perf_counter()
        b = next(batches)
        step(b)
        if i >= WINDOW:
            elapsed += time.perf_counter() - t0
            tokens += b["input_ids"].numel()
    return tokens / elapsed


def plain_loop(cfg, steps: int, dtype: str) -> float:
    """tokens/s of a plain loop: fp32 weights (bf16 autocast for bf16), torch AdamW, clip, one process."""
    t = cfg.teacher
    model = build_model(t.model, load_tokenizer(models.tokenizer_dir(cfg)), cfg.data.seq_len, cfg.run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)

    def step(b: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            s, c = nll_sum(model(input_ids=b["input_ids"]).logits, b["labels"])
        (s / c).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(cfg, steps, step)


def bare_deepspeed_loop(cfg, ds_name: str, steps: int, dtype: str) -> float:
    """tokens/s of the DeepSpeed engine stablekd would build (the same resolved JSON) in a minimal loop."""
    import deepspeed

    cfg.teacher.ds_config, cfg.teacher.dtype = ds_name, dtype
    cfg.teacher.max_steps = WINDOW + steps
    ds = placement.resolve_ds_config(cfg, "teacher")
    ds.pop("tensorboard", None)  # no writer: the bare loop logs nothing
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds) if ds_resolve.zero_stage(ds) == 3 else None  # noqa: F841
    model = build_model(
        cfg.teacher.model, load_tokenizer(models.tokenizer_dir(cfg)), cfg.data.seq_len, cfg.run.seed
    )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)

    def step(b: dict) -> None:
        s, c = nll_sum(engine(input_ids=b["input_ids"]).logits, b["labels"])
        engine.backward(s / c)
        engine.step()

    return _timed(cfg, steps, step)


def stablekd_loop(cfg, ds_name: str, steps: int, dtype: str) -> float:
    """tokens/s of stablekd's engine.train at world size 1 with the given DeepSpeed JSON."""
    cfg.teacher.ds_config, cfg.teacher.dtype = ds_name, dtype
    cfg.teacher.max_steps = WINDOW + steps
    ds = prepare.prepare_ds_config(cfg, "teacher")
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds) if ds_resolve.zero_stage(ds) == 3 else None  # noqa: F841
    tok_dir = models.tokenizer_dir(cfg)
    model = build_model(cfg.teacher.model, load_tokenizer(tok_dir), cfg.data.seq_len, cfg.run.seed)
    stream = PackedStream(rundir.train_files(cfg), tok_dir, cfg.data.seq_len, cfg.teacher.micro_batch_size)
    stage = engine.Stage(
        "teacher",
        model,
        StreamLoader(stream),
        lm_loss,
        [],
        flops_per_token(model, cfg.data.seq_len),
    )
    run_dir = cfg.run_dir / f"bench_{ds_name[:-5]}_{dtype}_{time.monotonic_ns()}"  # a fresh one per run
    engine.train(stage, cfg.teacher, ds, run_dir, "bench")
    rates = read_scalars(run_dir / "tb" / "teacher", "perf/tokens_per_s")
    return sum(v for s, v in rates.items() if s > WINDOW) / len([s for s in rates if s > WINDOW])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="teacher-s")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ds", nargs="+", default=["zero2.json", "zero3.json"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()

    single_rank.start(29533)
    run_dir = Path(tempfile.mkdtemp(prefix="stablekd_bench_"))
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [
            f"run.out_dir={run_dir}",
            "launch.nproc_per_node=1",
            f"teacher.model={args.model}",
            f"teacher.log_every={WINDOW}",
            "teacher.eval_every=0",
            "teacher.save_every=100000",
        ],
    )
    prepare.prepare(cfg, [])
    tok = load_tokenizer(models.tokenizer_dir(cfg))
    probe = build_model(args.model, tok, cfg.data.seq_len, 0)
    fpt, params = flops_per_token(probe, cfg.data.seq_len), count_params(probe)
    del probe
    peak = measure_peak_flops(torch.device("cpu"))

    arms = []  # (name, function): interleaved within each repeat, so load drifts hit every arm alike
    for dtype in args.dtypes:
        arms.append((f"plain PyTorch {dtype}", lambda d=dtype: plain_loop(cfg, args.steps, d)))
        for name in args.ds:
            zero = name[:-5]
            arms.append(
                (
                    f"bare DeepSpeed {zero} {dtype}",
                    lambda n=name, d=dtype: bare_deepspeed_loop(cfg, n, args.steps, d),
                )
            )
            arms.append(
                (f"stablekd {zero} {dtype}", lambda n=name, d=dtype: stablekd_loop(cfg, n, args.steps, d))
            )
    runs: dict[str, list[float]] = {name: [] for name, _ in arms}
    for _ in range(args.repeats):
        for name, fn in arms:
            runs[name].append(fn())
    base = statistics.median(runs[arms[0][0]])
    rows = []
    for name, rates in runs.items():
        med = statistics.median(rates)
        row = {"loop": name, "tokens_per_s": med, "min": min(rates), "max": max(rates), "runs": rates,
               "mfu": med * fpt / peak, "vs_plain": med / base}  # fmt: skip
        if name.startswith("stablekd "):
            row["vs_bare_deepspeed"] = med / statistics.median(
                runs[name.replace("stablekd", "bare DeepSpeed")]
            )
        rows.append(row)
    result = {
        **provenance.header(),
        "model": args.model,
        "params": params,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.teacher.micro_batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "peak_tflops": peak / 1e12,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),  # 1, 5 and 15 minutes at the end: other work skews times
        "rows": rows,
    }
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def table(result: dict) -> str:
    """docs/results.md's table: median tokens/s of each loop over the repeats, its spread, its ratios."""
    header = ["loop", "tokens/s", "min–max", "MFU", "vs plain PyTorch", "stablekd / bare DeepSpeed"]
    rows = [
        [r["loop"], f"{r['tokens_per_s']:,.0f}", f"{r['min']:,.0f}–{r['max']:,.0f}", f"{r['mfu']:.2%}",
         f"{r['vs_plain']:.3f}", f"**{r['vs_bare_deepspeed']:.3f}**" if "vs_bare_deepspeed" in r else ""]
        for r in result["rows"]
    ]  # fmt: skip
    return provenance.markdown_table(header, rows)


if __name__ == "__main__":
    main()
