"""legonet: shrink trained neural networks by block weight clustering (LegoNet).

Typical use::

    import legonet
    cm = legonet.compress(model, target_ratio=8)                   # data-free, per-tensor settings
    cm = legonet.compress(model, target_ratio=16, calib=batches)   # calibrated on unlabeled inputs
    cm = legonet.compress(model, legonet.LegoConfig(block=4, clusters=32))  # the paper's setting
    print(cm.report())
    cm.save("model.lego")
    legonet.load("model.lego").load_into(model)
"""

from legonet.api import compress
from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.config import KMeansConfig, LayerFitConfig, LegoConfig, RefineConfig, TargetConfig
from legonet.errors import (
    ArchitectureError, CheckpointError, ConfigError, DataError, FormatError, LegoError,
)
from legonet.format import load
from legonet.report import Report

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError", "CheckpointError", "ClusteredTensor", "CompressedModel", "ConfigError",
    "DataError", "FormatError", "KMeansConfig", "LayerFitConfig", "LegoConfig", "LegoError", "RefineConfig",
    "Report", "TargetConfig", "compress", "load", "__version__",
]
