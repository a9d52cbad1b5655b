"""Shared fixtures: tiny models built in code and paths of the bundled real fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "legonet" / "data"
SHARED = ROOT.parent / "shared"


class TinyNet(nn.Module):
    """A small CNN touching every layer kind the engine must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 12, 1)
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pw(self.dw(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def resnet20_path() -> Path:
    return BUNDLED / "resnet20_cifar10.safetensors"


@pytest.fixture
def images_path() -> Path:
    return BUNDLED / "cifar10-test-1000.npz"
