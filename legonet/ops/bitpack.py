"""Bit-packing of centroid indices at ``ceil(log2 K)`` bits each.

Layout: a little-endian bit stream. Index ``i`` occupies bits ``[i*w, (i+1)*w)`` of the stream, least
significant bit first; bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``. The last byte is
zero-padded. This is the layout the C runtime decodes as well.
"""

from __future__ import annotations

import numpy as np


def bits_for(k: int) -> int:
    """Index width for a codebook of ``k`` entries: ``ceil(log2 k)``, at least 1."""
    if k < 1:
        raise ValueError(f"codebook size must be >= 1, got {k}")
    return max(1, int(k - 1).bit_length())


def packed_nbytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


def pack_bits(indices: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers below ``2**width`` into a uint8 array.

    Args:
        indices: 1-D integer array of length n.
        width: bits per index, 1..32.
    Returns:
        uint8 array of length ``ceil(n*width/8)``.
    """
    if not 1 <= width <= 32:
        raise ValueError(f"bit width must be in 1..32, got {width}")
    idx = np.asarray(indices).reshape(-1).astype(np.uint64, copy=False)
    if idx.size and int(idx.max()) >> width:
        raise ValueError(f"index {int(idx.max())} does not fit in {width} bits")
    if width == 8:
        return idx.astype(np.uint8)
    if width == 16:
        return idx.astype("<u2").view(np.uint8)
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((idx[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` indices as an int64 array."""
    if not 1 <= width <= 32:
        raise ValueError(f"bit width must be in 1..32, got {width}")
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_nbytes(count, width)
    if packed.size < need:
        raise ValueError(f"{count} indices of {width} bits need {need} bytes, got {packed.size}")
    if width == 8:
        return packed[:count].astype(np.int64)
    if width == 16:
        return packed[: 2 * count].view("<u2").astype(np.int64)
    bits = np.unpackbits(packed[:need], bitorder="little", count=count * width)
    bits = bits.reshape(count, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width, dtype=np.int64))
