"""Quantize a tensor against a codebook and back (the pure functions behind every clustered tensor).

``quantize``/``dequantize`` follow torchao's split: choosing parameters (per-row scales, the
codebook) is separate from mapping weights to indices and indices back to weights.
"""

from __future__ import annotations

import math

import torch

from legonet.ops.tiling import Tiling, tile, untile


def choose_row_scales(weight: torch.Tensor, dtype: torch.dtype = torch.float16, stat: str = "rms") -> torch.Tensor:
    """Per-row gains for gain-shape clustering: the RMS (or largest magnitude) of each row of the 2-D view.

    Args:
        weight: ``(rows, ...)`` tensor.
        dtype: storage dtype the scales are rounded to (the values returned are exactly storable).
        stat: ``"rms"`` or ``"absmax"``.
    Returns:
        ``(rows,)`` float32, strictly positive (all-zero rows get 1).
    """
    m = weight.reshape(weight.shape[0], -1).float()
    if stat == "rms":
        g = m.pow(2).mean(1).sqrt()
    elif stat == "absmax":
        g = m.abs().amax(1)
    else:
        raise ValueError(f"unknown scale statistic {stat!r}")
    return storable_gains(torch.where(g > 0, g, torch.ones_like(g)), dtype)


def clamp_magnitude(gains: torch.Tensor, low: float, high: float = math.inf) -> torch.Tensor:
    """``gains`` with each magnitude clamped to ``[low, high]`` and its sign kept (0 counts as
    positive): a BatchNorm scale moved into the gains may make them negative
    (:mod:`legonet.datafree.fold_norms`), and clamping their values would flip those channels."""
    return torch.where(gains < 0, -1.0, 1.0).to(gains.dtype) * gains.abs().clamp(low, high)


def storable_gains(
    gains: torch.Tensor, dtype: torch.dtype = torch.float16, *, keep_sign: bool = False
) -> torch.Tensor:
    """``gains`` rounded to ``dtype`` (returned as float32), finite, and positive, or with
    ``keep_sign`` of the same sign (0 counts as positive) and nonzero magnitude: a BatchNorm scale
    moved into the gains may make them negative (:mod:`legonet.datafree.fold_norms`)."""
    # keep the rounded value nonzero and finite in the storage dtype
    info = torch.finfo(dtype)
    if keep_sign:
        return clamp_magnitude(gains, info.tiny, info.max).to(dtype).float()
    return gains.clamp(info.tiny, info.max).to(dtype).float()


def unshrink_scales(
    weight: torch.Tensor, approx: torch.Tensor, scale: torch.Tensor, element_weights: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Row gains that undo the shrink of clustering: ``scale * <w, w>_h / <w, w_hat>_h`` per row.

    A codebook of conditional means gives ``<w, w_hat> = |w_hat|^2 < |w|^2``: the reconstruction's
    component along each row is shorter than the row. Scaling the row's gain by the factor above
    makes that component equal to the row (the noise stays uncorrelated with it, as with rounding).

    Args:
        weight: ``(rows, ...)`` original tensor.
        approx: same shape, the reconstruction with gains ``scale``.
        scale: ``(rows,)`` the gains used for ``approx``.
        element_weights: optional importance weights broadcastable to the 2-D view ``(rows, cols)``.
    Returns:
        ``(rows,)`` float32 gains rounded to ``dtype``. A row whose reconstruction does not point
        along it (``<w, w_hat> <= 0``, or a factor outside [1/2, 2]) keeps a factor within those
        bounds: the correction is meant for small shrinks, not to rescue a row the codebook misses.
    """
    w = weight.reshape(weight.shape[0], -1).float()
    a = approx.reshape(w.shape).float()
    h = torch.ones(()) if element_weights is None else torch.broadcast_to(element_weights.float(), w.shape)
    num = (h * w * w).sum(1)
    den = (h * w * a).sum(1)
    factor = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(num))
    factor = torch.where(num > 0, factor.clamp(0.5, 2.0), torch.ones_like(num))
    return storable_gains(scale * factor, dtype)


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
