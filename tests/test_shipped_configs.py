"""Every experiment YAML in configs/ loads, names presets that exist, and each of its training stages'
DeepSpeed JSONs resolves and passes DeepSpeed's own config class at world size 2 (STYLE 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stablekd.launcher import pipeline
from stablekd.launcher.config import load_config
from stablekd.launcher.stages import REGISTRY
from stablekd.model.presets import preset
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_gpu_config_is_shipped() -> None:
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_its_deepspeed_jsons_validate(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2"])
    preset(cfg.teacher.model)  # a KeyError names the known presets
    preset(cfg.student.model)
    for stage in [s.name for s in REGISTRY if s.trains]:
        ds = pipeline.prepare_ds_config(cfg, stage)  # ConfigError naming the file if DeepSpeed rejects it
        train = getattr(cfg, stage)
        assert ds["train_batch_size"] == train.micro_batch_size * train.grad_accum * 2, stage
