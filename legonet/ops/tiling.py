"""Cutting weight tensors into b_r x b_c blocks ("Legos") and putting them back.

The tiling is fixed and documented because the choice changes results:

* A tensor of shape ``(d0, d1, ..., dn)`` is viewed as the 2-D matrix ``(d0, d1*...*dn)``: axis 0
  (the output channels of Conv/Linear, the rows of an Embedding) gives the rows, everything else,
  flattened in C order, gives the columns. A Conv2d weight ``(out, in/groups, kh, kw)`` thus becomes
  ``(out, in/groups*kh*kw)``; depthwise ``(C, 1, 3, 3)`` becomes ``(C, 9)``.
* The matrix is zero-padded at the bottom and right to multiples of the block shape.
* Blocks are numbered row-major over the block grid (all blocks of the first block-row left to right,
  then the next block-row), and each block is flattened row-major into a vector of ``b_r*b_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from legonet.errors import ConfigError


@dataclass(frozen=True)
class Tiling:
    """How one tensor maps onto a grid of blocks.

    Attributes:
        shape: the tensor's original shape.
        block: (b_r, b_c).
        rows, cols: the 2-D view's size, ``rows = shape[0]``, ``cols = prod(shape[1:])``.
        grid: (block-rows, block-cols) after padding.
    """

    shape: tuple[int, ...]
    block: tuple[int, int]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def grid(self) -> tuple[int, int]:
        br, bc = self.block
        return (-(-self.rows // br), -(-self.cols // bc))

    @property
    def num_blocks(self) -> int:
        gr, gc = self.grid
        return gr * gc


def make_tiling(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> Tiling:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ConfigError(f"only tensors with 2 or more dimensions can be tiled, got shape {shape}")
    if any(s <= 0 for s in shape):
        raise ConfigError(f"cannot tile an empty tensor of shape {shape}")
    br, bc = block
    if br < 1 or bc < 1:
        raise ConfigError(f"block sides must be >= 1, got {block}")
    return Tiling(shape, (int(br), int(bc)))


def tile(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Cut ``weight`` into blocks.

    Args:
        weight: tensor with >= 2 dims, shape ``(d0, ...)``.
        block: (b_r, b_c).
    Returns:
        ``(num_blocks, b_r*b_c)`` tensor, same dtype, blocks in the documented order.
    """
    t = make_tiling(weight.shape, block)
    br, bc = t.block
    gr, gc = t.grid
    m = weight.reshape(t.rows, t.cols)
    pad_r, pad_c = gr * br - t.rows, gc * bc - t.cols
    if pad_r or pad_c:
        m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
    return m.reshape(gr, br, gc, bc).permute(0, 2, 1, 3).reshape(gr * gc, br * bc)


def untile(blocks: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Inverse of :func:`tile`: ``(num_blocks, b_r*b_c)`` -> tensor of ``tiling.shape``."""
    br, bc = tiling.block
    gr, gc = tiling.grid
    if blocks.shape != (gr * gc, br * bc):
        raise ValueError(f"expected blocks of shape {(gr * gc, br * bc)}, got {tuple(blocks.shape)}")
    m = blocks.reshape(gr, gc, br, bc).permute(0, 2, 1, 3).reshape(gr * br, gc * bc)
    return m[: tiling.rows, : tiling.cols].reshape(tiling.shape)


def padding_mask(tiling: Tiling) -> torch.Tensor:
    """``(num_blocks, b_r*b_c)`` bool tensor, True where an element is real (not padding)."""
    ones = torch.ones(tiling.rows, tiling.cols, dtype=torch.bool)
    return tile(ones.reshape(tiling.shape), tiling.block)
