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


def cli_net() -> nn.Module:
    """A small CNN for the command line's tests, importable as ``tests.nets:cli_net``: a 'SAME'
    padding Conv2d subclass (as ported TensorFlow networks have), BatchNorm with trained-looking
    statistics, a depthwise layer and a classifier; ``(N, 3, 16, 16)`` images."""

    class SameConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            ph = max((-(-h // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - h, 0)
            pw = max((-(-w // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - w, 0)
            x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = nn.Sequential(SameConv2d(3, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))
        with torch.no_grad():
            for bn in (m[1], m[4], m[7]):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


cli_net.legonet_mean = (0.5, 0.5, 0.5)
cli_net.legonet_std = (0.25, 0.25, 0.25)
cli_net.legonet_input_size = (3, 16, 16)
