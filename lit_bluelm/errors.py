"""The one user-error type and the small validation helpers every config section uses.

Kept free of imports from the rest of the package, so config sections that live beside their
objective (``objectives/*``) can raise it without import cycles.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A user or config error: printed as one line, exit code 2, no traceback."""


class RunError(RuntimeError):
    """A run failed for a cause it can name (a checkpoint that could not be written): printed
    as one line, exit code 1 (``status=failed``), no traceback."""


def choice(cfg: Any, key: str, valid: Sequence[str]) -> None:
    """``cfg.<key>`` must be one of ``valid``."""
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        raise ConfigError(f"{key}: unknown '{value}'; valid: {', '.join(valid)}")


def at_least(cfg: Any, key: str, low: float, allow_none: bool = False) -> None:
    """``cfg.<key>`` must be a finite number >= ``low`` (or null when ``allow_none``)."""
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < low:
        suffix = " (or null)" if allow_none else ""
        raise ConfigError(f"{key} must be >= {low}{suffix}, got {value}")


def in_range(cfg: Any, key: str, low: float, high: float) -> None:
    value = OmegaConf.select(cfg, key)
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{key} must be in [{low}, {high}], got {value}")
