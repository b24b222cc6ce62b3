#!/usr/bin/env bash
# GPU smoke check and first numbers for a machine with one or more NVIDIA GPUs (~10 minutes on H100-class
# GPUs; estimated, not yet measured):
#   1. nvidia-smi, the torch / CUDA / NCCL / DeepSpeed versions
#   2. bf16 matmul TFLOP/s on every GPU (and the peak the training loop's MFU is measured against)
#   3. a 2-process NCCL all_reduce (result and bus bandwidth), when there are >= 2 GPUs
#   4. a shortened configs/gpu.yaml pipeline on all GPUs: teacher (teacher-l, ZeRO-3, bf16, 300 steps),
#      soft_labels from its ZeRO-3 shards, distill (200 steps), evaluate; then its throughput/MFU lines
#
#   bash benchmarks/gpu_check.sh          # from the repository root, after pip install -e ".[dev]"
#
# Everything printed goes to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out), with the run's small
# artifacts (report, TensorBoard logs, resolved DeepSpeed JSONs). The run itself, with its ~18 GB teacher
# checkpoint, lives in $RUN_DIR (default /tmp/stablekd_gpu_check). Knobs: TEACHER_STEPS, DISTILL_STEPS.
# benchmarks/train_throughput.py is not run: its plain-PyTorch baseline runs on the CPU and its MFU
# peak is the CPU's, so on a GPU node its table compares a GPU loop with a CPU loop.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
RUN_DIR="${RUN_DIR:-/tmp/stablekd_gpu_check}"
TEACHER_STEPS="${TEACHER_STEPS:-300}"
DISTILL_STEPS="${DISTILL_STEPS:-200}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1

section() { printf '\n=== %s ===  (%s)\n' "$1" "$(date +%T)"; }

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: nvidia-smi not found: this script is for a machine with NVIDIA GPUs" >&2
  exit 1
fi

section "nvidia-smi"
nvidia-smi

section "versions"
"$PY" - <<'EOF'
import deepspeed
import torch
import transformers

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
print(f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$NGPU" -lt 1 ]]; then
  echo "gpu_check: torch sees no CUDA device (a CPU-only torch build? see README, GPU nodes)" >&2
  exit 1
fi
if [[ "$NGPU" -ge 2 ]]; then
  nvidia-smi topo -m  # NVLink / PCIe between the GPUs: what all_reduce bandwidth to expect
fi

section "bf16 matmul"
"$PY" - <<'EOF'
import torch

from stablekd.launcher.rank.monitor import measure_peak_flops

n, iters = 8192, 50
for i in range(torch.cuda.device_count()):
    dev = torch.device("cuda", i)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: cuBLAS heuristics, clocks
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(dev)
    for _ in range(iters):
        a @ b
    end.record(dev)
    torch.cuda.synchronize(dev)
    tflops = 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12
    print(f"cuda:{i} bf16 matmul {n}x{n}: {tflops:.0f} TFLOP/s (H100/H200 SXM dense peak ~989)")
# What perf/mfu in TensorBoard divides by: the loop's own start-up measurement (4096², bf16 or fp32).
print(f"training loop's peak (measure_peak_flops, cuda:0): {measure_peak_flops(torch.device('cuda', 0)) / 1e12:.0f} TFLOP/s")
EOF

section "NCCL all_reduce, 2 processes"
if [[ "$NGPU" -ge 2 ]]; then
  cat >"$OUT_DIR/allreduce_check.py" <<'EOF'
"""torchrun --nproc_per_node=2: one all_reduce checked for its sum, then the bus bandwidth of 512 MiB."""
import os
import time

import torch
import torch.distributed as dist

rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
world = dist.get_world_size()
x = torch.full((1024,), float(rank + 1), device="cuda")
dist.all_reduce(x)
expected = world * (world + 1) / 2
assert torch.all(x == expected), f"rank {rank}: all_reduce gave {x[0].item()}, expected {expected}"
big = torch.ones(256 * 2**20, dtype=torch.bfloat16, device="cuda")  # 512 MiB
for _ in range(3):
    dist.all_reduce(big)
torch.cuda.synchronize()
iters = 10
t0 = time.perf_counter()
for _ in range(iters):
    dist.all_reduce(big)
torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / iters
# nccl-tests' bus bandwidth: bytes × 2(n−1)/n per all_reduce
busbw = big.numel() * 2 * 2 * (world - 1) / world / dt / 1e9
if rank == 0:
    print(f"all_reduce ok on {world} ranks (sum {expected:g}); 512 MiB bf16: {dt * 1e3:.1f} ms, bus bandwidth {busbw:.0f} GB/s")
dist.destroy_process_group()
EOF
  timeout 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 "$OUT_DIR/allreduce_check.py"
else
  echo "skipped: 1 GPU (an all_reduce needs 2)"
fi

section "pipeline: configs/gpu.yaml, shortened, on $NGPU GPU(s) -> $RUN_DIR"
# 2,000 people (~460k tokens), 2,048 labelled sequences, short evaluation: the stages' real code paths at
# the config's model sizes, batches and DeepSpeed JSONs, in minutes.
ARGS=(
  "run.out_dir=$RUN_DIR" "launch.nproc_per_node=$NGPU"
  data.bios.people=2000 data.bios.unseen_people=200
  "teacher.max_steps=$TEACHER_STEPS" teacher.warmup_steps=30 teacher.eval_every=100
  "teacher.save_every=$TEACHER_STEPS"
  soft_labels.max_sequences=2048 soft_labels.candidate_contexts=256 soft_labels.candidates_per_context=4
  "distill.max_steps=$DISTILL_STEPS" distill.warmup_steps=20 distill.eval_every=100
  "distill.save_every=$DISTILL_STEPS"
  evaluate.samples=3 evaluate.max_prompts=50 evaluate.free_bios=10 evaluate.prefixes=20
)
"$PY" -m stablekd.launcher.driver.cli ds-config estimate configs/gpu.yaml "${ARGS[@]}"
# A hung collective must not eat the session: each stage gets a bound.
for stage_limit in teacher:420 soft_labels:300 distill:300 evaluate:300; do
  stage="${stage_limit%%:*}"
  section "stage $stage"
  timeout "${stage_limit##*:}" "$PY" -m stablekd.launcher.driver.cli stage "$stage" configs/gpu.yaml "${ARGS[@]}"
done

section "throughput and MFU (TensorBoard scalars; the first logged window is warm-up and left out)"
"$PY" - "$RUN_DIR" <<'EOF'
import sys
from pathlib import Path

from stablekd.launcher.rank.monitor import read_scalars


def mean(tb: Path, tag: str, steps: list[int]) -> float:
    values = read_scalars(tb, tag)
    return sum(values.get(s, float("nan")) for s in steps) / len(steps)


run = Path(sys.argv[1])
for stage in ("teacher", "soft_labels", "distill"):
    tb = run / "tb" / stage
    steps = sorted(read_scalars(tb, "perf/tokens_per_s"))
    steps = steps[1:] or steps
    if not steps:
        print(f"{stage}: no perf/tokens_per_s in {tb}")
        continue
    line = f"{stage}: {mean(tb, 'perf/tokens_per_s', steps):,.0f} tokens/s"
    if stage != "soft_labels":  # the training stages: MFU, step time, memory, last losses
        loss, ev = read_scalars(tb, "train/loss"), read_scalars(tb, "eval/loss")
        mem = max(read_scalars(tb, "perf/peak_memory_gib").values())
        line += f", MFU {mean(tb, 'perf/mfu', steps):.1%}, step {mean(tb, 'perf/step_time_s', steps):.3f} s"
        line += f", peak memory {mem:.1f} GiB, at step {max(loss)}: train loss {loss[max(loss)]:.3f}"
        line += f", eval loss {ev[max(ev)]:.3f}"
    print(line)
EOF

section "stability report (head)"
head -n 40 "$RUN_DIR/eval/report.md"

# The small artifacts next to the log; checkpoints and soft-label shards stay in $RUN_DIR.
mkdir -p "$OUT_DIR/run"
cp -r "$RUN_DIR/tb" "$RUN_DIR/ds" "$RUN_DIR/eval" "$RUN_DIR/config.yaml" "$OUT_DIR/run/"
section "done: log $OUT_DIR/gpu_check.log, report $OUT_DIR/run/eval/report.md, tensorboard --logdir $OUT_DIR/run/tb"
