"""legonet: shrink trained neural networks by block weight clustering (LegoNet).

Typical use::

    import legonet
    cm = legonet.compress(model, legonet.LegoConfig(block=4, clusters=32))
    print(cm.report())
    cm.save("model.lego")
    legonet.load("model.lego").load_into(model)
"""

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.compress import compress
from legonet.config import KMeansConfig, LegoConfig
from legonet.errors import (
    ArchitectureError, CheckpointError, ConfigError, DataError, FormatError, LegoError,
)
from legonet.format import load
from legonet.report import Report

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError", "CheckpointError", "ClusteredTensor", "CompressedModel", "ConfigError",
    "DataError", "FormatError", "KMeansConfig", "LegoConfig", "LegoError", "Report", "compress",
    "load", "__version__",
]
