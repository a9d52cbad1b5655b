"""The flat graph the C export runs: operations on float32 tensors of batch 1, in execution order.

:mod:`legonet.export.c.lower` builds it from a ``torch.fx`` trace, :mod:`legonet.export.c.fuse`
folds BatchNorm, padding and activations into the operations before them, and
:mod:`legonet.export.c.memory` places every value in one arena. Values are numbered; value ``0`` is
the network's input. Every shape is the tensor's full PyTorch shape (batch dimension included, and
it is 1); memory is always the tensor's contiguous (C-order) layout, so a reshape is free.

Operation kinds and their ``attrs``:

=========  ======================================================================================
input      ``mean``, ``std``: the uint8 HWC image normalised into value 0 (no inputs)
conv       ``weight``, ``bias`` (tensor names or None), ``kernel``, ``stride``, ``dilation``,
           ``pad`` (top, left), ``groups``, ``post`` (:class:`Post`)
linear     ``weight``, ``bias``, ``post``; applied to every row of the input's last dimension
pointwise  ``post``: per-channel affine (a BatchNorm outside a conv) and/or an activation
scalar     ``op`` (add, sub, rsub, mul, div, rdiv), ``value``, ``post`` (activation only)
binary     ``op`` (add, sub, mul, div), ``post``: two tensors, each full-size or per-channel
maxpool    ``kernel``, ``stride``, ``pad``, ``dilation``
avgpool    ``kernel``, ``stride``, ``pad``, ``count_include_pad``, ``divisor`` (0: PyTorch's rule)
mean       global average over H x W
pad        ``pads`` ((c0, c1), (h0, h1), (w0, w1)) of the trailing C, H, W dims, ``value``
slice      ``start``, ``step`` per trailing C, H, W dim (the output shape gives the counts)
concat     ``dim``
alias      a reshape: the output is the input's memory under another shape (no code)
=========  ======================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Activations the runtime applies elementwise (``Post.act``); "clamp" covers ReLU, ReLU6, Hardtanh
# and clamp, with bounds ``lo``/``hi``; "leaky_relu" keeps its slope in ``lo``.
ACTIVATIONS = ("none", "clamp", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu")
ELEMENTWISE = ("pointwise", "scalar", "binary")


@dataclass
class Post:
    """What happens to each result before it is stored: ``act(x * mul[c] + add[c])``.

    ``mul``/``add`` are ``(channels,)`` float64 arrays or None (1 and 0): a bias, a folded BatchNorm.
    """

    mul: np.ndarray | None = None
    add: np.ndarray | None = None
    act: str = "none"
    lo: float = 0.0
    hi: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.mul is None and self.add is None and self.act == "none"


@dataclass
class Op:
    """One runtime call: ``output = kind(*inputs)``; ``name`` is the fx node it comes from."""

    kind: str
    inputs: list[int]
    output: int
    name: str
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    """Operations in execution order and every value's shape; ``output`` is the network's result."""

    shapes: list[tuple[int, ...]] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    output: int = 0

    def new_value(self, shape: tuple[int, ...]) -> int:
        self.shapes.append(tuple(int(s) for s in shape))
        return len(self.shapes) - 1

    def numel(self, value: int) -> int:
        return math.prod(self.shapes[value])

    def consumers(self) -> dict[int, list[Op]]:
        """``{value: ops reading it}``; the network's output counts as read by a ``None`` op."""
        users: dict[int, list] = {v: [] for v in range(len(self.shapes))}
        for op in self.ops:
            for v in op.inputs:
                users[v].append(op)
        users[self.output].append(None)
        return users


def chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The trailing ``(C, H, W)`` of a batch-1 shape, missing trailing dims counted as 1:
    ``(1, C, H, W) -> (C, H, W)``, ``(1, F) -> (F, 1, 1)``."""
    rest = tuple(shape[1:]) + (1, 1, 1)
    return rest[0], rest[1], rest[2]
