import pytest
import torch
from torch import nn

from legonet.calibrate.sensitivity import fisher_sensitivity
from legonet.errors import ConfigError
from legonet.target import compress_to_ratio


class TwoBranches(nn.Module):
    """logits = a(x) + damp * b(x): b's weights matter ``damp`` times less to the output."""

    def __init__(self, damp: float):
        super().__init__()
        self.a, self.b, self.damp = nn.Linear(16, 10), nn.Linear(16, 10), damp

    def forward(self, x):
        return self.a(x) + self.damp * self.b(x)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 16, generator=g) for _ in range(n)]


def test_damped_branch_is_less_sensitive_and_results_are_seeded():
    torch.manual_seed(0)
    model = TwoBranches(0.01)
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
    s = fisher_sensitivity(model, batches(), ["a.weight", "b.weight"])
    assert s["b.weight"] < 1e-3 * s["a.weight"]  # gradients scale by damp, Fisher by damp^2
    assert sum(s.values()) / 2 == pytest.approx(1.0)
    assert s == fisher_sensitivity(model, batches(), ["a.weight", "b.weight"])
    assert all(p.requires_grad for p in model.parameters()) and model.training  # left as found


def test_bad_names_and_no_data():
    model = TwoBranches(1.0)
    with pytest.raises(ConfigError, match="no parameter named 'c.weight'"):
        fisher_sensitivity(model, batches(), ["c.weight"])
    with pytest.raises(ConfigError, match="no calibration batch"):
        fisher_sensitivity(model, [], ["a.weight"])


def test_sensitive_tensor_gets_more_bytes():
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(128, 128, generator=g), "b": torch.randn(128, 128, generator=g)}
    menu = (((1, 1), 4), ((1, 1), 16), ((1, 1), 256))
    _, equal = compress_to_ratio(sd, 6.0, menu=menu)
    _, weighted = compress_to_ratio(sd, 6.0, menu=menu, sensitivity={"a": 100.0, "b": 0.01})
    assert equal["a"].nbytes == equal["b"].nbytes  # alike tensors, alike shares
    assert weighted["a"].nbytes > weighted["b"].nbytes
    with pytest.raises(ConfigError, match="no sensitivity given for tensor 'b'"):
        compress_to_ratio(sd, 6.0, menu=menu, sensitivity={"a": 1.0})
