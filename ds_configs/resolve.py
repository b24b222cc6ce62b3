"""Fill the `"auto"` values of a user-editable DeepSpeed JSON from the experiment, then validate it.

Batch arithmetic lives here and only here:
    train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × data-parallel world
    e.g. 8 sequences × 1 accumulation × 2 ranks = 16 sequences of 128 tokens = 2,048 tokens per step.
Values the user wrote win over the experiment's; the training loop reads micro batch and accumulation
back from the resolved JSON, so data and engine always agree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

from stablekd.data_pipeline.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent


class TrainSettings(Protocol):
    """What "auto" values are filled from: a training stage's config section (launcher.config.TrainConfig)."""

    micro_batch_size: int
    grad_accum: int
    grad_clip: float
    lr: float
    weight_decay: float
    max_steps: int
    warmup_steps: int
    min_lr_ratio: float
    dtype: str


def locate(name_or_path: str) -> Path:
    """A path as given, else a file shipped in ds_configs/ (`zero3.json`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if (PACKAGE_DIR / name_or_path).is_file():
        return PACKAGE_DIR / name_or_path
    shipped = ", ".join(sorted(f.name for f in PACKAGE_DIR.glob("*.json")))
    raise ConfigError(
        f"ds_config: {name_or_path} is neither a file nor a shipped DeepSpeed config ({shipped})"
    )


def load(name_or_path: str) -> tuple[dict, Path]:
    path = locate(name_or_path)
    try:
        ds = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte at offset {e.start}); expected a DeepSpeed JSON file"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object of DeepSpeed settings")
    return ds, path


def _fill(ds: dict, dotted: str, value: Any) -> None:
    """Set `dotted` to `value` where it is "auto" or absent (absent only for top-level keys)."""
    *parents, leaf = dotted.split(".")
    node = ds
    for p in parents:
        if p not in node:
            return  # the user removed the section (no scheduler, no tensorboard): nothing to fill
        node = node[p]
    if node.get(leaf, "auto") == "auto":
        node[leaf] = value


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~1.6 s of every launch) on a machine that has
    no GPU driver's device files (/dev/nvidia0..., ROCm's /dev/kfd, WSL's /dev/dxg): there it is False."""
    if not (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists() or Path("/dev/dxg").exists()):
        return False
    import torch

    return torch.cuda.is_available()


def fast_bf16() -> bool:
    """Whether bf16 matmuls beat fp32 here: CUDA with bf16 support, or a CPU with AMX or AVX512-BF16.

    Without those instructions a CPU emulates bf16, ~3× slower than fp32 (measured on an AVX-512 Xeon
    without AMX: 0.03 vs 0.1 TFLOP/s per core), so "auto" trains in fp32 there.
    """
    if cuda_available():
        import torch

        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(
    ds: dict, train: TrainSettings, world_size: int, tb_dir: str | Path, source: str = "ds_config"
) -> dict:
    """A copy of `ds` with every "auto" filled; errors name the key and the file."""
    ds = copy.deepcopy(ds)
    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", train.grad_accum)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    _fill(ds, "train_batch_size", micro * accum * world_size)
    _fill(ds, "gradient_clipping", train.grad_clip)
    _fill(ds, "optimizer.params.lr", train.lr)
    _fill(ds, "optimizer.params.weight_decay", train.weight_decay)
    _fill(ds, "scheduler.params.total_num_steps", train.max_steps)
    _fill(ds, "scheduler.params.warmup_num_steps", max(1, train.warmup_steps))  # DeepSpeed requires > 0
    _fill(ds, "scheduler.params.cos_min_ratio", train.min_lr_ratio)
    _fill(ds, "bf16.enabled", train.dtype == "bf16" or (train.dtype == "auto" and fast_bf16()))
    _fill(ds, "tensorboard.output_path", str(tb_dir))
    left = _find_auto(ds)
    if left:
        raise ConfigError(f'{source}: no value to fill for "auto" at {", ".join(left)}; write a value there')
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(
            f"{source}: train_batch_size {ds['train_batch_size']} != train_micro_batch_size_per_gpu {micro} × "
            f"gradient_accumulation_steps {accum} × world size {world_size} = {micro * accum * world_size}"
        )
    return ds


def validate(ds: dict, world_size: int, source: str = "ds_config") -> None:
    """Run DeepSpeed's own config class over a resolved config, before any rank starts.

    DeepSpeedConfig reads the world size from an initialised process group, which the launcher does not
    have; `resolve` checked the world-size arithmetic, so the copy validated here is scaled to one rank.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    _check_types(ds, source)
    one = copy.deepcopy(ds)
    one["train_batch_size"] = ds["train_batch_size"] // world_size
    try:
        DeepSpeedConfig(one)
    except Exception as e:  # DeepSpeed raises assorted types (AssertionError, ValueError, pydantic errors)
        lines = [line.strip() for line in str(e).strip().splitlines()[:3]] or [type(e).__name__]
        raise ConfigError(f"{source}: rejected by DeepSpeed: {' | '.join(lines)}") from None


def _type_of(section: Any) -> Any:
    """A section's "type", or None when there is none (a section of another shape is DeepSpeed's to judge)."""
    return section.get("type") if isinstance(section, dict) else None


def _check_types(ds: dict, source: str) -> None:
    """The optimizer and scheduler types DeepSpeed can build. Its config class accepts any name and the
    engine fails only on the ranks (an optimizer is one of DeepSpeed's or a torch.optim class, a
    scheduler one of deepspeed.runtime.lr_schedules)."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    kind = _type_of(ds.get("optimizer"))
    if (
        kind is not None
        and str(kind).lower() not in DEEPSPEED_OPTIMIZERS
        and not hasattr(torch.optim, str(kind))
    ):
        known = sorted({*DEEPSPEED_OPTIMIZERS, "AdamW", "Adam", "SGD", "... any torch.optim class"})
        raise ConfigError(
            f'{source}: optimizer.type "{kind}" is not an optimizer DeepSpeed knows ({", ".join(known)})'
        )
    kind = _type_of(ds.get("scheduler"))
    if kind is not None and kind not in VALID_LR_SCHEDULES:
        raise ConfigError(
            f'{source}: scheduler.type "{kind}" is not a DeepSpeed scheduler ({", ".join(VALID_LR_SCHEDULES)})'
        )


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def estimate(total_params: int, largest_layer_params: int, nproc_per_node: int, nodes: int) -> None:
    """Print DeepSpeed's ZeRO-2 and ZeRO-3 model-state memory estimates (per GPU and CPU, offload options)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    estimate_zero2_model_states_mem_needs_all_cold(total_params, nproc_per_node, nodes)
    estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, nproc_per_node, nodes)
