"""The checks every config dataclass uses in ``__post_init__``: each error names the key and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value!r} must be a probability in [0, 1]")
