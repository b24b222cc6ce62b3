"""Rank-0 TensorBoard writer and progress bar, throughput and MFU.

One x-axis for every scalar of ours: the optimizer step (`global_step`). Tokens seen are logged as a
scalar of their own (`train/tokens`), so a tokens axis is one TensorBoard click away.

Each stage is one TensorBoard run (`tb/<stage>`). Every Monitor also writes `LAYOUT`, the CUSTOM SCALARS
tab: TensorBoard merges the layouts of all runs and drops the duplicates, so the tab is there from the
teacher's first step and stays one layout as later stages add their runs.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# CUSTOM SCALARS: {category: {chart title: ["Multiline", [tag regexes]]}}; a regex matches in every run,
# so each chart draws the tag of every stage that logs it (teacher, distill, contrastive).
LAYOUT: dict[str, dict[str, list]] = {
    "stages": {
        "train/loss: teacher CE, distill α·KD + (1−α)·CE, contrastive InfoNCE + λ·LM": [
            "Multiline",
            [r"^train/loss$"],
        ],
        "eval/loss": ["Multiline", [r"^eval/loss$"]],
    }
}


def measure_peak_flops(device: torch.device) -> float:
    """Best matmul FLOP/s of this rank over bf16 and fp32, measured while every rank measures at once.

    bf16 is the peak on GPUs and AMX CPUs; a CPU without bf16 instructions emulates it, far slower than
    fp32, and an MFU against that would exceed 100%, so the faster of the two is the peak. bf16 is tried
    on a small matrix first: emulated, one 1024² product took 14 s on one core here (0.9 GFLOP/s against
    fp32's 86), a cost every stage start would pay for a number that is then not used.
    """
    n = 4096 if device.type == "cuda" else 1024
    fp32 = _matmul_flops(device, torch.float32, n)
    if _matmul_flops(device, torch.bfloat16, 256) < _matmul_flops(device, torch.float32, 256):
        return fp32
    return max(fp32, _matmul_flops(device, torch.bfloat16, n))


def _matmul_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    iters = 20 if device.type == "cuda" else 4
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar over every event file in `tb_dir`; a later file wins (a resumed run)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[int, float] = {}
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3])):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == tag:
                    out[event.step] = (
                        float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    )
    return out


class Monitor:
    """TensorBoard + tqdm on rank 0; a no-op elsewhere, so call sites need no rank checks."""

    def __init__(self, tb_dir: Path, total_steps: int, start_step: int, desc: str):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.writer = SummaryWriter(str(tb_dir)) if self.enabled else None
        if self.writer:
            self.writer.add_custom_scalars(LAYOUT)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, disable=not self.enabled, dynamic_ncols=True
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def advance(self, postfix: dict[str, str]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(postfix, refresh=False)

    def print(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
