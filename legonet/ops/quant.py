"""Quantize a tensor against a codebook and back (the pure functions behind every clustered tensor).

``quantize``/``dequantize`` follow torchao's split: choosing parameters (per-row scales, the
codebook) is separate from mapping weights to indices and indices back to weights.
"""

from __future__ import annotations

import torch

from legonet.ops.tiling import Tiling, tile, untile


def choose_row_scales(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Per-row gains for gain-shape clustering: the RMS of each row of the 2-D view.

    Args:
        weight: ``(rows, ...)`` tensor.
        dtype: storage dtype the scales are rounded to (the values returned are exactly storable).
    Returns:
        ``(rows,)`` float32, strictly positive (all-zero rows get 1).
    """
    m = weight.reshape(weight.shape[0], -1).float()
    rms = m.pow(2).mean(1).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    # keep the rounded value positive and finite in the storage dtype
    info = torch.finfo(dtype)
    return rms.clamp(info.tiny, info.max).to(dtype).float()


def normalized_blocks(weight: torch.Tensor, block: tuple[int, int], scale: torch.Tensor | None) -> torch.Tensor:
    """``(num_blocks, b_r*b_c)`` float32 blocks of ``weight`` with each row divided by its scale."""
    w = weight.float()
    if scale is not None:
        w = w / scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return tile(w, block)


def dequantize(
    codebook: torch.Tensor, indices: torch.Tensor, tiling: Tiling, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense float32 tensor of ``tiling.shape`` from ``codebook (K, d)`` and ``indices (num_blocks,)``."""
    w = untile(codebook[indices], tiling)
    if scale is not None:
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return w
