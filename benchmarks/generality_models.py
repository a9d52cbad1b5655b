"""Small networks of other families than the ResNets, built in code for the generality benchmark.

* :class:`DepthwiseNet`: a MobileNet-style stack of depthwise-separable blocks (3x3 depthwise
  convolution, BatchNorm, activation, 1x1 pointwise convolution, BatchNorm, activation) with a
  spatial-mean head; the activation is ReLU6 (MobileNetV1/V2) or SiLU (EfficientNet).
* :class:`TinyViT`: a vision transformer: 4x4 patch embedding, learned positions, pre-norm
  ``nn.TransformerEncoderLayer`` blocks (GELU), LayerNorm, token mean, linear head. No BatchNorm,
  so the data-free bias correction has nothing to work from.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu6": nn.ReLU6, "silu": nn.SiLU}


def _separable(cin: int, cout: int, stride: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), act(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act())


class DepthwiseNet(nn.Module):
    """``(N, 3, 32, 32)`` images -> ``(N, classes)`` logits; 0.27 M parameters."""

    def __init__(self, activation: str = "relu6", classes: int = 10) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), act())
        widths = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2))
        self.blocks = nn.Sequential(*(_separable(i, o, s, act) for i, o, s in widths))
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TinyViT(nn.Module):
    """``(N, 3, 32, 32)`` images -> ``(N, classes)`` logits: 64 tokens of width 96; 0.16 M parameters."""

    def __init__(self, width: int = 96, depth: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 64, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


MODELS = {
    "depthwise_relu6": lambda: DepthwiseNet("relu6"),
    "depthwise_silu": lambda: DepthwiseNet("silu"),
    "tiny_vit": TinyViT,
}
