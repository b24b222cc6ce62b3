"""Stage order, run-directory layout, preparation (corpus, tokenizer, DeepSpeed JSON), DONE.json skip/resume.

Layout (DESIGN §4): runs/<name>/{config.yaml, ds/<stage>.json, data/, tokenizer/, teacher/, tb/<stage>/,
logs/<stage>.log}. A stage whose DONE.json carries the current config hash is skipped; one with a
checkpoint but no DONE.json resumes (the training loop finds its last complete checkpoint); a stage
starts only when every stage it reads (registry `needs`/`uses`) has such a DONE.json. `run` says
one line when a stage starts and one when it ends (wall time, headline figures of its DONE.json);
`dry_run` lists what `run` would start, starting and writing nothing.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stablekd.data_pipeline import bios
from stablekd.data_pipeline.files import atomic_write, read_marker
from stablekd.data_pipeline.sources import Corpus, iter_documents, resolve_paths
from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher import models, nodes, placement
from stablekd.launcher.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    save_config,
    to_dict,
)
from stablekd.launcher.stages import NAMES, REGISTRY, spec
from stablekd.launcher.status import headline, wall
from stablekd.model.tokenizer import tokenizer_hash, train_tokenizer

if TYPE_CHECKING:  # annotations only: the driver process does not import torch/DeepSpeed to plan a run
    import torch
    from transformers import PreTrainedTokenizerBase

    from stablekd.launcher import engine

# Section fields that do not change what a stage computes: logging/saving cadence may change on resume, and
# where the job runs (distill.include) is no training choice (its world size is in the DeepSpeed JSON).
_NOT_HASHED = {
    "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "export_hf", "include",
}  # fmt: skip


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


def _new_reading(cfg: ExperimentConfig) -> dict:
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


def _data_hashed(cfg: ExperimentConfig) -> dict:
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("text_unit", "eval_fraction")}
    return {**data, **_new_reading(cfg)}


def stage_hash(cfg: ExperimentConfig, stage: str, ds: dict | None = None) -> str:
    """What a stage's result depends on: its section (and the registry's `sections`), data, tokenizer, seed,
    DeepSpeed JSON, and the hashes in the DONE.json of every earlier stage present (a retrained teacher
    makes its soft labels stale); for a stage it follows while that runs, the hash that one will have.
    `ds`: the stage's resolved DeepSpeed JSON when it is not written yet (a dry run); else ds/<stage>.json."""
    section = {k: v for k, v in to_dict(getattr(cfg, stage)).items() if k not in _NOT_HASHED}
    extra = [to_dict(getattr(cfg, name)) for name in spec(stage).sections]
    ds_path = cfg.run_dir / "ds" / f"{stage}.json"
    if ds is None:
        ds = json.loads(ds_path.read_text()) if ds_path.exists() else {}
    ds = {k: v for k, v in ds.items() if k != "tensorboard"}  # the run directory's path: no training choice
    # A stage read while it still runs (distill.follow: soft_labels) counts with the hash it will finish
    # with: the follower's checkpoints must keep their hash once it has (check_upstream holds it to that).
    following = {s for s, required in upstream(cfg, stage).items() if not required}
    earlier = {
        s: stage_hash(cfg, s) if s in following else done_hash(cfg, s) for s in NAMES[: NAMES.index(stage)]
    }
    earlier = {s: h for s, h in earlier.items() if h is not None}
    return config_hash(section, *extra, _data_hashed(cfg), cfg.tokenizer, cfg.run.seed, ds, earlier)


def check_files(cfg: ExperimentConfig) -> None:
    """Fail before any work when a named file or directory is missing."""
    for paths in (cfg.data.paths, cfg.data.eval_paths):
        if paths:
            resolve_paths(paths)
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


def _is_current(out: Path, params: dict) -> bool:
    """`out` was made from `params` (its params.json says so): nothing to redo."""
    return (out / "params.json").exists() and json.loads((out / "params.json").read_text()) == params


def _tokenizer_params(cfg: ExperimentConfig) -> dict:
    """What the trained tokenizer depends on: its size and the training documents (never the held-out share)."""
    params = {"vocab_size": cfg.tokenizer.vocab_size, "files": [str(f) for f in train_files(cfg)]}
    reading = _new_reading(cfg)
    if not cfg.data.paths:
        reading.pop("text_unit", None)  # it shapes only data.eval_paths then
    return {**params, **reading}


def _prepare_corpus(cfg: ExperimentConfig) -> None:
    if cfg.data.paths:
        return
    out = cfg.run_dir / "data"
    params = to_dict(cfg.data.bios)
    if _is_current(out, params):
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
    say(f"bios corpus: {len(corpus.train)} training biographies of {len(corpus.people)} people -> {out}")


def _prepare_tokenizer(cfg: ExperimentConfig) -> None:
    if not models.trains_tokenizer(cfg):
        return
    out = models.tokenizer_dir(cfg)
    params = _tokenizer_params(cfg)
    if _is_current(out, params):
        return
    t0 = time.perf_counter()
    docs = itertools.islice(iter_documents(train_files(cfg)), cfg.tokenizer.train_sentences)
    try:
        train_tokenizer(docs, cfg.tokenizer.vocab_size, out)
    except ValueError as e:
        raise ConfigError(f"tokenizer.vocab_size: {e}") from None
    atomic_write(out / "params.json", json.dumps(params))  # written last: marks it complete
    say(
        f"tokenizer: SentencePiece BPE, vocab {cfg.tokenizer.vocab_size}, trained in {time.perf_counter() - t0:.1f}s -> {out}"
    )


def resolve_ds_config(cfg: ExperimentConfig, stage: str) -> dict:
    """The stage's DeepSpeed JSON with "auto" filled, validated with DeepSpeed's config class (not written)."""
    train_cfg = getattr(cfg, stage)
    raw, path = ds_resolve.load(train_cfg.ds_config)
    ds = ds_resolve.resolve(
        raw, train_cfg, placement.world_size(cfg, stage), cfg.run_dir / "tb" / stage / "deepspeed", str(path)
    )
    ds_resolve.validate(ds, placement.world_size(cfg, stage), str(path))
    return ds


def prepare_ds_config(cfg: ExperimentConfig, stage: str) -> dict:
    """Resolve the stage's DeepSpeed JSON, validate it with DeepSpeed's config class, write ds/<stage>.json."""
    ds = resolve_ds_config(cfg, stage)
    out = cfg.run_dir / "ds" / f"{stage}.json"
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


def stage_dir(cfg: ExperimentConfig, stage: str) -> Path:
    return cfg.run_dir / spec(stage).out_dir


def ckpt_dir(cfg: ExperimentConfig, stage: str) -> Path:
    """Where the training loop keeps a stage's checkpoints (complete.json names the last complete tag)."""
    return stage_dir(cfg, stage) / "ckpt"


def check_teacher_checkpoint(cfg: ExperimentConfig, stage: str) -> None:
    """Before the ranks of a stage that loads the sharded teacher start (its preflight): a complete teacher
    checkpoint that a job of this stage's world size can load. When training saved its shards on another
    number of ranks (distill.include placed the job on fewer), node 0 converts it to a universal checkpoint
    once; the other nodes' ranks meet node 0's, which start after it, so they neither convert nor check."""
    from stablekd.model.sharded_teacher import checkpoint_source, make_universal  # deepspeed

    if _follower(cfg):
        return
    ckpt, world = ckpt_dir(cfg, "teacher"), placement.world_size(cfg, stage)
    if made := make_universal(ckpt, world):
        say(f"{stage}: the teacher's ZeRO shards are of another world size; made {made} for {world} ranks")
    checkpoint_source(ckpt, world)


def sharded_teacher(cfg: ExperimentConfig):  # -> model.sharded_teacher.ShardedTeacher
    """The run's teacher from its ZeRO-3 shards, partitioned over this job's ranks (call on every rank)."""
    from stablekd.model.sharded_teacher import load_sharded_teacher  # deepspeed: only on ranks

    return load_sharded_teacher(
        ckpt_dir(cfg, "teacher"), cfg.run_dir / "ds" / "teacher.json", models.tokenizer_dir(cfg),
        models.teacher_source(cfg), cfg.data.seq_len, cfg.run.seed,
    )  # fmt: skip


def open_soft_labels(cfg: ExperimentConfig, rank: int, world_size: int, micro_batch_size: int, teacher=None):
    """Soft-label training batches for a consumer stage, offline or online, one interface.

    Both yield decoded batches forever (data_pipeline/encodings.py `decode`: input_ids, loss_mask, and
    topk_ids / topk_logprobs or sample_ids / sample_weights) and save/restore their position
    (state_dict / load_state_dict).
    - Offline (teacher None): the shards of soft_labels/, checked against this run's tokenizer, encoding
      (and its parameters), T and seq_len, in epochs of equal length on every rank
      (data_pipeline/epochs.py); with distill.follow the
      shards are read while the soft_labels stage still writes them (a ShardError naming the shard
      awaited after distill.follow_timeout_s without a new one).
    - Online (`teacher` = `sharded_teacher(cfg)`): the looping training stream labelled in this job with
      the same k and T; every rank runs one teacher forward per batch it draws, all at the same point of
      the loop, so the teacher's ZeRO-3 gathers never meet the student's collectives.
    """
    from stablekd.data_pipeline.encodings import Decoded
    from stablekd.data_pipeline.epochs import EqualEpochs
    from stablekd.data_pipeline.online import OnlineSoftLabels
    from stablekd.data_pipeline.shards import ShardLoader
    from stablekd.data_pipeline.soft_labels import config_meta, encoding_meta, soft_label_reader
    from stablekd.data_pipeline.stream import PackedStream, StreamLoader

    sl, tok_dir, seq_len = cfg.soft_labels, models.tokenizer_dir(cfg), cfg.data.seq_len
    if teacher is not None:
        stream = PackedStream(
            train_files(cfg), tok_dir, seq_len, micro_batch_size, rank, world_size, cfg.data.num_workers,
            loop=True,
        )  # fmt: skip
        meta = config_meta(sl, teacher.checkpoint_id, tokenizer_hash(tok_dir), teacher.vocab_size, seq_len)
        return OnlineSoftLabels(StreamLoader(stream), teacher, meta)
    meta = encoding_meta(sl, seq_len)
    out = stage_dir(cfg, "soft_labels")
    reader = soft_label_reader(
        out, {"tokenizer_hash": tokenizer_hash(tok_dir), **meta}, rank, world_size, cfg.data.num_workers,
        follow=cfg.distill.follow, timeout_s=min(cfg.distill.follow_timeout_s, cfg.launch.timeout_s),
    )  # fmt: skip
    return Decoded(EqualEpochs(ShardLoader(reader, micro_batch_size), str(out)), meta)


def done_path(cfg: ExperimentConfig, stage: str) -> Path:
    return stage_dir(cfg, stage) / "DONE.json"


def done_hash(cfg: ExperimentConfig, stage: str) -> str | None:
    """The config hash in a stage's DONE.json; None when it has none (not finished, or unreadable)."""
    try:
        return json.loads(done_path(cfg, stage).read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):  # missing, not JSON / not UTF-8, not a mapping
        return None


def is_done(cfg: ExperimentConfig, stage: str, ds: dict | None = None) -> bool:
    """DONE.json matches the current config (`ds`: see stage_hash); a training stage that finished with
    another config is a ConfigError (its checkpoints would mix), an in-process one just runs again."""
    path = done_path(cfg, stage)
    if not path.exists():
        return False
    done, now = done_hash(cfg, stage), stage_hash(cfg, stage, ds)
    if done != now:
        if not spec(
            stage
        ).on_ranks:  # no checkpoint to mix up: cheap to redo (e.g. evaluate after a new model)
            say(f"{stage}: inputs or config changed since {path}, running it again")
            return False
        raise ConfigError(
            f"{path}: stage {stage} finished with another config (hash {done}, now {now}); use a new "
            f"run.out_dir, or delete {path.parent} to redo it"
        )
    return True


def upstream(cfg: ExperimentConfig, stage: str) -> dict[str, bool]:
    """The earlier stages `stage` reads (registry `needs` and `uses`) -> whether each must be finished.

    A `uses` stage counts only once its directory exists. distill.online reads the teacher instead of
    soft_labels/; distill.follow reads soft_labels/ while it is still written (required only to match
    when it has finished)."""
    row = spec(stage)
    needs = {s: True for s in row.needs}
    needs |= {s: True for s in row.uses if stage_dir(cfg, s).is_dir()}
    if stage == "distill" and cfg.distill.online:
        needs = {"teacher": True}
    elif stage == "distill" and cfg.distill.follow:
        needs["soft_labels"] = False
    return needs


def check_upstream(cfg: ExperimentConfig, stage: str) -> None:
    """In the launching process, before any rank starts: every stage `stage` reads has finished with the
    config it would have now (its DONE.json carries `stage_hash`), as the driver judges a stage done. A
    checkpoint alone is not enough: a stage killed (or still running) after its last checkpoint has no
    DONE.json. A ConfigError names the DONE.json and the command that finishes that stage."""
    finish = f"`stablekd stage {{s}} CONFIG run.out_dir={cfg.run_dir}`"
    for s, required in upstream(cfg, stage).items():
        path = done_path(cfg, s)
        if not path.exists():
            if not required:
                continue
            raise ConfigError(
                f"{stage}: {path} missing: stage {s} has not finished (killed, still running or never "
                f"started); run {finish.format(s=s)} to finish it"
            )
        done, now = done_hash(cfg, s), stage_hash(cfg, s)
        if done != now:
            raise ConfigError(
                f"{stage}: {path} has config hash {done}, but stage {s} would have {now} with this config "
                f"(its section, data, tokenizer, seed, DeepSpeed JSON or an earlier stage changed): use the "
                f"config it finished with, or redo {s} in a new run.out_dir"
            )


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


def finish_training(
    cfg: ExperimentConfig,
    stage: str,
    result: engine.TrainResult,
    lm: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ds: dict,
    produced: dict,
    inputs: dict,
) -> None:
    """The end every training stage shares, on every rank: the Hugging Face export of `lm` with its
    tokenizer (`<stage dir>/hf`, when the section's export_hf), then DONE.json on rank 0 with the loop's
    figures (checkpoint, steps, tokens, held-out eval loss, parameters) plus the stage's own `produced`."""
    import torch.distributed as dist

    from stablekd.model.build import count_params, export_hf

    out = stage_dir(cfg, stage)
    done = {
        "checkpoint": str(out / "ckpt" / result.checkpoint_tag),
        "zero_stage": ds_resolve.zero_stage(ds),
        "world_size": dist.get_world_size(),
        "steps": result.steps,
        "tokens": result.tokens,
        "eval_loss": result.eval_loss,  # held-out next-token cross-entropy
        "params": count_params(lm),
        **produced,
    }
    if getattr(cfg, stage).export_hf:
        export_hf(lm, tokenizer, out / "hf", ds_resolve.zero_stage(ds) == 3)
        done["hf"] = str(out / "hf")
    if dist.get_rank() == 0:
        write_done(cfg, stage, done, inputs)
    dist.barrier()


def _run_hash(cfg: ExperimentConfig) -> str:
    """The config every node must share: all but `launch` (node_rank differs per node)."""
    return config_hash({k: v for k, v in to_dict(cfg).items() if k != "launch"})


def _wait_for(path: Path, what: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise ConfigError(
                f"waited {timeout_s:.0f}s (launch.timeout_s) for {what} ({path} missing): is node 0 running?"
            )
        time.sleep(0.5)


def _follower(cfg: ExperimentConfig) -> bool:
    """With launch.no_ssh every node runs the command; node 0 prepares and runs in-process stages."""
    return cfg.launch.no_ssh and cfg.launch.node_rank > 0


def _in_process(cfg: ExperimentConfig, stage: str) -> bool:
    """The stage runs in the launching process: not on ranks, and not an in-process stage whose
    `needs_ranks(cfg)` says True (evaluate of a teacher in ZeRO-3 shards starts ranks too)."""
    module = importlib.import_module(spec(stage).module)
    return not spec(stage).on_ranks and not (hasattr(module, "needs_ranks") and module.needs_ranks(cfg))


def run(cfg: ExperimentConfig, stages: list[str], verbose: bool = False) -> None:
    """Prepare, then launch each stage not already done (DeepSpeed runner, one job per stage).

    `verbose`: every line of DeepSpeed, PyTorch and the ranks on the terminal; else those go only to
    logs/<stage>.log (this process's own to logs/pipeline.log) and the terminal gets our own lines and
    the progress bar (launch.ConsoleFilter).
    """
    from stablekd.launcher.launch import driver_log

    with driver_log(cfg, "pipeline", verbose):
        _run(cfg, stages, verbose)


def _groups(cfg: ExperimentConfig, stages: list[str]) -> list[list[str]]:
    """The stages in the jobs that start together: each alone, but distill beside soft_labels when
    distill.include and distill.follow place it on slots of its own (launcher/placement.py)."""
    together = placement.concurrent(cfg) and {"soft_labels", "distill"} <= set(stages)
    return [
        ["soft_labels", "distill"] if together and s == "soft_labels" else [s]
        for s in stages
        if not (together and s == "distill")
    ]


def _run(cfg: ExperimentConfig, stages: list[str], verbose: bool) -> None:
    from stablekd.launcher import data_order
    from stablekd.launcher.launch import driver_log, run_stages

    # With launch.no_ssh every node runs this command; node 0 prepares, the others wait for it
    # (the run directory is on a filesystem every node sees) and never run in-process stages.
    follower = _follower(cfg)
    if follower:
        nodes.follow(cfg, _run_hash(cfg))  # node 0 has prepared this launch, with this config
    else:
        for stage in stages:  # before anything is written: a resume on other data is refused
            if spec(stage).on_ranks:
                data_order.check(cfg, stage)
        prepare(cfg, stages)
        if cfg.launch.no_ssh:
            nodes.lead(cfg, _run_hash(cfg))  # the other nodes read the run directory from here on

    def ready(stage: str) -> bool:
        """The checks of a stage that must run, before any job of its group starts; False: skipped."""
        if follower and _in_process(cfg, stage):
            return False
        if is_done(cfg, stage):
            say(f"{stage}: done already ({done_path(cfg, stage)}), skipped")
            return False
        check_upstream(cfg, stage)  # what it reads finished with this config (DONE.json), before any rank
        module = importlib.import_module(spec(stage).module)
        if hasattr(module, "preflight"):
            module.preflight(cfg)  # what the previous stage left, checked before any rank starts
        return True

    for group in _groups(cfg, stages):
        todo = [stage for stage in group if ready(stage)]
        if not todo:
            continue
        for stage in todo:
            if spec(stage).on_ranks and not follower:
                data_order.record(cfg, stage)  # what it starts on, for the check of a later resume
            marker = read_marker(ckpt_dir(cfg, stage))
            where = f" on {placement.include_arg(placed)}" if (placed := placement.slots(cfg, stage)) else ""
            say(f"[{stage}] started{where}" + (f", resuming from step {marker['step']}" if marker else ""))
        t0 = time.perf_counter()
        if _in_process(cfg, todo[0]):
            with driver_log(cfg, todo[0], verbose):
                importlib.import_module(spec(todo[0]).module).run(cfg)
            walls = {todo[0]: time.perf_counter() - t0}
        else:
            walls = run_stages(cfg, todo, verbose)
        for stage in todo:
            if follower:  # global rank 0, on node 0, writes DONE.json after this node's ranks may have exited
                _wait_for(done_path(cfg, stage), f"node 0 to finish stage {stage}", cfg.launch.timeout_s)
            if not done_path(cfg, stage).exists():
                raise RuntimeError(f"stage {stage} exited without writing {done_path(cfg, stage)}")
            done = json.loads(done_path(cfg, stage).read_text())
            say(
                f"[{stage}] done in {wall(walls[stage])}: "
                f"{headline(stage, done, stage_dir(cfg, stage))} -> {stage_dir(cfg, stage)}"
            )


def dry_run(cfg: ExperimentConfig, stages: list[str]) -> list[str]:
    """What `run` would do with the run directory as it stands: a `#` line per step and each job's command
    as one shell line (its environment, then the runner's argument list, shell-quoted).

    Starts nothing and writes nothing: the DeepSpeed JSONs are resolved and checked in memory. Stages are
    judged as the directory is now; one after a stage that would run may be judged again once it has.
    """
    from stablekd.launcher.launch import diverted

    with diverted(sys.stderr, python_warnings=False):  # stdout: only the plan
        return _dry_run(cfg, stages)


def _dry_run(cfg: ExperimentConfig, stages: list[str]) -> list[str]:
    from stablekd.launcher import data_order
    from stablekd.launcher.launch import display_command

    check_files(cfg)
    lines = [f"# stablekd dry run of {cfg.run_dir}: nothing is started or written"]
    follower = _follower(cfg)
    if follower:
        lines.append(
            f"# node {cfg.launch.node_rank}: wait for node 0 to prepare {cfg.run_dir} (handshake on master_port + 1)"
        )
    else:
        todo = ["config.yaml"]
        if not cfg.data.paths and not _is_current(cfg.run_dir / "data", to_dict(cfg.data.bios)):
            todo.append("data/ (bios corpus)")
        if models.trains_tokenizer(cfg) and not _is_current(
            models.tokenizer_dir(cfg), _tokenizer_params(cfg)
        ):
            todo.append("tokenizer/ (SentencePiece)")
        todo += [f"ds/{s}.json" for s in stages if spec(s).trains]
        lines.append(f"# prepare {cfg.run_dir}: " + ", ".join(todo))
    ds = {s: resolve_ds_config(cfg, s) for s in stages if spec(s).trains}
    for stage in stages:
        in_process = _in_process(cfg, stage)
        if follower and in_process:
            lines.append(f"# {stage}: runs on node 0 only")
            continue
        if is_done(cfg, stage, ds.get(stage)):
            lines.append(f"# {stage}: done already ({done_path(cfg, stage)}), would be skipped")
            continue
        if spec(stage).on_ranks:
            data_order.check(cfg, stage)
        marker = read_marker(ckpt_dir(cfg, stage))
        resume = f", resuming from step {marker['step']}" if marker else ""
        if in_process:
            lines.append(f"# {stage}: would run in this process{resume} (no command)")
        else:
            placed = placement.slots(cfg, stage)
            where = f" ({placement.include_arg(placed)})" if placed else ""
            group = next(g for g in _groups(cfg, stages) if stage in g)
            beside = "".join(
                f", beside {other} (distill.follow)"
                for other in group
                if other != stage and not is_done(cfg, other, ds.get(other))
            )
            lines.append(
                f"# {stage}: would run on {placement.world_size(cfg, stage)} ranks{where}{beside}{resume}"
            )
            lines.append(display_command(cfg, stage))
    return lines
