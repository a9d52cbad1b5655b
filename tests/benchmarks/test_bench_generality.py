"""The generality benchmark's networks, its training loop and its table (no fixtures needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.generality import render, train
from benchmarks.generality_models import MODELS
from legonet.data import ImageSet
from legonet.datafree import input_moments


@pytest.mark.parametrize("name, params", [("depthwise_relu6", 274_250), ("depthwise_silu", 274_250),
                                          ("tiny_vit", 161_578)])
def test_networks_map_cifar_images_to_ten_logits(name, params):
    model = MODELS[name]().eval()
    assert sum(p.numel() for p in model.parameters()) == params  # as their docstrings say
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["depthwise_relu6", "depthwise_silu"])
def test_bias_correction_reaches_every_layer_of_the_depthwise_nets_but_the_stem(name):
    model = MODELS[name]()
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(input_moments(model)) == sorted(n for n in layers if n != "stem.0")


def test_training_is_seeded_and_returns_the_network_in_eval_mode():
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, size=(256, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 256))
    a, b = train("depthwise_relu6", data, epochs=1), train("depthwise_relu6", data, epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not a.training


def test_table_gives_every_row_and_the_loss_against_the_original():
    rows = [{"method": "original", "ratio": 1.0, "top1": 60.0, "interval": [58.0, 62.0]},
            {"method": "legonet data-free", "target": 8.0, "ratio": 8.3, "top1": 59.5, "interval": [57.3, 61.6],
             "seconds": 9.0, "bias_correction": "data-free bias correction: corrected 3 of 4 clustered layers"},
            {"method": "peer rtn", "bits": 4, "ratio": 6.2, "top1": 58.0, "interval": [55.8, 60.1]}]
    doc = {"about": "x", "test_images": 2000, "models": {"net": {"epochs": 1, "parameters": 10, "rows": rows}}}
    text = render(doc)
    assert "| legonet data-free | target 8x | 8.30x | 59.50 % | 57.3-61.6 | +0.50 | 9 s |" in text
    assert "| peer rtn | 4 bits | 6.20x | 58.00 % | 55.8-60.1 | +2.00 |  |" in text
    assert "Data-free bias correction: corrected 3 of 4 clustered layers (data-free rows)." in text
