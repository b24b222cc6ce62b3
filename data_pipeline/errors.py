"""Errors that mean bad input the user must fix: the message names the key, file or line and what was
expected. The CLI prints either as one line and exits 2; ranks record it as their failure. They live here,
in the lowest package, so every component can raise them without importing the launcher."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad experiment config, DeepSpeed JSON, model or checkpoint directory."""


class DataError(ValueError):
    """A corpus or stream problem; the message names the path (and line) and what was expected."""
