"""Pure tensor functions of the lean runtime: bit-unpacking and block decoding in torch.

The packed layout is the one of :mod:`legonet.ops.bitpack` (little-endian bit stream, index ``i`` at
bits ``[i*w, (i+1)*w)``), so the bytes a lean module holds are the bytes of the .lego file.
"""

from __future__ import annotations

import numpy as np
import torch

from legonet.ops.bitpack import pack_bits, packed_nbytes
from legonet.ops.tiling import Tiling, untile


def pack_indices(indices: torch.Tensor, width: int) -> torch.Tensor:
    """``(n,)`` integer indices -> ``(ceil(n*width/8),)`` uint8, the .lego file's packed layout."""
    return torch.from_numpy(np.ascontiguousarray(pack_bits(indices.cpu().numpy(), width)))


def unpack_indices(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices` in torch ops (no numpy round trip, works on any device).

    Args:
        packed: ``(>= ceil(count*width/8),)`` uint8.
        width: bits per index, 1..32.
        count: number of indices to read.
    Returns:
        ``(count,)`` int64.
    """
    if not 1 <= width <= 32:
        raise ValueError(f"bit width must be in 1..32, got {width}")
    need = packed_nbytes(count, width)
    if packed.numel() < need:
        raise ValueError(f"{count} indices of {width} bits need {need} bytes, got {packed.numel()}")
    if width == 8:
        return packed[:count].long()
    # Each index spans at most ceil((7 + width) / 8) bytes from its first byte; read that many
    # bytes little-endian into an int64, then shift and mask. Zero-pad so the last reads stay inside.
    span = (7 + width + 7) // 8
    buf = torch.cat([packed[:need], packed.new_zeros(span)]).long()
    start = torch.arange(count, device=packed.device, dtype=torch.int64) * width
    first = start >> 3
    value = buf[first]
    for i in range(1, span):
        value |= buf[first + i] << (8 * i)
    return (value >> (start & 7)) & ((1 << width) - 1)


def prepare_codebook(codebook: torch.Tensor, stored_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The codebook rounded to the tensor's stored dtype, then cast to the compute dtype.

    Rounding is elementwise, so gathering from this codebook gives exactly the values of
    :func:`decode_weight` while skipping two full-size casts per forward.
    """
    book = codebook.to(stored_dtype)
    return book if book.dtype == dtype else book.to(dtype)


def decode_prepared(book: torch.Tensor, packed: torch.Tensor, width: int, tiling: Tiling) -> torch.Tensor:
    """Dense weight of ``tiling.shape`` from a :func:`prepare_codebook` codebook and packed indices."""
    # index_select is markedly faster than advanced indexing (book[idx]) for this row gather
    return untile(torch.index_select(book, 0, unpack_indices(packed, width, tiling.num_blocks)), tiling)


def decode_weight(codebook: torch.Tensor, packed: torch.Tensor, width: int, tiling: Tiling,
                  stored_dtype: torch.dtype, dtype: torch.dtype | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight from a codebook and packed indices; same values as ``CompressedModel.reconstruct``.

    Args:
        codebook: ``(K, b_r*b_c)`` float32.
        packed: packed indices of ``tiling.num_blocks`` blocks.
        width: index width in bits.
        tiling: the tensor's :class:`~legonet.ops.tiling.Tiling`.
        stored_dtype: the tensor's dtype in the .lego file (the reconstruction is rounded to it, as
            ``reconstruct`` does).
        dtype: dtype to compute in (default ``stored_dtype``).
        scale: optional ``(rows,)`` float32 per-row gains; row ``r`` of the 2-D view is multiplied
            by ``scale[r]`` before the rounding to ``stored_dtype`` (gain-shape clustering).
    Returns:
        Tensor of ``tiling.shape``.
    """
    idx = unpack_indices(packed, width, tiling.num_blocks)
    w = untile(torch.index_select(codebook, 0, idx), tiling)
    if scale is not None:
        w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    w = w.to(stored_dtype)
    return w if dtype is None or dtype == stored_dtype else w.to(dtype)
