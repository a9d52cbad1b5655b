import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.datafree.bias_correction import Moments, _relu_moments, correct_bias, input_moments
from legonet.errors import ArchitectureError
from legonet.zoo import build


class Chain(nn.Module):
    """1x1 identity conv -> BN -> ReLU -> 3x3 conv -> BN -> pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _chain() -> Chain:
    torch.manual_seed(0)
    m = Chain().eval()
    with torch.no_grad():
        m.c1.weight.copy_(torch.eye(4)[:, :, None, None])  # b1 sees N(0, 1): its output is N(beta, gamma^2)
        m.b1.weight.uniform_(0.5, 2.0)
        m.b1.bias.uniform_(-1.0, 1.0)
        m.b2.running_mean.uniform_(-0.3, 0.3)
    return m


def test_rectified_gaussian_moments_match_sampling():
    mean, var = torch.tensor([-1.0, 0.0, 0.7]), torch.tensor([0.5, 1.0, 2.0])
    m = _relu_moments(Moments(mean, var))
    z = torch.relu(mean + var.sqrt() * torch.randn(400_000, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(m.mean, z.mean(0), rtol=0, atol=1e-2)
    torch.testing.assert_close(m.var, z.var(0), rtol=0, atol=2e-2)


def test_moments_reach_every_layer_of_a_resnet():
    for arch, n_layers in (("resnet20", 20), ("resnet50_cifar", 54)):
        model = build(arch)
        mom = input_moments(model)
        assert len(mom) == n_layers - 1 and "conv1" not in mom  # the stem's input (images) is unknown


def test_correction_cancels_the_mean_shift_of_the_next_batchnorm():
    m = _chain()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    noisy = dict(sd)
    noisy["c2.weight"] = sd["c2.weight"] + 0.05  # a biased error, as clustering leaves
    new, rep = correct_bias(m, sd, noisy)
    assert rep.corrected == ("c2.weight",) and rep.uncorrected == ()
    x = torch.randn(128, 4, 32, 32, generator=torch.Generator().manual_seed(1))

    def pre_relu_mean(state):
        net = _chain()
        net.load_state_dict(state)
        with torch.no_grad():
            return net.b2(net.c2(F.relu(net.b1(net.c1(x))))).mean((0, 2, 3))

    ref = pre_relu_mean(sd)
    err_before = (pre_relu_mean(noisy) - ref).abs().max()
    err_after = (pre_relu_mean(new) - ref).abs().max()
    assert err_before > 0.2 and err_after < 0.15 * err_before  # border zeros are the residual
    assert torch.equal(new["c2.weight"], noisy["c2.weight"])  # weights untouched


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.c(x) if x.sum() > 0 else x

    with pytest.raises(ArchitectureError, match="traceable"):
        input_moments(Branchy())
