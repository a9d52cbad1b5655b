"""What every config shares: frozen dataclasses built from plain mappings that reject unknown keys.

Configs are frozen dataclasses. ``from_dict`` rejects unknown keys and every value is checked in
``__post_init__``, so an impossible setting fails where it is written, not deep inside a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from legonet.errors import ConfigError


def from_dict(cls, data: dict[str, Any], where: str):
    """``cls(**data)`` after checking that ``data`` is a mapping whose keys are all fields of ``cls``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


def check_bool(where: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} {key} must be true or false, got {value!r}")


def check_choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where} {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_int(where: str, key: str, value: Any, lo: int = 1, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{where} {key} must be an integer {bound}, got {value!r}")


def check_number(where: str, key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{where} {key} must be a number in {interval}, got {value!r}")
