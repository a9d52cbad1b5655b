"""Validated, frozen settings of every legonet mode (from plain mappings: unknown keys are errors).

* :class:`LegoConfig` (with :class:`KMeansConfig`): block clustering at one setting, the paper's
  method and its plain extensions: ``legonet.compress(model, LegoConfig(block=4, clusters=32))``.
* :class:`TargetConfig` (with :class:`LayerFitConfig` and :class:`RefineConfig`): target mode, per
  tensor settings chosen to meet a file ratio, data-free or calibrated:
  ``legonet.compress(model, TargetConfig(...), target_ratio=8, calib=batches)``.
"""

from legonet.config.base import from_dict
from legonet.config.calibration import (
    FEATURE_FALLBACKS,
    FEATURE_GATES,
    LOSSES,
    NORM_STATISTICS,
    PRECISIONS,
    SCHEDULES,
    LayerFitConfig,
    RefineConfig,
)
from legonet.config.lego import (
    CODEBOOK_DTYPES,
    INITS,
    KEPT_DTYPES,
    SCALE_STATS,
    SCALES,
    SCOPES,
    KMeansConfig,
    LegoConfig,
)
from legonet.config.target import TargetConfig

__all__ = [
    "CODEBOOK_DTYPES", "FEATURE_FALLBACKS", "FEATURE_GATES", "INITS", "KEPT_DTYPES", "LOSSES", "NORM_STATISTICS",
    "PRECISIONS", "SCALES", "SCALE_STATS", "SCHEDULES", "SCOPES", "KMeansConfig", "LayerFitConfig", "LegoConfig",
    "RefineConfig", "TargetConfig", "from_dict",
]
