"""Small networks built in code for the tests."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_net(width: int = 32, eps: float = 1e-5) -> nn.Module:
    """Conv-BN-ReLU x 2 + linear classifier for ``(N, 3, 8, 8)`` inputs, seeded, in eval mode, with
    non-trivial BatchNorm statistics and affine parameters (as a trained network has)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, width, 3, bias=False), nn.BatchNorm2d(width, eps=eps), nn.ReLU(),
                      nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width, eps=eps), nn.ReLU(),
                      nn.Flatten(), nn.Linear(width * 4 * 4, 10))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def assert_stored_exactly(cm) -> None:
    """``cm`` holds exactly the values its .lego file holds: float16 codebooks and gains, or 8-bit
    codes (the writer refuses values off their code), so writing and reading it changes nothing."""
    from legonet.format import deserialize

    back = deserialize(cm.to_bytes())
    for name in cm.tensors:
        assert torch.equal(back.reconstruct(name), cm.reconstruct(name)), name
    for a, b in zip(cm.codebooks, back.codebooks):
        assert torch.equal(a, b)
