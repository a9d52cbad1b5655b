"""Recipes: every setting of ``legonet compress`` beyond its few flags, in one TOML file.

``legonet recipe`` prints the defaults; edit a copy and pass it with ``--recipe FILE.toml``.
Sections: ``[lego]`` (a :class:`~legonet.config.LegoConfig`, used without ``--target-ratio``),
``[target]`` (a :class:`~legonet.config.TargetConfig`, with ``--target-ratio``; its
``[target.layer_fit]`` and ``[target.refine]`` tables, or ``layer_fit = false`` / ``refine = false``
to skip the step) and ``[calib]`` (how many calibration images are read). Every key is validated
and an unknown key is an error naming it; keys left out keep their defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from legonet.config import LegoConfig, TargetConfig
from legonet.config.base import check_int
from legonet.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_SECTIONS = ("lego", "target", "calib")


@dataclass(frozen=True)
class CalibSettings:
    """How the command line reads calibration images (``[calib]``).

    Attributes:
        images: how many images to calibrate on (a seeded random subset when the folder or npz has
            more; all of them when it has fewer).
        workers: threads decoding photos (0: in the main thread).
    """

    images: int = 1024
    workers: int = 0

    def __post_init__(self) -> None:
        check_int("calib", "images", self.images)
        check_int("calib", "workers", self.workers, lo=0, hi=64)


@dataclass(frozen=True)
class Recipe:
    """Every setting of a ``legonet compress`` run."""

    lego: LegoConfig = field(default_factory=LegoConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    calib: CalibSettings = field(default_factory=CalibSettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        """Build from a parsed recipe; unknown sections or keys are errors naming ``source``."""
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(_SECTIONS)}")
        for name in _SECTIONS:
            if name in data and not isinstance(data[name], dict):
                raise ConfigError(f"{source}: [{name}] must be a table of settings")
        try:
            calib = data.get("calib", {})
            bad = sorted(set(calib) - {f.name for f in dataclasses.fields(CalibSettings)})
            if bad:
                raise ConfigError(f"unknown calib key(s): {', '.join(bad)}; valid keys: images, workers")
            return cls(LegoConfig.from_dict(data.get("lego", {})), TargetConfig.from_dict(data.get("target", {})),
                       CalibSettings(**calib))
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; :class:`ConfigError` naming the file on any problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a recipe file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
    return Recipe.from_dict(data, str(path))


_HEADER = """\
# legonet recipe: the settings of `legonet compress` beyond its flags.
# Edit a copy and pass it with `legonet compress ... --recipe FILE.toml`; keys you delete keep their
# defaults, unknown keys are errors. Flags given on the command line (--block, --clusters) win."""
_COMMENTS = {
    "lego": "without --target-ratio: one setting for every tensor (the paper's method is the default)",
    "lego.kmeans": "k-means of the codebook(s)",
    "target": "with --target-ratio: per-tensor settings chosen to meet the ratio",
    "target.kmeans": "k-means of each tensor's final codebook",
    "target.layer_fit": "with --calib: the fit of indices, codebooks and gains to layer outputs (layer_fit = false skips it)",
    "target.refine": "with --calib: codebook refinement by distillation (refine = false skips it)",
    "calib": "with --calib: the calibration images read",
}


def default_recipe_text() -> str:
    """The defaults as a TOML recipe, with a comment per section."""
    return dump_recipe(Recipe())


def dump_recipe(recipe: Recipe) -> str:
    """``recipe`` as TOML text that :func:`read_recipe` reads back to an equal recipe."""
    lines = [_HEADER]
    for name in _SECTIONS:
        value = getattr(recipe, name)
        _table(lines, name, value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value))
    return "\n".join(lines).rstrip() + "\n"


def _table(lines: list[str], name: str, values: dict[str, Any]) -> None:
    lines.append("")
    if name in _COMMENTS:
        lines.append(f"# {_COMMENTS[name]}")
    lines.append(f"[{name}]")
    nested = []
    for key, value in values.items():
        if isinstance(value, dict):
            nested.append((key, value))
        elif value is None:  # TOML has no null: a skipped step is written as false
            if key not in ("layer_fit", "refine"):
                raise ConfigError(f"cannot write {name}.{key} = None in a recipe")
            lines.append(f"{key} = false")
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, value in nested:
        _table(lines, f"{name}.{key}", value)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"cannot write {v} in a recipe")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write a {type(v).__name__} in a recipe")
