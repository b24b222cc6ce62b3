"""Large vocabularies: peak memory and step time of a KD step vs a cross-entropy step, per vocabulary size.

    python benchmarks/vocab_scale.py [--vocabs 32000 128000 152064] [--steps 5] [--tokens 512] [--micro 4]

A Llama-style student of hidden 256 (2 layers, untied head: 2·V·256 embedding parameters) trains on
micro-batches of 4 × 512 tokens with torch AdamW, one process. Arms, each in a fresh process so its
memory high-water mark is its own:
- `ce`: next-token cross-entropy as the teacher stage computes it (objectives/lm.py `lm_loss`: chunked,
  the gradient written out);
- `ce (F.cross_entropy)`: PyTorch's stock loss on the whole (B·T, V) logits, for reference: it keeps a
  float32 log-softmax of the batch for backward;
- `kd topk8 fkl`: the distill stage's loss (`soft_label_loss`, forward KL on top-8 + tail bins, plus the
  agreement metrics), soft labels as a reader returns them;
- `kd sampled8`: the same on 8 sampled draws per token (the default encoding).
Peak memory: the process's resident high-water mark (VmHWM) over the timed steps, reset after one warm-up
step, and the part of it above the resident size before the steps (what the step itself adds beyond
weights, gradients and Adam state). Time: median of the timed steps. Ratios are to the `ce` arm of the same
vocabulary, all measured in one run. Prints a table, writes benchmarks/results/vocab_scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stablekd.objectives.kd_losses import soft_label_loss
from stablekd.objectives.lm import Loss, lm_loss

REPO = Path(__file__).resolve().parent.parent
ARMS = ("ce", "ce (F.cross_entropy)", "kd topk8 fkl", "kd sampled8")


def _stock_ce(model: torch.nn.Module, batch: dict) -> Loss:
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum")
    return Loss({"lm": loss})


def _batch(arm: str, vocab: int, micro: int, tokens: int, gen: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (micro, tokens), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    if arm == "kd topk8 fkl":
        lp = torch.log_softmax(torch.randn(micro, tokens, 8, generator=gen), -1) - 0.1  # 0.1 nats of tail
        batch["topk_ids"] = torch.randint(0, vocab, (micro, tokens, 8), generator=gen)
        batch["topk_logprobs"] = lp.sort(-1, descending=True).values
    elif arm == "kd sampled8":
        batch["sample_ids"] = torch.randint(0, vocab, (micro, tokens, 8), generator=gen)
        batch["sample_weights"] = torch.full((micro, tokens, 8), 1 / 8)
    return batch


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one_arm(arm: str, vocab: int, steps: int, micro: int, tokens: int) -> dict:
    """Run one arm in this process; returns its figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=tokens, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = {
        "ce": lm_loss,
        "ce (F.cross_entropy)": _stock_ce,
        "kd topk8 fkl": soft_label_loss("fkl", vocab=vocab),
        "kd sampled8": soft_label_loss("fkl", vocab=vocab),
    }[arm]
    batch = _batch(arm, vocab, micro, tokens, torch.Generator().manual_seed(1))

    def step() -> float:
        t0 = time.perf_counter()
        out = loss_fn(model, batch)
        sum(out.sums.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up: allocator pools, Adam state
    before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    times = [step() for _ in range(steps)]
    peak = _memory_kib("VmHWM")
    return {"step_s": statistics.median(times), "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128000, 152064])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--one", nargs=2, metavar=("ARM", "VOCAB"), help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vocab_scale.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_arm(args.one[0], int(args.one[1]), args.steps, args.micro, args.tokens)))
        return

    rows = []
    for vocab in args.vocabs:
        for arm in args.arms:
            cmd = [sys.executable, __file__, "--one", arm, str(vocab), "--steps", str(args.steps)]
            cmd += ["--micro", str(args.micro), "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append({"vocab": vocab, "arm": arm, **json.loads(out.strip().splitlines()[-1])})
            print(f"  V {vocab} {arm}: {rows[-1]}", file=sys.stderr, flush=True)
    for row in rows:
        ce = next(r for r in rows if r["vocab"] == row["vocab"] and r["arm"] == "ce")
        row["peak_vs_ce"] = row["peak_mib"] / ce["peak_mib"]
        row["step_mem_vs_ce"] = row["step_mib"] / ce["step_mib"]
        row["time_vs_ce"] = row["step_s"] / ce["step_s"]
    result = {
        "student": "Llama, hidden 256, 2 layers, untied head",
        "micro_batch": f"{args.micro} × {args.tokens} tokens",
        "threads": torch.get_num_threads(),
        "dtype": "fp32",
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    print(
        f"\nstudent hidden 256, {args.micro} × {args.tokens} tokens, fp32, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps"
    )
    print(
        f"{'V':>7} {'arm':22} {'step s':>7} {'vs ce':>6} {'peak MiB':>9} {'vs ce':>6} {'step MiB':>9} {'vs ce':>6}"
    )
    for r in rows:
        print(
            f"{r['vocab']:7d} {r['arm']:22} {r['step_s']:7.2f} {r['time_vs_ce']:6.2f} {r['peak_mib']:9.0f} "
            f"{r['peak_vs_ce']:6.2f} {r['step_mib']:9.0f} {r['step_mem_vs_ce']:6.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
