"""Paths of a run directory (docs/architecture.md) and what its stages read, for the driver and ranks alike.

    runs/<name>/{config.yaml, ds/<stage>.json, data/, tokenizer/, <stage dir>/{ckpt/, hf/, DONE.json},
                 tb/<stage>/, logs/<stage>.log}

A stage's directory is its registry row's `out_dir`; the training files are data.paths without the held-out
share (or the bios corpus), the held-out files what eval loss, perplexity and the report read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stablekd.data_pipeline.sources import Corpus, resolve_paths
from stablekd.launcher.config import ExperimentConfig
from stablekd.launcher.stages import spec


def say(msg: str) -> None:
    print(f"stablekd: {msg}", file=sys.stderr, flush=True)


def _holds_out(cfg: ExperimentConfig) -> float:
    """The share of data.paths held out for eval: data.eval_fraction with a user corpus and no
    data.eval_paths, else 0 (the bios corpus has its own held-out file; eval_paths replace the share)."""
    return cfg.data.eval_fraction if cfg.data.paths and not cfg.data.eval_paths else 0.0


def train_files(cfg: ExperimentConfig) -> Corpus:
    """What every training reader sees (teacher stream, tokenizer, soft labels, candidate contexts, the LM
    streams of distill and contrastive): data.paths read by data.text_unit without the held-out share,
    or the built-in bios corpus's train.txt (one biography per line, whatever data.text_unit says: the
    unit describes the user's files, and a bios file has no blank lines between biographies)."""
    if not cfg.data.paths:
        return Corpus((cfg.run_dir / "data" / "train.txt",), text_unit="line")
    fraction = _holds_out(cfg)
    return Corpus(
        tuple(resolve_paths(cfg.data.paths)), cfg.data.text_unit, "train" if fraction else "all", fraction
    )


def eval_files(cfg: ExperimentConfig) -> Corpus:
    """Held-out text for eval loss, perplexity and the report's prefixes: data.eval_paths (every
    document), else the held-out share of data.paths (`train_files` leaves it out), else the bios
    held-out biographies. No files (falsy) when a user corpus has data.eval_fraction 0 and no eval_paths;
    the share itself may hold no document on a small corpus (eval_batches then returns none)."""
    if cfg.data.eval_paths:
        return Corpus(tuple(resolve_paths(cfg.data.eval_paths)), cfg.data.text_unit)
    if not cfg.data.paths:
        return Corpus((cfg.run_dir / "data" / "heldout.txt",), text_unit="line")
    fraction = _holds_out(cfg)
    if not fraction:
        return Corpus(())
    return Corpus(tuple(resolve_paths(cfg.data.paths)), cfg.data.text_unit, "eval", fraction)


def new_reading(cfg: ExperimentConfig) -> dict:
    """data.text_unit and the held-out share as far as they change what is read: text_unit only for user
    files read other than line by line, eval_fraction only when a share is held out. Empty for a run that
    reads what every run read before these keys existed (bios corpus; user files, line unit, no share),
    so such a run directory keeps its hashes."""
    out: dict = {}
    if (cfg.data.paths or cfg.data.eval_paths) and cfg.data.text_unit != "line":
        out["text_unit"] = cfg.data.text_unit
    if fraction := _holds_out(cfg):
        out["eval_fraction"] = fraction
    return out


def stage_dir(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_dir / spec(stage).out_dir


def contrastive_start(cfg: ExperimentConfig) -> Path:
    """The Hugging Face directory the contrastive stage fine-tunes: contrastive.init_from (a student
    distilled outside this run), else the distill stage's export."""
    if cfg.contrastive.init_from:
        return Path(cfg.contrastive.init_from)
    return stage_dir(cfg, "distill") / "hf"


def ckpt_dir(cfg: ExperimentConfig, stage: str) -> Path:
    """Where the training loop keeps a stage's checkpoints (complete.json names the last complete tag)."""
    return cfg.run_dir / spec(stage).ckpt_dir


def ds_path(cfg: ExperimentConfig, stage: str) -> Path:
    """The stage's resolved DeepSpeed JSON (written by preparation, read by its ranks)."""
    return cfg.run_dir / spec(stage).ds_json


def tb_dir(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_dir / spec(stage).tb_dir


def done_path(cfg: ExperimentConfig, stage: str) -> Path:
    return stage_dir(cfg, stage) / "DONE.json"


def follower(cfg: ExperimentConfig) -> bool:
    """With launch.no_ssh every node runs the command; node 0 prepares and runs in-process stages."""
    return cfg.launch.no_ssh and cfg.launch.node_rank > 0
