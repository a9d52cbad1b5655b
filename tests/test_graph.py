"""Tracing a model into a graph of its layers: subclasses of weight layers stay one node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.errors import ArchitectureError
from legonet.graph import PassNote, graph_or_note, own_forward_layers, trace


class SamePadConv(nn.Conv2d):
    """'SAME' padding computed from the input's size in ``forward``, as TensorFlow ports do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = max((-(-h // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - h, 0)
        pw = max((-(-w // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MyLinear(nn.Linear):
    pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SamePadConv(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = MyLinear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_subclasses_of_layers_are_single_nodes():
    model = Net().eval()
    gm = trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn", "fc"]
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(gm(x), model(x))
    # the default tracer loses the convolution: it cannot trace the shape arithmetic, or would inline it
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)


def test_own_forward_layers_lists_only_overriding_subclasses():
    assert own_forward_layers(Net()) == ["conv"]  # MyLinear keeps nn.Linear's forward


def test_untraceable_models_give_a_one_line_reason():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ArchitectureError, match="torch.fx cannot trace Branchy"):
        trace(Branchy())
    gm, note = graph_or_note(Branchy(), "channel grouping")
    assert gm is None and isinstance(note, PassNote)
    assert str(note).startswith("channel grouping: skipped: torch.fx cannot trace Branchy")
