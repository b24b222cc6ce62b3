"""What a run's models and tokenizer are built from, and the checks that they fit together.

One key per model: `teacher.model` / `student.model` is a preset or a local Hugging Face
directory of any causal-LM architecture. A directory that holds its own tokenizer (`tokenizer.json` or
`tokenizer.model`) brings it: the teacher's is then the run's tokenizer (unless `tokenizer.path` names
another) and no SentencePiece is trained. `teacher.init_from` continues a previous stablekd run: its
tokenizer, its model source and its ZeRO checkpoint.

Vocabulary rule (objectives/kd.py states it for the losses): the run's ids are 0 .. len(tokenizer) − 1.
A model may have more embedding rows (released checkpoints pad: Qwen2.5-7B has 152,064 rows for a
tokenizer of 151,665); those rows are never stored, compared or counted. Two models can learn from each
other when their tokenizers are the same by content (`data_pipeline.tokenizer.tokenizer_hash`), whatever their
row counts.

Used by the driver (preparation, dry run, preflight) and the ranks; imports no stage and not the driver.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.tokenizer import own_tokenizer, tokenizer_hash
from stablekd.launcher.config import ConfigError, ExperimentConfig, load_config
from stablekd.launcher.stages import MODELS, model_stage, spec


def previous_run(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """The config of the teacher run teacher.init_from names (a run directory: it has config.yaml), else None."""
    src = cfg.teacher.init_from
    if not (src and (Path(src) / "config.yaml").is_file()):
        return None
    return _run_config(str((Path(src) / "config.yaml").resolve()))


@functools.cache
def _run_config(path: str) -> ExperimentConfig:
    # Parsed once per process: tokenizer_dir() and teacher_source() ask on every call, and a finished
    # run's config.yaml does not change under a run that starts from it.
    return load_config(path)


def tokenizer_dir(cfg: ExperimentConfig) -> Path:
    """The run's tokenizer: tokenizer.path; else the one the teacher learned with (a previous run's for
    teacher.init_from, the teacher directory's own for teacher.model): a model continues with the ids it
    learned; else the SentencePiece tokenizer this run trains (<run>/tokenizer)."""
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    if (prev := previous_run(cfg)) is not None:
        return Path(cfg.teacher.init_from) / "tokenizer" if trains_tokenizer(prev) else tokenizer_dir(prev)
    return own_tokenizer(cfg.teacher.model) or cfg.run_dir / "tokenizer"


def trains_tokenizer(cfg: ExperimentConfig) -> bool:
    """Whether the run trains its own SentencePiece tokenizer (no tokenizer.path, nothing to inherit)."""
    return tokenizer_dir(cfg) == cfg.run_dir / "tokenizer"


def teacher_source(cfg: ExperimentConfig) -> str:
    """What the teacher is built from (a preset's shapes, or a Hugging Face directory's shapes and weights):
    for teacher.init_from, what that run built its teacher from (its weights then come from its ZeRO
    checkpoint, `teacher_init_checkpoint`); else teacher.model."""
    if (prev := previous_run(cfg)) is not None:
        return teacher_source(prev)
    return cfg.teacher.model


def teacher_init_checkpoint(cfg: ExperimentConfig) -> Path | None:
    """The ZeRO checkpoint directory of the previous teacher run teacher.init_from names, else None."""
    if previous_run(cfg) is None:
        return None
    return Path(cfg.teacher.init_from) / spec("teacher").ckpt_dir


def meta_model(cfg: ExperimentConfig, stage: str):  # -> (name, torch.nn.Module on the meta device)
    """The model a training stage trains, built on the meta device (shapes only, no memory): the teacher
    (a teacher continued from a run has that run's shapes) or, for later stages, the student (the
    contrastive stage's contrastive.init_from when set)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stablekd.data_pipeline.tokenizer import load_tokenizer
    from stablekd.model.build import model_config

    name = teacher_source(cfg) if stage == "teacher" else cfg.student.model
    if stage == "contrastive" and cfg.contrastive.init_from:
        name = cfg.contrastive.init_from  # the student it starts from, whatever student.model says
    tok_dir = tokenizer_dir(cfg)
    vocab = len(load_tokenizer(tok_dir)) if tok_dir.is_dir() else cfg.tokenizer.vocab_size

    class _Vocab:  # the model's shape needs only the vocabulary size and special ids
        pad_token_id, bos_token_id, eos_token_id = 0, 2, 3

        def __len__(self) -> int:
            return vocab

    mcfg = (
        AutoConfig.from_pretrained(name)
        if Path(name).is_dir()
        else model_config(name, _Vocab(), cfg.data.seq_len)
    )
    with torch.device("meta"):
        return name, AutoModelForCausalLM.from_config(mcfg)


def describe_tokenizer(path: Path) -> str:
    """`path (N tokens, hash 0123abcd)` for messages that compare tokenizers."""
    from stablekd.data_pipeline.tokenizer import load_tokenizer  # transformers: only on this error path

    return f"{path} ({len(load_tokenizer(path))} tokens, hash {tokenizer_hash(path)[:12]})"


def check_models(cfg: ExperimentConfig) -> None:
    """Before any work: teacher.init_from is a previous run, and a student directory that brings its own
    tokenizer brings the run's (by content). Row counts are checked where the models are built."""
    if src := cfg.teacher.init_from:
        if not Path(src).is_dir():
            raise ConfigError(
                f"teacher.init_from: {src} is not a directory (expected a teacher run directory: config.yaml, "
                "teacher/ckpt/)"
            )
        if previous_run(cfg) is None:
            if (Path(src) / "config.json").is_file():
                raise ConfigError(
                    f"teacher.init_from: {src} is a Hugging Face model directory, not a stablekd run: set "
                    f"teacher.model={src} (its weights and its tokenizer); teacher.init_from continues a run"
                )
            raise ConfigError(
                f"teacher.init_from: {src} has no config.yaml (expected a teacher run directory: config.yaml, "
                "teacher/ckpt/)"
            )
        if read_marker(teacher_init_checkpoint(cfg)) is None:
            raise ConfigError(f"teacher.init_from: {teacher_init_checkpoint(cfg)} has no complete checkpoint")
    teacher = Path(cfg.teacher.model)
    if not cfg.teacher.init_from and teacher.is_dir():
        own = own_tokenizer(teacher)
        if own is None and not cfg.tokenizer.path:
            raise ConfigError(
                f"teacher.model {teacher}: no tokenizer.json or tokenizer.model in it; its embeddings belong "
                "to the tokenizer it was trained with: save that one there "
                "(AutoTokenizer.from_pretrained(<its source>).save_pretrained(dir) writes tokenizer.json, also "
                "from vocab.json + merges.txt) or name it in tokenizer.path"
            )
        if (
            own is not None
            and cfg.tokenizer.path
            and tokenizer_hash(own) != tokenizer_hash(cfg.tokenizer.path)
        ):
            raise ConfigError(
                f"tokenizer.path: {describe_tokenizer(Path(cfg.tokenizer.path))} is not the tokenizer of "
                f"teacher.model {describe_tokenizer(own)}, whose embeddings are indexed by its ids"
            )
    if previous_run(cfg) is not None and not tokenizer_dir(cfg).is_dir():
        raise ConfigError(
            f"teacher.init_from: {cfg.teacher.init_from} trained with the tokenizer {tokenizer_dir(cfg)}, which "
            "is gone (a teacher.model directory moved?)"
        )
    student = own_tokenizer(cfg.student.model)
    if student is None:
        return  # a preset, or a directory without a tokenizer: it is built with the run's
    if cross_tokenizer(cfg):
        return  # the student keeps its own tokenizer and learns across (data_pipeline/align.py)
    run_tok = tokenizer_dir(cfg)
    across = "set distill.cross_tokenizer=hybrid (or uld) to distil across tokenizers"
    # A student exported by this run (the SentencePiece tokenizer it trained, beside it) is the run's.
    trained = run_tok.is_dir() and tokenizer_hash(student) == tokenizer_hash(run_tok)
    if trains_tokenizer(cfg) and not trained:
        raise ConfigError(
            f"student.model {cfg.student.model} brings its own tokenizer but this run trains a SentencePiece "
            "one for a preset teacher: give the teacher a model directory with that tokenizer "
            f"(teacher.model), name it in tokenizer.path, or {across}"
        )
    if tokenizer_hash(student) != tokenizer_hash(run_tok):
        raise ConfigError(
            f"student.model: its tokenizer {describe_tokenizer(student)} is not the run's tokenizer "
            f"{describe_tokenizer(run_tok)}: with distill.cross_tokenizer=off a student learns from the soft "
            "labels with the teacher's tokenizer (the same tokenizer with another padded vocabulary size is "
            f"fine); {across}"
        )


def student_tokenizer_dir(cfg: ExperimentConfig) -> Path:
    """The student's tokenizer: its own (student.model's directory) when distilling across tokenizers
    (distill.cross_tokenizer), else the run's."""
    if cross_tokenizer(cfg):
        own = own_tokenizer(cfg.student.model)
        if own is not None:
            return own
    return tokenizer_dir(cfg)


def cross_tokenizer(cfg: ExperimentConfig) -> bool:
    """Whether the student reads the soft labels through the cross-tokenizer path."""
    return cfg.distill.cross_tokenizer != "off"


def find_models(run_dir: Path) -> dict[str, Path]:
    """name -> <run>/<name>/hf for each model exported there, or <run>/teacher/ckpt for a teacher with a
    complete ZeRO-3 checkpoint and no export; a ConfigError when none can be evaluated."""
    found: dict[str, Path] = {}
    for name in MODELS:  # the report's column order
        hf, ckpt = run_dir / model_stage(name).out_dir / "hf", run_dir / model_stage(name).ckpt_dir
        if (hf / "config.json").is_file():
            found[name] = hf
        elif name == "teacher" and (ckpt / "complete.json").is_file():
            found[name] = ckpt  # evaluated from its ZeRO-3 shards, on the teacher's ranks
        elif ckpt.is_dir():
            # A sharded-only model would silently drop out of the report (and the teacher is the
            # default coherence encoder): stop and say how to get the export.
            what = "no complete.json (no complete checkpoint)" if name == "teacher" else "exists"
            raise ConfigError(
                f"evaluate: {name}/hf missing ({hf}) and {ckpt} {what}: rerun the {name} with "
                f"{name}.export_hf=true (evaluate loads Hugging Face directories, and ZeRO-3 shards only "
                "for a teacher whose checkpoint is complete)"
            )
    if not found:
        paths = ", ".join(str(run_dir / model_stage(n).out_dir / "hf") for n in MODELS)
        raise ConfigError(
            f"evaluate: no model to evaluate: none of {paths} exists (run the teacher stage first)"
        )
    return found


def encoder_dir(src: str) -> Path:
    """A local HF model directory, or a sentence-transformers one (its Transformer module's folder)."""
    root = Path(src)
    if not root.is_dir():
        raise ConfigError(
            f"evaluate.coherence_encoder: {src} is not a directory (expected a local Hugging Face or "
            "sentence-transformers model directory; empty = the teacher)"
        )
    if not (root / "config.json").is_file() and (root / "modules.json").is_file():
        for module in json.loads((root / "modules.json").read_text()):
            if module.get("type", "").endswith("Transformer"):
                root = root / module.get("path", "")
    if not (root / "config.json").is_file():
        raise ConfigError(f"evaluate.coherence_encoder: {src} holds no config.json (not a model directory)")
    return root
