"""Every experiment YAML in configs/ loads, names presets that exist (or, configs/hf.yaml, the model
directories given on its command line), and each of its training stages' DeepSpeed JSONs resolves and
passes DeepSpeed's own config class at world size 2; `stablekd run configs/hf.yaml --dry-run`
passes on model directories built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from stablekd.launcher.config import load_config
from stablekd.launcher.driver import prepare
from stablekd.launcher.stages import REGISTRY
from stablekd.model.presets import preset
from tests.conftest import REPO, run_stablekd
from tests.hf_models import PROSE, byte_level_tokenizer, model_dir

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def own_models(tmp_path_factory) -> list[str]:
    """configs/hf.yaml's command-line keys: a Qwen2 teacher and a GPT-2 student of one byte-level
    tokenizer, padded differently, and the public-domain prose."""
    tmp = tmp_path_factory.mktemp("own")
    tok = byte_level_tokenizer(tmp / "tok", 384)
    teacher, student = model_dir(tmp / "t", "qwen2", tok, 448), model_dir(tmp / "s", "gpt2", tok, 400)
    return [f"teacher.model={teacher}", f"student.model={student}", f"data.paths=[{PROSE}]"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_its_deepspeed_jsons_validate(
    path: Path, tmp_path: Path, own_models
) -> None:
    keys = own_models if path.name == "hf.yaml" else []
    cfg = load_config(path, [f"run.out_dir={tmp_path}", "launch.nproc_per_node=2", *keys])
    if not keys:
        preset(cfg.teacher.model)  # a KeyError names the known presets
        preset(cfg.student.model)
    for stage in [s.name for s in REGISTRY if s.trains]:
        ds = prepare.prepare_ds_config(cfg, stage)  # ConfigError naming the file if DeepSpeed rejects it
        train = getattr(cfg, stage)
        assert ds["train_batch_size"] == train.micro_batch_size * train.grad_accum * 2, stage


def test_hf_config_dry_run_on_model_directories(tmp_path: Path, own_models) -> None:
    out = run_stablekd(
        "run", str(REPO / "configs" / "hf.yaml"), "--dry-run", f"run.out_dir={tmp_path / 'run'}", *own_models
    ).stdout
    assert "# prepare" in out and "tokenizer/" not in out  # the teacher directory's tokenizer: none trained
    for stage in ("teacher", "soft_labels", "distill", "contrastive"):
        assert f"# {stage}: would run on 8 ranks" in out, stage
    assert not (tmp_path / "run").exists()
