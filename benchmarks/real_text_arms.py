"""The in-process arms of benchmarks/real_text.py: each trained at world size 1 with the distill stage's own
assembly (benchmarks/arms.py) in OUT/arms/<arm>, exported to OUT/arms/<arm>/student/hf beside an arm.json
summary; an arm with both is kept, a half-trained one retrained from its start."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import arms as bench  # benchmarks/arms.py: this script's folder is on sys.path
import cross_tokenizer

from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.launcher.config import load_config
from stablekd.launcher.models import tokenizer_dir
from stablekd.launcher.rank import artifacts
from stablekd.model.build import export_hf


def kept_arm(arm_dir: Path) -> dict | None:
    """An arm's arm.json once it is exported, else None, its directory removed (retrained from its start)."""
    summary = arm_dir / "arm.json"
    if (arm_dir / "student" / "hf" / "config.json").is_file() and summary.is_file():
        return json.loads(summary.read_text())
    shutil.rmtree(arm_dir, ignore_errors=True)
    return None


def train_export(cfg, steps: int, summary: dict, teacher=None) -> dict:
    """One arm trained with the distill stage's loss (bench.train_arm), exported to <arm>/student/hf, and its
    arm.json: `summary` + what training measured (and, on-policy, its step split)."""
    trained = bench.train_arm(cfg, "kd", steps, teacher)
    result = trained["result"]
    export_hf(result.engine.module, trained["tokenizer"], cfg.run_dir / "student" / "hf", trained["zero3"])
    info = {**summary, "steps": result.steps, "tokens": result.tokens, "train_wall_s": trained["wall_s"],
            "eval_loss": result.eval_loss, "bf16": trained["bf16"]}  # fmt: skip
    if cfg.distill.on_policy:
        info["on_policy_split"] = bench.on_policy_split(cfg)
    (cfg.run_dir / "arm.json").write_text(json.dumps(info, indent=1) + "\n")
    del trained, result  # the engine and its optimizer state, before the next arm's
    gc.collect()
    return info


def load_teacher(run: Path, cfg):  # -> model.sharded_teacher.ShardedTeacher
    """The run's teacher for the on-policy arm of `cfg`, loaded at world size 1 from the run's checkpoint
    (bench.universal_teacher gives cfg's arm directory a teacher/ that loads there)."""
    if why := bench.universal_teacher(run, cfg.run_dir):
        raise SystemExit(f"{cfg.run_dir}: no teacher at world size 1: {why}")
    return artifacts.sharded_teacher(cfg)


def bpe_student(run: Path, out: Path) -> Path:
    """OUT/arms/bpe_student: the student preset with a byte-level BPE tokenizer of the teacher's vocabulary
    size trained on the run's training text (made once)."""
    path = out / "arms" / "bpe_student"
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        cfg = load_config(run / "config.yaml")
        cross_tokenizer.bpe_student(cfg, path, len(load_tokenizer(tokenizer_dir(cfg))))
    return path
