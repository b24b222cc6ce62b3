"""Stage order, run-directory layout, preparation (corpus, tokenizer, DeepSpeed JSON), DONE.json skip/resume.

Layout (DESIGN §4): runs/<name>/{config.yaml, ds/<stage>.json, data/, tokenizer/, teacher/, tb/<stage>/}.
A stage whose DONE.json carries the current config hash is skipped; one with a checkpoint but no
DONE.json resumes (the training loop finds its last complete checkpoint).
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import time
from pathlib import Path

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.files import atomic_write
from stablekd.data_pipeline.sources import iter_documents, resolve_paths
from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher.config import ConfigError, ExperimentConfig, config_hash, save_config, to_dict
from stablekd.model.tokenizer import train_tokenizer

STAGES = ["teacher", "soft_labels", "evaluate"]  # in pipeline order
# Stages that run in the launching process (models that fit one process); the others start ranks. One of
# them with a `needs_ranks(cfg)` that says True (evaluate of a teacher in ZeRO-3 shards) starts ranks too.
IN_PROCESS: set[str] = {"evaluate"}
STAGE_DIRS = {"evaluate": "eval"}  # DESIGN §4 layout; other stages write <run>/<stage>/
# Fields that change what a stage computes; logging/saving cadence may change on resume.
_NOT_HASHED = {"eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "export_hf"}


def say(msg: str) -> None:
    print(f"stablekd: {msg}", file=sys.stderr, flush=True)


def tokenizer_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.tokenizer.path) if cfg.tokenizer.path else cfg.run_dir / "tokenizer"


def train_files(cfg: ExperimentConfig) -> list[Path]:
    return resolve_paths(cfg.data.paths) if cfg.data.paths else [cfg.run_dir / "data" / "train.txt"]


def eval_files(cfg: ExperimentConfig) -> list[Path]:
    if cfg.data.eval_paths:
        return resolve_paths(cfg.data.eval_paths)
    return [] if cfg.data.paths else [cfg.run_dir / "data" / "heldout.txt"]


def stage_hash(cfg: ExperimentConfig, stage: str) -> str:
    """What a stage's result depends on: its section, data, tokenizer, seed, DeepSpeed JSON, and the
    hashes in the DONE.json of every earlier stage present (a retrained teacher makes its soft labels stale)."""
    section = {k: v for k, v in to_dict(getattr(cfg, stage)).items() if k not in _NOT_HASHED}
    ds_path = cfg.run_dir / "ds" / f"{stage}.json"
    ds = json.loads(ds_path.read_text()) if ds_path.exists() else {}
    ds.pop("tensorboard", None)  # holds the run directory's path, not a training choice
    upstream = {
        s: json.loads(done_path(cfg, s).read_text())["config_hash"]
        for s in STAGES[: STAGES.index(stage)]
        if done_path(cfg, s).exists()
    }
    return config_hash(section, cfg.data, cfg.tokenizer, cfg.run.seed, ds, upstream)


def world_size(cfg: ExperimentConfig) -> int:
    if not cfg.launch.hostfile:
        return cfg.launch.nproc_per_node
    hosts = [
        line.split()
        for line in Path(cfg.launch.hostfile).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return sum(min(int(h[1].split("=")[1]), cfg.launch.nproc_per_node) for h in hosts if len(h) > 1)


def check_files(cfg: ExperimentConfig) -> None:
    """Fail before any work when a named file or directory is missing."""
    for paths in (cfg.data.paths, cfg.data.eval_paths):
        if paths:
            resolve_paths(paths)
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).is_dir():
        raise ConfigError(
            f"tokenizer.path: {cfg.tokenizer.path} is not a directory (expected a tokenizer AutoTokenizer can load)"
        )
    if cfg.teacher.init_from and not Path(cfg.teacher.init_from).is_dir():
        raise ConfigError(
            f"teacher.init_from: {cfg.teacher.init_from} is not a directory (expected a teacher run or a Hugging Face model)"
        )
    if cfg.launch.hostfile and not Path(cfg.launch.hostfile).is_file():
        raise ConfigError(
            f"launch.hostfile: {cfg.launch.hostfile} does not exist (expected lines `host slots=N`)"
        )
    ds_resolve.locate(cfg.teacher.ds_config)


def _prepare_corpus(cfg: ExperimentConfig) -> None:
    if cfg.data.paths:
        return
    out = cfg.run_dir / "data"
    params = to_dict(cfg.data.bios)
    if (out / "params.json").exists() and json.loads((out / "params.json").read_text()) == params:
        return
    corpus = bios.generate(
        cfg.data.bios.people,
        cfg.data.bios.bios_per_person,
        cfg.data.bios.heldout_bios_per_person,
        cfg.data.bios.unseen_people,
        cfg.data.bios.seed,
    )
    bios.write_corpus(corpus, out)
    (out / "params.json").write_text(json.dumps(params))
    say(f"bios corpus: {len(corpus.train)} training biographies of {len(corpus.people)} people -> {out}")


def _prepare_tokenizer(cfg: ExperimentConfig) -> None:
    if cfg.tokenizer.path:
        return
    out = tokenizer_dir(cfg)
    files = train_files(cfg)
    params = {"vocab_size": cfg.tokenizer.vocab_size, "files": [str(f) for f in files]}
    if (out / "params.json").exists() and json.loads((out / "params.json").read_text()) == params:
        return
    t0 = time.perf_counter()
    docs = itertools.islice(iter_documents(files), cfg.tokenizer.train_sentences)
    try:
        train_tokenizer(docs, cfg.tokenizer.vocab_size, out)
    except ValueError as e:
        raise ConfigError(f"tokenizer.vocab_size: {e}") from None
    (out / "params.json").write_text(json.dumps(params))
    say(
        f"tokenizer: SentencePiece BPE, vocab {cfg.tokenizer.vocab_size}, trained in {time.perf_counter() - t0:.1f}s -> {out}"
    )


def prepare_ds_config(cfg: ExperimentConfig, stage: str) -> dict:
    """Resolve the stage's DeepSpeed JSON, validate it with DeepSpeed's config class, write ds/<stage>.json."""
    train_cfg = getattr(cfg, stage)
    raw, path = ds_resolve.load(train_cfg.ds_config)
    ds = ds_resolve.resolve(
        raw, train_cfg, world_size(cfg), cfg.run_dir / "tb" / stage / "deepspeed", str(path)
    )
    ds_resolve.validate(ds, world_size(cfg), str(path))
    out = cfg.run_dir / "ds" / f"{stage}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ds, indent=2))
    return ds


def prepare(cfg: ExperimentConfig, stages: list[str]) -> None:
    """Everything the ranks read, made once in the launching process: config.yaml, corpus, tokenizer, ds JSONs."""
    check_files(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    _prepare_corpus(cfg)
    _prepare_tokenizer(cfg)
    for stage in stages:
        if hasattr(getattr(cfg, stage), "ds_config"):  # training stages
            prepare_ds_config(cfg, stage)


def stage_dir(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_dir / STAGE_DIRS.get(stage, stage)


def done_path(cfg: ExperimentConfig, stage: str) -> Path:
    return stage_dir(cfg, stage) / "DONE.json"


def is_done(cfg: ExperimentConfig, stage: str) -> bool:
    path = done_path(cfg, stage)
    if not path.exists():
        return False
    done = json.loads(path.read_text())
    if done.get("config_hash") != stage_hash(cfg, stage):
        if stage in IN_PROCESS:  # no checkpoint to mix up: cheap to redo (e.g. evaluate after a new model)
            say(f"{stage}: inputs or config changed since {path}, running it again")
            return False
        raise ConfigError(
            f"{path}: stage {stage} finished with another config (hash {done.get('config_hash')}, now "
            f"{stage_hash(cfg, stage)}); use a new run.out_dir, or delete {path.parent} to redo it"
        )
    return True


def write_done(cfg: ExperimentConfig, stage: str, produced: dict, inputs: dict) -> None:
    """The stage's last act: what it produced, its config hash, and hashes of what it read."""
    done = {
        "stage": stage,
        "config_hash": stage_hash(cfg, stage),
        "produced": produced,
        "inputs": inputs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = done_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(done, indent=2))


def _run_hash(cfg: ExperimentConfig) -> str:
    """The config every node must share: all but `launch` (node_rank differs per node)."""
    return config_hash({k: v for k, v in to_dict(cfg).items() if k != "launch"})


def _wait_for(path: Path, what: str, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise ConfigError(
                f"waited {timeout_s:.0f}s for {what} ({path} missing): is node 0 running the same command?"
            )
        time.sleep(0.5)


def run(cfg: ExperimentConfig, stages: list[str]) -> None:
    """Prepare, then launch each stage not already done (DeepSpeed runner, one job per stage)."""
    from stablekd.launcher.launch import run_stage

    # With launch.no_ssh every node runs this command; node 0 prepares, the others wait for it
    # (the run directory is on a filesystem every node sees) and never run in-process stages.
    follower = cfg.launch.no_ssh and cfg.launch.node_rank > 0
    if follower:
        _wait_for(cfg.run_dir / "prepared.json", "node 0 to prepare the run directory")
        prepared = json.loads((cfg.run_dir / "prepared.json").read_text())["config_hash"]
        if prepared != _run_hash(cfg):
            raise ConfigError(
                f"{cfg.run_dir}: node 0 prepared another config (hash {prepared}, this node {_run_hash(cfg)})"
            )
    else:
        prepare(cfg, stages)
        (cfg.run_dir / "prepared.json").write_text(json.dumps({"config_hash": _run_hash(cfg)}))
    for stage in stages:
        module = importlib.import_module(f"stablekd.launcher.stages.{stage}")
        in_process = stage in IN_PROCESS and not (hasattr(module, "needs_ranks") and module.needs_ranks(cfg))
        if follower and in_process:
            continue
        if is_done(cfg, stage):
            say(f"{stage}: done already ({done_path(cfg, stage)}), skipped")
            continue
        if hasattr(module, "preflight"):
            module.preflight(cfg)  # what the previous stage left, checked before any rank starts
        if in_process:
            module.run(cfg)
        else:
            run_stage(cfg, stage)
        if follower:  # global rank 0, on node 0, writes DONE.json after this node's ranks may have exited
            _wait_for(done_path(cfg, stage), f"node 0 to finish stage {stage}", timeout_s=120)
        if not done_path(cfg, stage).exists():
            raise RuntimeError(f"stage {stage} exited without writing {done_path(cfg, stage)}")
        say(f"{stage}: done -> {stage_dir(cfg, stage)}")
