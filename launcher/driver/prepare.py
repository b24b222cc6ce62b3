"""What the launching process makes once before any rank starts: file checks, config.yaml, the bios
corpus, the SentencePiece tokenizer and the resolved DeepSpeed JSONs (every file written atomically; a
part made from the same inputs before is kept: its params.json says what it was made from).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.files import atomic_write
from stablekd.data_pipeline.sources import check_records, iter_documents, resolve_paths
from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher import models, placement, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig, save_config, to_dict
from stablekd.launcher.stages import REGISTRY, spec


def check_files(cfg: ExperimentConfig) -> None:
    """Fail before any work when a named file or directory is missing, or a `.jsonl` of the corpus is in
    another schema (data_pipeline/sources.py `check_records`)."""
    for key, paths in (("data.paths", cfg.data.paths), ("data.eval_paths", cfg.data.eval_paths)):
        for path in resolve_paths(paths) if paths else []:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                # Here, not on the ranks: a file in another schema would otherwise be skipped record by
                # record and only counted in the teacher's log after training (one read of each .jsonl).
                try:
                    check_records(path)
                except DataError as e:
                    raise ConfigError(f"{key}: {e}") from None
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
        raise ConfigError(
            f"tokenizer.path: {cfg.tokenizer.path} is not a directory (expected a tokenizer AutoTokenizer can load)"
        )
    models.check_models(cfg)
    if cfg.launch.hostfile and not Path(cfg.launch.hostfile).is_file():
        raise ConfigError(
            f"launch.hostfile: {cfg.launch.hostfile} does not exist (expected lines `host slots=N`)"
        )
    placement.check(cfg)
    for s in REGISTRY:
        if s.trains:
            try:
                ds_resolve.locate(getattr(cfg, s.name).ds_config)
            except ConfigError as e:  # "ds_config: ..." of which stage: name the key in full
                raise ConfigError(f"{s.name}.{e}") from None


def is_current(out: Path, params: dict) -> bool:
    """`out` was made from `params` (its params.json says so): nothing to redo."""
    return (out / "params.json").exists() and json.loads((out / "params.json").read_text()) == params


def tokenizer_params(cfg: ExperimentConfig) -> dict:
    """What the trained tokenizer depends on: its size and the training documents (never the held-out share)."""
    params = {"vocab_size": cfg.tokenizer.vocab_size, "files": [str(f) for f in rundir.train_files(cfg)]}
    reading = rundir.new_reading(cfg)
    if not cfg.data.paths:
        reading.pop("text_unit", None)  # it shapes only data.eval_paths then
    return {**params, **reading}


def _prepare_corpus(cfg: ExperimentConfig) -> None:
    if cfg.data.paths:
        return
    out = cfg.run_dir / "data"
    params = to_dict(cfg.data.bios)
    if is_current(out, params):
        return
    corpus = bios.generate(
        cfg.data.bios.people,
        cfg.data.bios.bios_per_person,
        cfg.data.bios.heldout_bios_per_person,
        cfg.data.bios.unseen_people,
        cfg.data.bios.seed,
    )
    bios.write_corpus(corpus, out)
    atomic_write(out / "params.json", json.dumps(params))  # written last: marks it complete
    rundir.say(
        f"bios corpus: {len(corpus.train)} training biographies of {len(corpus.people)} people -> {out}"
    )


def _prepare_tokenizer(cfg: ExperimentConfig) -> None:
    if not models.trains_tokenizer(cfg):
        return
    out = models.tokenizer_dir(cfg)
    params = tokenizer_params(cfg)
    if is_current(out, params):
        return
    t0 = time.perf_counter()
    docs = itertools.islice(iter_documents(rundir.train_files(cfg)), cfg.tokenizer.train_sentences)
    try:
        from stablekd.data_pipeline.tokenizer import (
            train_tokenizer,  # sentencepiece, transformers: only when training
        )

        train_tokenizer(docs, cfg.tokenizer.vocab_size, out)
    except ValueError as e:
        raise ConfigError(f"tokenizer.vocab_size: {e}") from None
    atomic_write(out / "params.json", json.dumps(params))  # written last: marks it complete
    rundir.say(
        f"tokenizer: SentencePiece BPE, vocab {cfg.tokenizer.vocab_size}, trained in {time.perf_counter() - t0:.1f}s -> {out}"
    )


def prepare_ds_config(cfg: ExperimentConfig, stage: str) -> dict:
    """Resolve the stage's DeepSpeed JSON, validate it with DeepSpeed's config class, write ds/<stage>.json."""
    ds = placement.resolve_ds_config(cfg, stage)
    out = rundir.ds_path(cfg, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(ds, indent=2))  # other nodes' ranks read it
    return ds


def prepare(cfg: ExperimentConfig, stages: list[str]) -> None:
    """Everything the ranks read, made once in the launching process: config.yaml, corpus, tokenizer, ds JSONs."""
    check_files(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    _prepare_corpus(cfg)
    _prepare_tokenizer(cfg)
    for stage in stages:
        if spec(stage).trains:
            prepare_ds_config(cfg, stage)
