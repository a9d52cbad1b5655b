"""Data-free repairs of a compressed model: use only what the checkpoint stores (no images)."""

from legonet.datafree.bias_correction import (
    CorrectionReport,
    correct_bias,
    correct_compressed,
    input_moments,
)

__all__ = ["CorrectionReport", "correct_bias", "correct_compressed", "input_moments"]
