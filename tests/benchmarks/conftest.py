"""A tiny model, images labelled by it, and a Bench over them: the benchmark's tests need no fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.common import Bench
from benchmarks.methods import LEGONET_METHODS
from benchmarks.peers import PEER_METHODS
from legonet.data import ImageSet, to_input
from legonet.zoo import ArchSpec

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_net() -> nn.Module:
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG state
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )


TINY = ArchSpec("tiny", tiny_net, MEAN, STD, (3, 8, 8))


@pytest.fixture
def tiny_sd() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_net().state_dict().items()}


@pytest.fixture
def tiny_images() -> ImageSet:
    """96 random 8x8 images labelled by the uncompressed tiny net itself (baseline top-1 = 100 %)."""
    x = np.random.default_rng(0).integers(0, 256, size=(96, 8, 8, 3), dtype=np.uint8)
    model = tiny_net().eval()
    with torch.no_grad():
        y = model(to_input(x, MEAN, STD)).argmax(1).numpy().astype(np.int64)
    return ImageSet(x, y)


@pytest.fixture
def bench(tiny_sd, tiny_images, tmp_path) -> Bench:
    return Bench("tiny", tiny_sd, TINY, tiny_images, tmp_path / "cache", {**LEGONET_METHODS, **PEER_METHODS},
                 calib=tiny_images)
