"""Tiny CNNs built in code for the C export tests: each covers a family of operations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from legonet.zoo.efficientnet_lite import same_padding


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (BatchNorm, ReLU6), residual if it fits."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class TinyMobileNetV2(nn.Module):
    """(N, 3, 16, 16) -> (N, 10): stem, three inverted residuals (one with a residual), head, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4),
                                    InvertedResidual(32, 32, 1, 4))
        self.head = nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class PadSameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding in forward: F.pad (odd pixel after), then F.conv2d; padding stays 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride, 0,
                        self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MixedOpsNet(nn.Module):
    """(N, 3, 17, 17) -> (N, 10): 'SAME'-padding stride-2 conv subclass, SiLU, Hardswish, sigmoid,
    squeeze-excitation, max/avg pooling, channel concatenation, dilation, Hardsigmoid, tanh,
    LeakyReLU, scalar arithmetic, flatten and two linear layers with a BatchNorm1d between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = PadSameConv2d(3, 32, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = PadSameConv2d(32, 32, 5, stride=2, groups=32, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.se = SqueezeExcite(32, 8)
        self.branch_a = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.branch_b = nn.Conv2d(32, 32, 1)
        self.pool_max = nn.MaxPool2d(3, 1, 1)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.bn_fc = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn0(self.stem(x)))                  # 17x17 -> 9x9, pads (0, 1) per side
        x = F.hardswish(self.bn1(self.dw(x)))               # 9x9 -> 5x5
        x = self.se(x)
        a = torch.tanh(self.branch_a(x))
        b = F.leaky_relu(self.branch_b(x), 0.1) * 0.5 + 1.0
        x = torch.cat([self.pool_max(a), F.hardsigmoid(b)], dim=1)
        x = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)  # 5x5 -> 3x3
        x = F.max_pool2d(x, 2, 1)                             # 3x3 -> 2x2
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.bn_fc(self.fc1(x))))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


class FunctionalConv(nn.Module):
    """A convolution written with F.pad + F.conv2d on its own parameters (traced into, not a leaf)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, stride=2)


class FunctionalNet(nn.Module):
    """(N, 3, 12, 12) -> (N, 10): functional conv/linear on parameters, an option-A shortcut (strided
    slice + channel zero-pad), ZeroPad2d, AvgPool2d, clamp, subtraction, division, reshape(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.down = FunctionalConv(16, 32)
        self.pad = nn.ZeroPad2d((1, 0, 1, 0))
        self.pool = nn.AvgPool2d(2, 2)
        self.fc_weight = nn.Parameter(torch.randn(10, 32 * 3 * 3) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).clamp(-1.0, 2.0)
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))  # 16 -> 32 channels, 12 -> 6
        y = self.down(x) - shortcut                            # 12 -> 6 (pad bottom/right, stride 2)
        y = self.pool(self.pad(y)) / 4.0                       # 7x7 -> 3x3
        return F.linear(y.reshape(y.size(0), -1), self.fc_weight)
