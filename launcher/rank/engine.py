"""The one DeepSpeed training loop every stage runs: accumulate, step, evaluate, checkpoint, resume, log.

A stage supplies a `Stage` (its model, its stateful batch stream, its loss as named summed terms and the
count each term is divided by); this module owns everything else. Read `train` top to bottom.

Loss normalisation (docs/architecture.md) for terms with different denominators: a loss has terms t (e.g. "kd"
and "ce" over tokens, "infonce" over anchors) with weights w_t. Before the forwards, each term's count
is summed over the step's micro-batches on every rank: N_t (one all-reduce). The objective is

    L = Σ_t w_t · (Σ over ranks and micro-batches of sum_t) / N_t

i.e. every term is the mean over *its own* counted items of the *global* batch, so neither gradient
accumulation, world size, nor how unevenly masks fall across ranks and micro-batches changes it. Each
micro-batch backpropagates Σ_t w_t · sum_t · world × accum / N_t: DeepSpeed divides by accum (`backward`)
and averages gradients over ranks, which leaves exactly the gradient of L. A term with N_t = 0 in a step
contributes nothing (never NaN). TensorBoard gets L as `train/loss`, each term's mean as
`train/<term>` (also a single term such as distill's `kd` at alpha 1; not the plain LM loss `lm`
alone, which is `train/loss` itself), and each metric the loss reports as Σ value / Σ count over the
log window and all ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import deepspeed
import torch
import torch.distributed as dist

from stablekd.data_pipeline.files import atomic_write, read_marker
from stablekd.launcher import hints
from stablekd.launcher.config import ConfigError, TrainConfig
from stablekd.launcher.rank.monitor import Monitor, measure_peak_flops, peak_memory_bytes
from stablekd.launcher.stages import spec
from stablekd.model.sharded_teacher import load_initial_weights
from stablekd.objectives.lm import Loss, lm_counts


class Resumable(Protocol):
    """A batch stream whose exact position can be saved and restored (StreamLoader, soft-label loaders)."""

    def __iter__(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def input_tokens(batch: dict) -> int:
    """Tokens a batch feeds the model, for throughput (a stage whose batches have no input_ids says its own)."""
    return batch["input_ids"].numel()


@dataclass
class Stage:
    name: str  # a row of the stage registry: its directory holds ckpt/, TensorBoard goes to tb/<name>
    model: torch.nn.Module
    batches: Resumable
    loss: Callable[[torch.nn.Module, dict], Loss]
    eval_batches: list[dict]
    flops_per_token: float
    weights: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})  # w_t per loss term
    count: Callable[[dict], dict[str, int]] = lm_counts  # N_t contribution of a batch, before its forward
    tokens: Callable[[dict], int] = input_tokens  # tokens processed, for tokens/s and MFU
    # Held-out batches may lack what training batches carry (a distilled student's eval text has no soft
    # labels): then eval_loss scores them (each of its terms weighted 1, counted by lm_counts).
    eval_loss: Callable[[torch.nn.Module, dict], Loss] | None = None
    # Another run's ZeRO checkpoint directory whose weights a fresh run starts from (teacher.init_from);
    # a run with a checkpoint of its own resumes from that instead.
    init_checkpoint: Path | None = None


@dataclass
class TrainResult:
    engine: Any  # the DeepSpeed engine, for stages that export or reuse the trained model
    steps: int
    tokens: int
    losses: list[float]  # global mean train loss of each step run in this process
    eval_loss: float | None  # None: no held-out text (never NaN)
    checkpoint_tag: str


def setup_distributed(threads_per_rank: int, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group DeepSpeed's runner set up (gloo on CPU, NCCL on GPU); returns (rank, world).

    `timeout_s` (launch.timeout_s) bounds every collective: a rank whose peer died or hangs fails with an
    error after it instead of waiting forever (NCCL: with its async error handling, on by default)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    # Ranks on one node share its cores: more threads than cores/ranks oversubscribes (docs/multinode.md).
    torch.set_num_threads(threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU shared-memory all-reduce op serves only inference_all_reduce (tensor-parallel
    # inference; training reduces through gloo/NCCL), yet init_distributed JIT-loads it in every rank under
    # torch's build lock file and maps a 64 MiB /dev/shm buffer it never unlinks. A rank killed while it
    # holds that lock leaves the file behind, and every later launch on the machine waits on it forever
    # (seen: a CI run hung after a kill -9 test). Marked unavailable, init uses the process group's all-reduce.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def seed_rng(seed: int) -> None:
    """Seed this rank's global random streams (torch on every device, Python's `random`) from the run seed.

    A fresh process's torch generator may start from a nondeterministic seed (this torch 2.13 build's
    does), so a stage whose training draws from it (contrastive negatives, dropout) must seed it: else two
    runs of one config draw differently, and a killed-and-resumed run, whose streams the checkpoint
    restores exactly, cannot continue the curve of an uninterrupted one. Ranks get distinct streams. Call
    it after `setup_distributed`, before anything draws (a freshly initialised head); `train` then
    restores the checkpointed streams on resume.
    """
    s = seed * 1_000_003 + dist.get_rank()
    torch.manual_seed(s)
    random.seed(s)


def all_reduce_values(values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few Python numbers in one float64 collective."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- checkpoints ---------------------------------------------------------------------------------
# DeepSpeed's save is neither atomic nor barriered: every save goes to a fresh tag, then
# after a barrier rank 0 names it in complete.json (temp file + os.replace). A tag not named there is
# never loaded; older tags are deleted only once a newer one is complete.


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
            f"resume with the same launch.nproc_per_node × nodes (the data position is per rank), or "
            f"to redo it: delete {ckpt_dir.parent} and {hints.SAME_COMMAND}"
        )
    if marker["config_hash"] != cfg_hash:
        raise ConfigError(
            f"{ckpt_dir}: checkpoint {marker['tag']} was made with another {stage.name} config "
            f"(hash {marker['config_hash']}, now {cfg_hash}); use a new run.out_dir, or to redo it: delete "
            f"{ckpt_dir} and {hints.SAME_COMMAND}"
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


def _objective(weights: dict[str, float], sums: dict[str, float], counts: dict[str, float]) -> float:
    """Σ_t w_t · sum_t / N_t over terms with something counted (see the module docstring)."""
    return sum(w * sums.get(t, 0.0) / counts[t] for t, w in weights.items() if counts.get(t, 0) > 0)


def _reduce_named(values: dict[str, float], names: list[str]) -> dict[str, float]:
    """All-reduce (sum) a dict's values in a fixed key order; missing keys count 0."""
    return dict(zip(names, all_reduce_values([values.get(n, 0.0) for n in names]), strict=True))


NO_EVAL = "[{stage}] no held-out text: eval loss skipped (set data.eval_paths or data.eval_fraction)"


def evaluate(engine: Any, stage: Stage, filler: dict | None = None) -> float | None:
    """Eval loss over every rank's eval batches: each term the mean over its own global count, weighted.
    None (never NaN) when no rank has an eval batch or nothing in them counts: there is no held-out text.

    Under ZeRO-3 every rank must run the same number of forwards (parameters are gathered
    collectively), so a rank with fewer eval batches runs `filler` (or its first eval batch) and counts
    nothing from it.
    """
    filler = stage.eval_batches[0] if stage.eval_batches else filler
    # One collective decides for every rank: a rank raising alone would leave the others in ZeRO-3 gathers.
    n, short = all_reduce_values([len(stage.eval_batches), float(filler is None)], dist.ReduceOp.MAX)
    n = int(n)
    if n == 0:
        return None
    if short:
        raise RuntimeError(
            "a rank has no eval batch to keep ZeRO-3 forwards in step; give every rank eval data"
        )
    loss_fn, count_fn = (stage.eval_loss, lm_counts) if stage.eval_loss else (stage.loss, stage.count)
    weights = {"lm": 1.0} if stage.eval_loss else stage.weights
    terms = sorted(weights)
    sums, counts = dict.fromkeys(terms, 0.0), dict.fromkeys(terms, 0.0)
    engine.eval()
    with torch.no_grad():
        for i in range(n):
            batch = stage.eval_batches[i] if i < len(stage.eval_batches) else filler
            out = loss_fn(engine, _to(batch, engine.device))
            if i < len(stage.eval_batches):
                for t in terms:
                    sums[t] += float(out.sums[t]) if t in out.sums else 0.0
                for t, c in count_fn(batch).items():
                    if t in counts:
                        counts[t] += c
    engine.train()
    sums, counts = _reduce_named(sums, terms), _reduce_named(counts, terms)
    return _objective(weights, sums, counts) if any(counts.values()) else None


def batch_digest(batch: dict) -> str:
    """sha256 (16 hex digits) of a batch's tensors, by key: what identifies a sample in a trace."""
    h = hashlib.sha256()
    for key in sorted(batch):
        if torch.is_tensor(batch[key]):
            h.update(
                key.encode() + batch[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            )
    return h.hexdigest()[:16]


def train(
    stage: Stage, cfg: TrainConfig, ds_config: dict, run_dir: Path, cfg_hash: str, trace_samples: bool = False
) -> TrainResult:
    """Train `stage` to cfg.max_steps (resuming from its last complete checkpoint); returns a summary.

    `trace_samples` (run.trace_samples): each rank appends `step, micro-batch, batch_digest` lines to
    logs/samples/<stage>.r<rank>.tsv as it draws them (a resumed run appends the steps it redoes)."""
    world = dist.get_world_size()
    ckpt_dir = run_dir / spec(stage.name).ckpt_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine, *_ = deepspeed.initialize(
        model=stage.model, model_parameters=[p for p in stage.model.parameters() if p.requires_grad],
        config=ds_config,
    )  # fmt: skip
    accum = engine.gradient_accumulation_steps()
    step, tokens = _resume(engine, stage, ckpt_dir, cfg_hash)
    monitor = Monitor(run_dir / spec(stage.name).tb_dir, cfg.max_steps, step, stage.name)
    if step:
        monitor.print(f"[{stage.name}] resumed from {ckpt_dir / read_marker(ckpt_dir)['tag']} at step {step}")
    elif stage.init_checkpoint is not None:
        init = load_initial_weights(engine, stage.init_checkpoint)
        monitor.print(
            f"[{stage.name}] weights from {stage.init_checkpoint / init['tag']} (its step {init['step']})"
        )

    # All ranks at once: the job's matmul peak. Its random operands must not consume the training RNG
    # restored by the resume (dropout, sampling): run it under a forked RNG.
    cuda = [engine.device.index or 0] if engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        peak = all_reduce_values([measure_peak_flops(engine.device)])[0]
    monitor.scalars(step, {"perf/peak_tflops": peak / 1e12})
    batches = iter(stage.batches)
    trace = None
    if trace_samples:
        trace_path = run_dir / "logs" / "samples" / f"{stage.name}.r{dist.get_rank():05d}.tsv"
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        trace = open(trace_path, "a")  # noqa: SIM115  (closed when the loop ends)
    terms = sorted(stage.weights)
    window: dict[str, float] = {}  # term sums / counts and metric sums / counts of the log window
    # The window's wall time runs from the previous window's log to this one's, so what the loop does
    # between steps (logging, eval, checkpoints) counts against the throughput it reports.
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    losses: list[float] = []
    eval_loss: float | None = None
    said_no_eval = False
    while step < cfg.max_steps:
        lr = engine.get_lr()[0]  # what this step's update uses (after it, the scheduler has moved on)
        micro = [next(batches) for _ in range(accum)]
        if trace:
            trace.write("".join(f"{step + 1}\t{i}\t{batch_digest(b)}\n" for i, b in enumerate(micro)))
            trace.flush()
        local_counts: dict[str, float] = dict.fromkeys(terms, 0.0)
        for b in micro:
            for t, c in stage.count(b).items():
                if t in local_counts:  # a term the stage weights (a count for an unused one is ignored)
                    local_counts[t] += c
        n_global = _reduce_named(local_counts, terms)
        sums: dict[str, float] = dict.fromkeys(terms, 0.0)
        metrics: dict[str, float] = {}
        for b in micro:
            out = stage.loss(engine, _to(b, engine.device))
            scaled = sum(
                stage.weights[t] * out.sums[t] * (world * accum / n_global[t])
                for t in out.sums
                if n_global[t] > 0
            )
            # A micro-batch whose terms count nothing globally still joins the backward (ZeRO hooks).
            engine.backward(scaled if torch.is_tensor(scaled) else _zero_loss(out))
            engine.step()
            for t, v in out.sums.items():
                sums[t] += float(v.detach())
            for name, (v, c) in out.metrics.items():
                metrics[f"{name}/sum"] = metrics.get(f"{name}/sum", 0.0) + float(v)
                metrics[f"{name}/count"] = metrics.get(f"{name}/count", 0.0) + float(c)
        step += 1
        names = sorted(metrics)
        reduced = _reduce_named({**sums, **metrics, "_tokens": sum(stage.tokens(b) for b in micro)},
                                [*terms, *names, "_tokens"])  # fmt: skip
        step_loss, step_tokens = _objective(stage.weights, reduced, n_global), int(reduced["_tokens"])
        tokens += step_tokens
        losses.append(step_loss)
        for key, v in [*((f"{t}/sum", reduced[t]) for t in terms), *((f"{t}/count", n_global[t]) for t in terms),
                       *((n, reduced[n]) for n in names)]:  # fmt: skip
            window[key] = window.get(key, 0.0) + v
        window_steps += 1
        window_tokens += step_tokens

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            window_time, window_start = now - window_start, now
            tok_s = window_tokens / window_time
            term_means = {t: window[f"{t}/sum"] / window[f"{t}/count"] for t in terms if window[f"{t}/count"]}
            scalars = {
                "train/loss": sum(stage.weights[t] * v for t, v in term_means.items()),
                "train/lr": lr,
                "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "train/tokens": tokens,
                "perf/tokens_per_s": tok_s,
                "perf/step_time_s": window_time / window_steps,
                "perf/mfu": tok_s * stage.flops_per_token / peak,
                "perf/peak_memory_gib": all_reduce_values(
                    [peak_memory_bytes(engine.device)], dist.ReduceOp.MAX
                )[0]
                / 2**30,
            }
            if terms != ["lm"]:
                scalars.update({f"train/{t}": v for t, v in term_means.items()})
            for key in window:
                metric = key[: -len("/sum")]
                if key.endswith("/sum") and metric not in terms and window.get(f"{metric}/count"):
                    scalars[f"train/{metric}"] = window[key] / window[f"{metric}/count"]
            monitor.scalars(step, scalars)
            window, window_steps, window_tokens = {}, 0, 0
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            eval_loss = evaluate(engine, stage, filler=micro[0])
            if eval_loss is not None:
                monitor.scalars(step, {"eval/loss": eval_loss})
            elif not said_no_eval:
                said_no_eval = True
                monitor.print(NO_EVAL.format(stage=stage.name))
            line = f"[{stage.name}] step {step}: train loss {step_loss:.4f}"
            monitor.print(line + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            _save(engine, stage, ckpt_dir, step, tokens, cfg_hash, cfg.keep_checkpoints)
        monitor.advance({"loss": f"{step_loss:.3f}"})
    if not losses:  # resumed at max_steps: nothing left to train
        eval_loss = evaluate(engine, stage)
    monitor.close()
    if trace:
        trace.close()
    return TrainResult(engine, step, tokens, losses, eval_loss, read_marker(ckpt_dir)["tag"])


def _zero_loss(out: Loss) -> torch.Tensor:
    """0 with the graph of the micro-batch's terms: backward through it gives zero gradients."""
    return sum(v * 0.0 for v in out.sums.values())
