"""Name -> implementation lookups for the plain-dict registries (no import paths in YAML)."""

from __future__ import annotations

from typing import Mapping, TypeVar

from lit_bluelm.errors import ConfigError

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, key: str) -> T:
    """``registry[name]``, or a :class:`ConfigError` naming the config key and the valid names."""
    try:
        return registry[name]
    except KeyError:
        valid = ", ".join(sorted(registry))
        raise ConfigError(f"{key}: unknown '{name}'; valid: {valid}") from None
