"""The zero padding a ``nn.Conv2d`` applies, including subclasses that pad in their own ``forward``.

Networks ported from TensorFlow pad 'SAME' (asymmetrically, from the input's size) in a subclass's
``forward`` and leave ``padding`` at 0, so ``padding`` alone does not describe them. A subclass that
overrides ``forward`` (or ``_conv_forward``) is run on a seeded random probe input of the traced
shape, with random weights, and compared against ``F.conv2d`` after every zero padding that gives
the traced output size; the one that matches is its padding. Anything else is an error naming the
module: the export never guesses.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from legonet.errors import ArchitectureError

# (top, bottom, left, right)
Padding = tuple[int, int, int, int]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def overrides_forward(module: nn.Conv2d) -> bool:
    cls = type(module)
    return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward


def resolve_padding(padding, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Padding:
    """``(top, bottom, left, right)`` of a conv's ``padding`` argument: numbers, 'valid', or 'same'
    (an odd total splits with the extra row/column after, as PyTorch does)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def declared_padding(module: nn.Conv2d, name: str) -> Padding:
    """The padding of a stock ``nn.Conv2d``, from its ``padding``."""
    if module.padding_mode != "zeros":
        raise ArchitectureError(f"C export: conv {name!r} pads with mode {module.padding_mode!r}; "
                                "only zeros is supported")
    return resolve_padding(module.padding, module.kernel_size, module.dilation)


def _candidates(size: int, out: int, kernel: int, stride: int, dilation: int) -> list[tuple[int, int]]:
    """``(before, after)`` paddings of one dimension giving ``out`` positions, likeliest first
    (TensorFlow's 'SAME' split, then PyTorch's, then the rest by imbalance)."""
    span = dilation * (kernel - 1) + 1
    found = [(b, a) for b in range(span) for a in range(span + stride)
             if (size + b + a - span) // stride + 1 == out and size + b + a >= span]
    total = max((out - 1) * stride + span - size, 0)
    first = [(total // 2, total - total // 2), (total - total // 2, total // 2)]
    return list(dict.fromkeys([p for p in first if p in found] + sorted(found, key=lambda p: (abs(p[0] - p[1]), p))))


def probed_padding(module: nn.Conv2d, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Padding:
    """The zero padding that makes ``F.conv2d`` reproduce ``module``'s own ``forward`` on a probe of
    ``in_shape`` ``(1, C, H, W)`` with output ``out_shape``; ArchitectureError naming ``name`` if none does."""
    cls = type(module).__name__
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, generator=gen)
    tensors = {n: torch.randn(t.shape, generator=gen)
               for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_floating_point()}
    try:
        with torch.no_grad():
            y = torch.func.functional_call(module, tensors, (x,))
    except Exception as exc:  # noqa: BLE001 - any failure of a user's forward is reported, not raised
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArchitectureError(f"C export: conv {name!r} ({cls}) fails on a probe input of shape "
                                f"{tuple(in_shape)}: {why}") from None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(out_shape):
        raise ArchitectureError(f"C export: conv {name!r} ({cls}) overrides forward and does not return one "
                                f"tensor of the traced shape {tuple(out_shape)}")
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    rows = _candidates(in_shape[2], out_shape[2], kh, sh, dh)
    cols = _candidates(in_shape[3], out_shape[3], kw, sw, dw)
    tol = 1e-4 * float(y.abs().max()) + 1e-6
    with torch.no_grad():
        for (top, bottom), (left, right) in itertools.product(rows, cols):
            ref = F.conv2d(F.pad(x, (left, right, top, bottom)), tensors["weight"], tensors.get("bias"),
                           module.stride, 0, module.dilation, module.groups)
            if ref.shape == y.shape and float((ref - y).abs().max()) <= tol:
                return (top, bottom, left, right)
    raise ArchitectureError(f"C export: conv {name!r} ({cls}) overrides forward with something other than zero "
                            "padding followed by its convolution")


def conv_padding(module: nn.Conv2d, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Padding:
    """``(top, bottom, left, right)`` zero padding of ``module`` (stock or subclass) at the traced shapes."""
    if overrides_forward(module):
        return probed_padding(module, name, in_shape, out_shape)
    return declared_padding(module, name)
