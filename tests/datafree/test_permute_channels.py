"""Function-preserving channel permutations (legonet.datafree.permute_channels)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.datafree.permute_channels import ChannelChain, free_channel_chains, group_alike_channels, permute_chain


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, -1.5, 1.5),
                                  (m.bias, -0.3, 0.3)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
    return model.eval()


class _Bottleneck(nn.Module):
    def __init__(self, c: int = 16, mid: int = 12) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + x)


class _ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block = _Bottleneck()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _mobile() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                         nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def _mlp(norm: bool = False) -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32) if norm else nn.GELU(), nn.Linear(32, 10))


def _same_function_after_grouping(model: nn.Module, x: torch.Tensor) -> tuple[list[ChannelChain], list[str]]:
    before = copy.deepcopy(model)
    chains = group_alike_channels(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before(x), rtol=1e-4, atol=1e-5)
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, before.state_dict()[n])]
    return chains, changed


def test_resnet_bottleneck_permutes_its_two_hidden_widths_and_not_the_residual_stream():
    torch.manual_seed(0)
    model = _randomise_norms(_ResNetLike())
    chains, changed = _same_function_after_grouping(model, torch.randn(4, 3, 8, 8))
    assert chains == [ChannelChain("block.conv1", ("block.bn1",), "block.conv2", 12),
                      ChannelChain("block.conv2", ("block.bn2",), "block.conv3", 12)]
    assert "block.conv2.weight" in changed and "block.bn1.running_var" in changed
    # the residual stream (stem, its BatchNorm, conv3's rows, bn3) and the head keep their order
    assert not any(n.startswith(("stem", "bn.", "block.bn3", "fc")) for n in changed)


def test_depthwise_chain_and_mlp_hidden_width():
    torch.manual_seed(1)
    chains, changed = _same_function_after_grouping(_randomise_norms(_mobile()), torch.randn(2, 3, 6, 6))
    assert chains == [ChannelChain("0", ("1", "3", "4"), "6", 8)]
    assert "3.weight" in changed and "3.bias" in changed
    torch.manual_seed(2)
    chains, _ = _same_function_after_grouping(_mlp().eval(), torch.randn(7, 3, 10))
    assert chains == [ChannelChain("0", (), "2", 32)]


def test_what_is_not_channel_wise_or_not_traceable_stays():
    assert free_channel_chains(_mlp(norm=True)) == []  # LayerNorm mixes the channels

    class Shared(nn.Module):  # one module called twice
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    assert free_channel_chains(Shared()) == []

    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) if x.sum() > 0 else x[:, :2]

    model = Branchy()
    before = copy.deepcopy(model.state_dict())
    assert group_alike_channels(model) == []
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_alike_channels_end_in_the_same_blocks():
    # conv1's 32 rows are 8 directions x 4 (random signs), shuffled
    torch.manual_seed(4)
    model = _ResNetLike()
    model.block = _Bottleneck(16, 32)
    _randomise_norms(model)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 16, generator=g)
    rows = base.repeat_interleave(4, 0) + 0.05 * torch.randn(32, 16, generator=g)
    rows = rows * torch.where(torch.rand(32, 1, generator=g) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        model.block.conv1.weight.copy_(rows[torch.randperm(32, generator=g)][:, :, None, None])

    def least_alike_in_a_block() -> float:
        """The smallest |cos| between two rows of one aligned block of 4 rows."""
        w = model.block.conv1.weight.detach().reshape(8, 4, 16)
        u = w / w.norm(dim=2, keepdim=True)
        return float((u @ u.transpose(1, 2)).abs().min())

    assert least_alike_in_a_block() < 0.5
    _same_function_after_grouping(model, torch.randn(2, 3, 8, 8))
    assert least_alike_in_a_block() > 0.95


def test_permute_chain_rejects_what_is_not_a_permutation():
    chain = free_channel_chains(_mlp())[0]
    with pytest.raises(ValueError, match="not a permutation"):
        permute_chain(_mlp(), chain, torch.tensor([0] * 32))
