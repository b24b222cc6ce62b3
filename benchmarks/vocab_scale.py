"""Large vocabularies: peak memory and step time of a KD step vs a cross-entropy step, per vocabulary size.

    python benchmarks/vocab_scale.py [--vocabs 32000 128000 152064] [--steps 5] [--tokens 512] [--micro 4]
        [--arms ce "kd topk8 fkl + ce" ...] [--rows 0 512]

A Llama-style student of hidden 256 (2 layers, untied head: 2·V·256 embedding parameters) trains on
micro-batches of 4 × 512 tokens with torch AdamW, one process. Arms, each in a fresh process so its
memory high-water mark is its own:
- `floor`: the same step with a loss that does not touch the head's output (the mean square of the last
  hidden state, + 0 · Σ head weight so the head has its gradient and Adam state as in every other arm):
  the trunk's, the parameters' and the optimizer's own memory and time;
- `ce`: next-token cross-entropy as the teacher stage computes it (objectives/lm.py `lm_loss`: from the
  last hidden state, one chunk of logits at a time, model/head.py);
- `ce (whole logits)`: the same chunked cross-entropy (`nll_sum`) on the head's whole (B·T, V) logits,
  as every stage computed it before the head computed losses;
- `ce (F.cross_entropy)`: PyTorch's stock loss on the whole (B·T, V) logits, for reference: it keeps a
  float32 log-softmax of the batch for backward;
- `kd topk8 fkl`: the distill stage's loss (`soft_label_loss`, forward KL on top-8 + tail bins, plus the
  agreement metrics), soft labels as a reader returns them;
- `kd topk8 fkl + ce`: the same at alpha 0.5 (two terms, whose weights the loss tells the head: it takes
  their gradients in forward from one chunk of logits, as for one term, model/head.py);
- `kd topk8 fkl + ce (remade)`: the same without telling the head the weights, as a loss whose terms are
  weighed by counts only the loop knows (cross-tokenizer): backward makes each chunk's logits again;
- `kd sampled8`: the same on 8 sampled draws per token (the default encoding).
All arms but `floor` and the two whole-logits ones never hold (B·T, V) logits. Peak memory: the process's resident high-water mark (VmHWM) over the timed steps, reset after one warm-up
step, and the part of it above the resident size before the steps (what the step itself adds beyond
weights, gradients and Adam state). `--rows`: the head's rows per chunk, each value a run of every chunked arm (0:
chunk_rows(V), ~64 MiB of float32 logits a chunk). Time: median of the timed steps. Ratios are to the `floor` arm of the same
vocabulary (memory) and to `ce (whole logits)` (time), all measured in one run. Prints a table, writes benchmarks/results/vocab_scale.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import provenance
import torch
import torch.nn.functional as F

from stablekd.model.head import install_head
from stablekd.objectives.kd_losses import soft_label_loss
from stablekd.objectives.lm import HeadLoss, Loss, chunk_rows, lm_loss, nll_sum

REPO = Path(__file__).resolve().parent.parent
ARMS = (
    "floor", "ce", "ce (whole logits)", "ce (F.cross_entropy)", "kd topk8 fkl", "kd topk8 fkl + ce",
    "kd topk8 fkl + ce (remade)", "kd sampled8",
)  # fmt: skip
CHUNKED = ("ce", "kd topk8 fkl", "kd topk8 fkl + ce", "kd topk8 fkl + ce (remade)", "kd sampled8")


def _unweighted(loss: Callable[[torch.nn.Module, dict], Loss]) -> Callable[[torch.nn.Module, dict], Loss]:
    """`loss` with its HeadLoss.weights dropped: the head's path for terms it cannot weigh in forward."""

    def run(model: torch.nn.Module, batch: dict) -> Loss:
        def forward(head_loss: HeadLoss, **kwargs):
            return model(head_loss=dataclasses.replace(head_loss, weights=None), **kwargs)

        return loss(forward, batch)

    return run


def _floor(model: torch.nn.Module, batch: dict) -> Loss:
    hidden = model.base_model(input_ids=batch["input_ids"], use_cache=False)[0]  # (B, T, H): no head
    # 0 · Σ head weight: the head gets a (zero) gradient and Adam state like in every other arm, so the
    # floor differs from them only by what their loss computes.
    return Loss({"lm": hidden.float().pow(2).mean() + 0 * model.lm_head.weight.sum()})


def _whole_ce(model: torch.nn.Module, batch: dict) -> Loss:
    return Loss({"lm": nll_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]})


def _stock_ce(model: torch.nn.Module, batch: dict) -> Loss:
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum")
    return Loss({"lm": loss})


def _batch(arm: str, vocab: int, micro: int, tokens: int, gen: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (micro, tokens), generator=gen)
    batch = {"input_ids": ids, "labels": ids}
    if arm.startswith("kd topk8"):
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


def one_arm(arm: str, vocab: int, steps: int, micro: int, tokens: int, rows: int = 0) -> dict:
    """Run one arm in this process; returns its figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=tokens, tie_word_embeddings=False,
    )  # fmt: skip
    model = install_head(LlamaForCausalLM(config), vocab, rows or None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = {
        "floor": _floor,
        "ce": lm_loss,
        "ce (whole logits)": _whole_ce,
        "ce (F.cross_entropy)": _stock_ce,
        "kd topk8 fkl": soft_label_loss("fkl"),
        "kd topk8 fkl + ce": soft_label_loss("fkl", alpha=0.5),
        "kd topk8 fkl + ce (remade)": _unweighted(soft_label_loss("fkl", alpha=0.5)),
        "kd sampled8": soft_label_loss("fkl"),
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
    ap.add_argument("--rows", type=int, nargs="+", default=[0], help="rows per chunk (0: chunk_rows(V))")
    ap.add_argument("--one", nargs=3, metavar=("ARM", "VOCAB", "ROWS"), help=argparse.SUPPRESS)  # a child
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vocab_scale.json"))
    args = ap.parse_args()
    if args.one:
        arm, vocab, rows = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(one_arm(arm, vocab, args.steps, args.micro, args.tokens, rows)))
        return

    rows = []
    for vocab in args.vocabs:
        # the head's chunks matter only to the arms that compute from the hidden state chunk by chunk
        runs = [(a, r) for a in args.arms for r in (args.rows if a in CHUNKED else [0])]
        for arm, chunk in runs:
            cmd = [sys.executable, __file__, "--one", arm, str(vocab), str(chunk), "--steps", str(args.steps)]
            cmd += ["--micro", str(args.micro), "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append({"vocab": vocab, "arm": arm, "rows": chunk or chunk_rows(vocab),
                         **json.loads(out.strip().splitlines()[-1])})  # fmt: skip
            print(f"  V {vocab} {arm}: {rows[-1]}", file=sys.stderr, flush=True)
    for row in rows:
        same = {r["arm"]: r for r in rows if r["vocab"] == row["vocab"]}
        if "floor" in same:
            row["peak_vs_floor"] = row["peak_mib"] / same["floor"]["peak_mib"]
        if "ce (whole logits)" in same:
            row["time_vs_whole_ce"] = row["step_s"] / same["ce (whole logits)"]["step_s"]
    result = {
        **provenance.header(),
        "steps": args.steps,
        "student": "Llama, hidden 256, 2 layers, untied head",
        "micro_batch": f"{args.micro} × {args.tokens} tokens",
        "threads": torch.get_num_threads(),
        "dtype": "fp32",
        "rows": rows,
    }
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def table(result: dict) -> str:
    """docs/results.md's table: one row per (V, arm[, rows per chunk]), ratios within each V."""
    chunks = any("rows" in r for r in result["rows"])  # files before --rows have no such column
    header = ["V", "arm", *(["rows/chunk"] if chunks else []), "step s", "vs whole-logits CE", "peak MiB", "vs floor",
              "step's own MiB"]  # fmt: skip
    rows = [
        [f"{r['vocab']:,}", f"`{r['arm']}`", *([f"{r['rows']:,}"] if chunks else []), f"{r['step_s']:.2f}",
         provenance.cell(r.get("time_vs_whole_ce"), ".2f"), f"{r['peak_mib']:,.0f}",
         provenance.cell(r.get("peak_vs_floor"), ".2f"), f"{r['step_mib']:,.0f}"]
        for r in result["rows"]
    ]  # fmt: skip
    return provenance.markdown_table(header, rows, "rl" + "r" * (len(header) - 2))


if __name__ == "__main__":
    main()
