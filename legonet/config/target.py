"""Settings of target mode: per-tensor block shape and K chosen to meet a whole-file ratio."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from legonet.config.base import check_bool, check_choice, check_int, from_dict
from legonet.config.calibration import NORM_STATISTICS, LayerFitConfig, RefineConfig
from legonet.config.lego import KMeansConfig, LegoConfig, _as_patterns
from legonet.errors import ConfigError

_WHERE = "target config"


@dataclass(frozen=True)
class TargetConfig:
    """How target mode compresses (``legonet.compress(model, TargetConfig(...), target_ratio=R)``).

    Every clustered tensor gets its own codebook and row gains; its block shape and K come from a
    menu, chosen per tensor so that the whole file meets the ratio (see :mod:`legonet.target`).
    The steps below apply where they can: those that need the model's structure run when a module
    (not a bare state dict) is given, the calibrated ones when calibration batches are given.

    Attributes:
        include: glob patterns (``fnmatch``) of tensor names eligible for clustering (floating,
            2 or more dimensions); every pattern other than ``"*"`` must match some tensor.
        exclude: glob patterns of tensor names kept as they are.
        seed: seed of every random choice (same seed, same file).
        allow_nonfinite: keep tensors holding NaN or Inf uncompressed instead of refusing the model.
        kmeans: settings of the final per-tensor k-means fits.
        fold_norms: with a module: store BatchNorm layers in inference form (statistics folded into
            the affine parameters, each scale moved into the row gains of the layer before it), so
            that their bytes go to the weights; eval outputs are unchanged.
        bias_correction: with a module and no calibration: cancel the mean shift each clustered
            layer causes, from the stored BatchNorm statistics (data-free).
        group_channels: with calibration: first reorder hidden channels that can be reordered
            without changing the network's function, so that alike weight rows share blocks.
        norm_statistics: with calibration: BatchNorm statistics re-estimated ``"relative"`` to the
            original model's (only the change compression makes is applied) or ``"replace"``d.
        batch_size: calibration samples per pass through the model (statistics, re-estimation).
        layer_fit: with calibration: the fit of indices, codebooks and gains to layer outputs
            (``None``, or ``False`` in a recipe, skips it).
        refine: with calibration: codebook refinement by distillation (``None`` or ``False`` skips it).
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    seed: int = 0
    allow_nonfinite: bool = False
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    fold_norms: bool = True
    bias_correction: bool = True
    group_channels: bool = True
    norm_statistics: str = "relative"
    batch_size: int = 64
    layer_fit: LayerFitConfig | None = field(default_factory=LayerFitConfig)
    refine: RefineConfig | None = field(default_factory=RefineConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        for key, cls in (("kmeans", KMeansConfig), ("layer_fit", LayerFitConfig), ("refine", RefineConfig)):
            value = getattr(self, key)
            if value is False and key != "kmeans":  # a recipe (TOML has no null) skips a step with false
                object.__setattr__(self, key, None)
            elif isinstance(value, dict):
                object.__setattr__(self, key, cls.from_dict(value))
            elif not (isinstance(value, cls) or (value is None and key != "kmeans")):
                raise ConfigError(f"{_WHERE} {key} must be a {cls.__name__} or a mapping"
                                  + (", or None to skip the step" if key != "kmeans" else "")
                                  + f", got {type(value).__name__}")
        check_int(_WHERE, "seed", self.seed, lo=0)
        check_int(_WHERE, "batch_size", self.batch_size)
        for key in ("allow_nonfinite", "fold_norms", "bias_correction", "group_channels"):
            check_bool(_WHERE, key, getattr(self, key))
        check_choice(_WHERE, "norm_statistics", self.norm_statistics, NORM_STATISTICS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetConfig":
        """Build from a plain mapping (e.g. a parsed recipe; nested mappings for ``kmeans``,
        ``layer_fit`` and ``refine``); unknown keys are errors."""
        return from_dict(cls, data, _WHERE)

    def clustering(self) -> LegoConfig:
        """The :class:`LegoConfig` target mode clusters with and writes into the file: one float16
        codebook per tensor with unshrunk row gains, kept tensors in float16, compact storage and
        entropy-coded indices (each tensor's block shape, K and gain statistic come from its plan)."""
        return LegoConfig(include=self.include, exclude=self.exclude, seed=self.seed, kmeans=self.kmeans,
                          allow_nonfinite=self.allow_nonfinite, scope="layer", scales="row", unshrink=True,
                          codebook_dtype="float16", kept_dtype="float16", compact_storage=True, entropy_coding=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples, nested mappings), the inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d
