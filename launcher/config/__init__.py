"""The experiment schema: typed dataclasses, one YAML of values, dotted `key=value` overrides.

Sections: config/sections.py (run, launch, data, tokenizer, the TrainConfig every training stage has),
config/stages.py (one per stage), config/fields.py (how a field is declared and checked); here the
whole experiment, loading, saving, hashing and `describe`.

Each field's `help` is its documentation (`stablekd keys` prints them). Unknown keys, wrong types and
missing files are `ConfigError`s naming the key and the file; the CLI turns them into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stablekd.data_pipeline import encodings
from stablekd.data_pipeline.errors import ConfigError
from stablekd.data_pipeline.files import atomic_write
from stablekd.launcher.config.fields import _sub
from stablekd.launcher.config.sections import (
    BiosConfig,
    DataConfig,
    LaunchConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
)
from stablekd.launcher.config.stages import (
    ContrastiveConfig,
    DistillConfig,
    EvaluateConfig,
    SoftLabelsConfig,
    StudentConfig,
    TeacherConfig,
)

__all__ = [  # the schema's names, importable from here (the sections live in the modules above)
    "BiosConfig", "ConfigError", "ContrastiveConfig", "DataConfig", "DistillConfig", "EvaluateConfig",
    "ExperimentConfig", "LaunchConfig", "RunConfig", "SoftLabelsConfig", "StudentConfig", "TeacherConfig",
    "TokenizerConfig", "TrainConfig", "HASH_SCHEMA", "changed", "config_hash", "describe", "load_config",
    "save_config", "to_dict",
]  # fmt: skip


@dataclass
class ExperimentConfig:
    run: RunConfig = _sub(RunConfig, "run name, directory and seed")
    launch: LaunchConfig = _sub(LaunchConfig, "how ranks are started")
    data: DataConfig = _sub(DataConfig, "training text")
    tokenizer: TokenizerConfig = _sub(TokenizerConfig, "tokenizer")
    teacher: TeacherConfig = _sub(TeacherConfig, "teacher training stage")
    soft_labels: SoftLabelsConfig = _sub(
        SoftLabelsConfig, "soft-label and candidate generation from the sharded teacher"
    )
    student: StudentConfig = _sub(StudentConfig, "the student model distillation trains")
    distill: DistillConfig = _sub(DistillConfig, "student distillation from the soft labels")
    contrastive: ContrastiveConfig = _sub(
        ContrastiveConfig, "contrastive fine-tuning of the distilled student"
    )
    evaluate: EvaluateConfig = _sub(EvaluateConfig, "stability evaluation and report")

    def __post_init__(self) -> None:
        # With a tokenizer trained here its size is known now (an existing one is checked by the stage).
        trained = not (self.tokenizer.path or self.teacher.init_from or Path(self.teacher.model).is_dir())
        if trained and self.soft_labels.k > self.tokenizer.vocab_size:
            raise ConfigError(
                f"soft_labels.k: expected at most tokenizer.vocab_size ({self.tokenizer.vocab_size}) ids per "
                f"token, got {self.soft_labels.k}"
            )
        d = self.distill
        kinds = encodings.get(self.soft_labels.encoding).kinds
        if kinds is not None and d.kind not in kinds and d.on_policy < 1:
            others = [
                name for name, enc in encodings.REGISTRY.items() if enc.kinds is None or d.kind in enc.kinds
            ]
            raise ConfigError(
                f"distill.kind: {self.soft_labels.encoding} soft labels support kind {', '.join(kinds)} only, "
                f"got {d.kind!r}; use soft_labels.encoding {' or '.join(others)} for it (on-policy "
                "micro-batches take theirs from distill.on_policy_kind)"
            )
        if d.on_policy and d.on_policy_prompts == "tasks" and not self.data.paths:
            raise ConfigError(
                "distill.on_policy_prompts: tasks draws the prompts of data.paths' task records; the bios "
                "corpus (no data.paths) has none: use records"
            )
        if self.contrastive.own_samples and d.cross_tokenizer != "off":
            raise ConfigError(
                "contrastive.own_samples with distill.cross_tokenizer: groups are labelled in the teacher's "
                "ids and the student samples in its own (set own_samples=0 or cross_tokenizer=off)"
            )
        if d.on_policy and d.on_policy_prompt_tokens + d.on_policy_new_tokens > self.data.seq_len:
            raise ConfigError(
                f"distill.on_policy_prompt_tokens + on_policy_new_tokens = "
                f"{d.on_policy_prompt_tokens + d.on_policy_new_tokens}: expected at most data.seq_len "
                f"({self.data.seq_len}), the student's positions"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.run.name}")


# --- loading -------------------------------------------------------------------------------------


# A decimal number as users write it in YAML or key=value: 3e-4, 1E5, -2.5e+3, .5, 10.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, a string for a list of strings."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (float, int) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # PyYAML (YAML 1.1) reads 3e-4 and 1e5 as strings (it wants a dot: 3.0e-4): take them as users mean
        # them. An int key takes one only when it is a whole number (1e5, not 1.5e0).
        number = float(value)
        if tp is float:
            return number
        if number.is_integer():
            return int(number)
        raise ConfigError(f"{source}: {key}: expected int, got {value!r} (not a whole number)")
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(
                f"{source}: unknown key '{key}' (known under '{prefix or 'top level'}': {', '.join(names)})"
            )
        kwargs[k] = _coerce(v, hints[k], key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {prefix + '.' if prefix else ''}{e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (None = all defaults) and apply `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist (expected a YAML experiment file, e.g. configs/quickstart.yaml)"
            )
        try:
            tree = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); expected a UTF-8 "
                "YAML experiment file"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"{p}: expected a mapping of sections (run, data, teacher, ...), got {type(tree).__name__}"
            )
    written = dict(tree.get("data") or {}) if isinstance(tree.get("data"), dict) else {}
    named = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. teacher.max_steps=200")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
        named.add(key.strip())
        source = f"{source} + overrides" if "overrides" not in source else source
    _check_heldout_follows_paths(written, tree.get("data"), named, source)
    return _build(ExperimentConfig, tree, "", source)


def _check_heldout_follows_paths(written: dict, data: Any, named: set[str], source: str) -> None:
    """A config file's data.eval_paths are the held-out text of *its* data.paths (configs/corpus.yaml:
    Genesis questions): a command line that replaces data.paths and not data.eval_paths would evaluate the
    user's corpus on that other corpus's held-out files. Refused, naming both keys; the user names their
    held-out files, or `data.eval_paths=[]` for a share of their own documents (data.eval_fraction)."""
    if not (written.get("eval_paths") and isinstance(data, dict)) or named & {"data", "data.eval_paths"}:
        return
    if data.get("paths") != written.get("paths"):
        raise ConfigError(
            f"{source}: data.paths overridden, but data.eval_paths still names the held-out files the config "
            f"file gives for its own corpus ({', '.join(map(str, written['eval_paths']))}): give yours too, "
            "'data.eval_paths=[held/]', or 'data.eval_paths=[]' to hold out a share of data.paths "
            "(data.eval_fraction)"
        )


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))  # ranks and other nodes read it


def config_hash(*parts: Any) -> str:
    """Stable hash of config sections (dataclasses or plain data); DONE.json and checkpoints record it."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed(section: Any) -> dict:
    """The fields of a config section (a dataclass) whose values differ from their defaults, nested sections
    likewise (left out when nothing in them changed). What a stage's hash covers: a key that a new version
    of stablekd adds with a default leaves every hash as it was, so run directories made before it resume.
    A default whose meaning changes must bump HASH_SCHEMA instead."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            if sub := changed(value):
                out[f.name] = sub
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value != default:
            out[f.name] = value
    return out


# Part of every stage hash; bump it when a default changes what a run computes (module docstring of done.py).
HASH_SCHEMA = 2


def keys(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, help) of every leaf field: what `stablekd keys` prints and
    docs/configuration.md tabulates."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += keys(hints[f.name], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(
            (key, getattr(hints[f.name], "__name__", str(hints[f.name])), default, f.metadata.get("help", ""))
        )
    return out


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """`key (type, default): help` lines for every field, for `stablekd keys`."""
    return [f"{key} ({tp}, default {default!r}): {about}" for key, tp, default, about in keys(cls, prefix)]
