"""Data-free repairs of a compressed model: use only what the checkpoint stores (no images)."""

from legonet.datafree.bias_correction import (
    CorrectionReport,
    correct_bias,
    correct_compressed,
    input_moments,
)
from legonet.datafree.fold_norms import batchnorm_eps, fold_batchnorm_statistics

__all__ = ["CorrectionReport", "batchnorm_eps", "correct_bias", "correct_compressed", "fold_batchnorm_statistics",
           "input_moments"]
