"""How a config field is declared (a default and its `help`, which `stablekd keys` prints) and the checks
sections run in `__post_init__` (each error names the key, what was expected and what was given)."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any

from stablekd.data_pipeline.errors import ConfigError
from stablekd.model.presets import PRESETS


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def _at_least(section: Any, low: int, *keys: str) -> None:
    """Each of `keys` (int fields of `section`) is >= low; the error names the key, the bound and the value."""
    for key in keys:
        if getattr(section, key) < low:
            raise ConfigError(f"{key}: expected an integer >= {low}, got {getattr(section, key)}")


def _probability(section: Any, *keys: str) -> None:
    """Each of `keys` is a probability mass threshold in (0, 1] (top_p: 1 = no nucleus cut)."""
    for key in keys:
        if not 0.0 < getattr(section, key) <= 1.0:
            raise ConfigError(f"{key}: expected a value in (0, 1], got {getattr(section, key)}")


def _positive(section: Any, *keys: str) -> None:
    """Each of `keys` (temperatures, rates) is > 0."""
    for key in keys:
        if not getattr(section, key) > 0:
            raise ConfigError(f"{key}: expected a value > 0, got {getattr(section, key)}")


def _model(key: str, name: str) -> None:
    """A model name is a preset (model/presets.py) or a local Hugging Face model directory."""
    if name not in PRESETS and not Path(name).is_dir():
        raise ConfigError(
            f"{key}: {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model directory"
        )
