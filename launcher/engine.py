"""The one DeepSpeed training loop every stage runs: accumulate, step, evaluate, checkpoint, resume, log.

A stage supplies a `Stage` (its model, its stateful batch stream, its loss as (sum, count)); this module
owns everything else. Read `train` top to bottom.

Loss scale (DESIGN §5): each micro-batch's summed loss is multiplied by world × accum / N, with N the
counted tokens of the whole step on all ranks. DeepSpeed divides by accum (`backward`) and averages
gradients over ranks, so the gradient is exactly that of Σ loss / N: the mean over the global batch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch
import torch.distributed as dist

from stablekd.data_pipeline.files import atomic_write
from stablekd.launcher.config import ConfigError, TrainConfig
from stablekd.launcher.monitor import Monitor, measure_peak_flops, peak_memory_bytes
from stablekd.objectives.lm import IGNORE_INDEX, shifted_labels


class Resumable(Protocol):
    """A batch stream whose exact position can be saved and restored (StreamLoader, soft-label loaders)."""

    def __iter__(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lm_token_count(batch: dict) -> int:
    """Tokens a next-token loss counts in this batch (labels not -100 after the shift)."""
    return int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())


@dataclass
class Stage:
    name: str
    model: torch.nn.Module
    batches: Resumable
    loss: Callable[
        [torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]
    ]  # (summed loss, counted tokens)
    eval_batches: list[dict]
    flops_per_token: float
    count: Callable[[dict], int] = lm_token_count


@dataclass
class TrainResult:
    engine: Any  # the DeepSpeed engine, for stages that export or reuse the trained model
    steps: int
    tokens: int
    losses: list[float]  # global mean train loss of each step run in this process
    eval_loss: float
    checkpoint_tag: str


def setup_distributed(threads_per_rank: int) -> tuple[int, int]:
    """Join the process group DeepSpeed's runner set up (gloo on CPU, NCCL on GPU); returns (rank, world)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    # Ranks on one node share its cores: more threads than cores/ranks oversubscribes (DESIGN §9).
    torch.set_num_threads(threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()


def all_reduce_values(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few Python numbers in one float64 collective."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- checkpoints ---------------------------------------------------------------------------------
# DeepSpeed's save is neither atomic nor barriered (DESIGN §9): every save goes to a fresh tag, then
# after a barrier rank 0 names it in complete.json (temp file + os.replace). A tag not named there is
# never loaded; older tags are deleted only once a newer one is complete.


def read_marker(ckpt_dir: Path) -> dict | None:
    marker = ckpt_dir / "complete.json"
    return json.loads(marker.read_text()) if marker.exists() else None


def _save(
    engine: Any, stage: Stage, ckpt_dir: Path, step: int, tokens: int, cfg_hash: str, keep: int
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"step{step:07d}"
    if rank == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # left by a run killed mid-save: never save over old files
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    own = {
        "data": json.dumps(stage.batches.state_dict()),
        "tokens": tokens,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "py_rng": random.getstate(),
    }
    path = ckpt_dir / tag / f"stablekd_rank{rank:05d}.pt"
    torch.save(own, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    dist.barrier()
    if rank == 0:
        marker = {"tag": tag, "step": step, "world_size": world, "config_hash": cfg_hash}
        atomic_write(ckpt_dir / "complete.json", json.dumps(marker, indent=2))
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[: max(0, len(tags) - keep)]:
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # every rank sees the new marker once save returns


def _resume(engine: Any, stage: Stage, ckpt_dir: Path, cfg_hash: str) -> tuple[int, int]:
    """Load the last complete checkpoint, if any: model, optimizer, scheduler, RNG and data position."""
    marker = read_marker(ckpt_dir)
    if marker is None:
        return 0, 0
    world = dist.get_world_size()
    if marker["world_size"] != world:
        raise ConfigError(
            f"{ckpt_dir}: checkpoint {marker['tag']} was written by {marker['world_size']} ranks, this job has {world}; "
            f"resume with the same launch.nproc_per_node × nodes (the data position is per rank)"
        )
    if marker["config_hash"] != cfg_hash:
        raise ConfigError(
            f"{ckpt_dir}: checkpoint {marker['tag']} was made with another {stage.name} config "
            f"(hash {marker['config_hash']}, now {cfg_hash}); use a new run.out_dir or delete {ckpt_dir}"
        )
    engine.load_checkpoint(str(ckpt_dir), tag=marker["tag"])
    own = torch.load(ckpt_dir / marker["tag"] / f"stablekd_rank{dist.get_rank():05d}.pt", weights_only=True)
    stage.batches.load_state_dict(json.loads(own["data"]))
    torch.set_rng_state(own["torch_rng"])
    if own["cuda_rng"]:
        torch.cuda.set_rng_state_all(own["cuda_rng"])
    random.setstate(own["py_rng"])
    return marker["step"], own["tokens"]


# --- the loop ------------------------------------------------------------------------------------


def evaluate(engine: Any, stage: Stage, filler: dict | None = None) -> float:
    """Mean eval loss over every rank's eval batches.

    Under ZeRO-3 every rank must run the same number of forwards (parameters are gathered
    collectively), so a rank with fewer eval batches runs `filler` (or its first eval batch) and counts
    nothing from it.
    """
    n = int(all_reduce_values([len(stage.eval_batches)], dist.ReduceOp.MAX)[0])
    if n == 0:
        return float("nan")
    filler = stage.eval_batches[0] if stage.eval_batches else filler
    total, count = 0.0, 0.0
    engine.eval()
    with torch.no_grad():
        for i in range(n):
            batch = stage.eval_batches[i] if i < len(stage.eval_batches) else filler
            if batch is None:
                raise RuntimeError(
                    "a rank has no eval batch to keep ZeRO-3 forwards in step; give every rank eval data"
                )
            s, c = stage.loss(engine, _to(batch, engine.device))
            if i < len(stage.eval_batches):
                total, count = total + float(s), count + float(c)
    engine.train()
    total, count = all_reduce_values([total, count])
    return total / count if count else float("nan")


def train(stage: Stage, cfg: TrainConfig, ds_config: dict, run_dir: Path, cfg_hash: str) -> TrainResult:
    """Train `stage` to cfg.max_steps (resuming from its last complete checkpoint); returns a summary."""
    world = dist.get_world_size()
    ckpt_dir = run_dir / stage.name / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine, *_ = deepspeed.initialize(
        model=stage.model, model_parameters=stage.model.parameters(), config=ds_config
    )
    accum = engine.gradient_accumulation_steps()
    step, tokens = _resume(engine, stage, ckpt_dir, cfg_hash)
    monitor = Monitor(run_dir / "tb" / stage.name, cfg.max_steps, step, stage.name)
    if step:
        monitor.print(f"[{stage.name}] resumed from {ckpt_dir / read_marker(ckpt_dir)['tag']} at step {step}")

    peak = all_reduce_values([measure_peak_flops(engine.device)])[
        0
    ]  # all ranks at once: the job's matmul peak
    monitor.scalars(step, {"perf/peak_tflops": peak / 1e12})
    batches = iter(stage.batches)
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    losses: list[float] = []
    eval_loss = float("nan")
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        n_global = all_reduce_values([sum(stage.count(b) for b in micro)])[0]
        scale = world * accum / max(n_global, 1.0)  # see module docstring
        step_loss = 0.0
        for b in micro:
            loss_sum, _ = stage.loss(engine, _to(b, engine.device))
            engine.backward(loss_sum * scale)
            engine.step()
            step_loss += float(loss_sum.detach())
        step += 1
        step_loss, step_tokens = all_reduce_values([step_loss, sum(b["input_ids"].numel() for b in micro)])
        step_loss, step_tokens = step_loss / max(n_global, 1.0), int(step_tokens)
        tokens += step_tokens
        losses.append(step_loss)
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        window_tokens, window_time = window_tokens + step_tokens, window_time + time.perf_counter() - t0

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            tok_s = window_tokens / window_time
            monitor.scalars(
                step,
                {
                    "train/loss": window_loss / window_steps,
                    "train/lr": engine.get_lr()[0],
                    "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "train/tokens": tokens,
                    "perf/tokens_per_s": tok_s,
                    "perf/step_time_s": window_time / window_steps,
                    "perf/mfu": tok_s * stage.flops_per_token / peak,
                    "perf/peak_memory_gib": all_reduce_values(
                        [peak_memory_bytes(engine.device)], dist.ReduceOp.MAX
                    )[0]
                    / 2**30,
                },
            )
            window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            eval_loss = evaluate(engine, stage, filler=micro[0])
            monitor.scalars(step, {"eval/loss": eval_loss})
            monitor.print(
                f"[{stage.name}] step {step}: train loss {step_loss:.4f}, eval loss {eval_loss:.4f}"
            )
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            _save(engine, stage, ckpt_dir, step, tokens, cfg_hash, cfg.keep_checkpoints)
        monitor.advance({"loss": f"{step_loss:.3f}"})
    if not losses:  # resumed at max_steps: nothing left to train
        eval_loss = evaluate(engine, stage)
    monitor.close()
    return TrainResult(engine, step, tokens, losses, eval_loss, read_marker(ckpt_dir)["tag"])
