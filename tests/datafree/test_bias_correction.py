import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.datafree.bias_correction import (
    Moments,
    _activation_moments,
    _relu_moments,
    correct_bias,
    input_moments,
)
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


def _sampled(fn, mean, var, n=400_000):
    z = mean + var.sqrt() * torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(0))
    y = fn(z)
    return y.mean(0), y.var(0)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(-0.5, 2.0), F.relu6, nn.SiLU(), nn.GELU(),
                                 nn.GELU(approximate="tanh"), nn.Hardswish(), F.silu, torch.sigmoid, nn.LeakyReLU(0.1)],
                         ids=lambda a: getattr(a, "__name__", type(a).__name__))
def test_activation_moments_match_sampling(act):
    mean, var = torch.tensor([-3.0, -0.4, 0.0, 0.7, 5.5]), torch.tensor([0.5, 1.0, 4.0, 2.0, 1.5])
    m = _activation_moments(act, (), {}, Moments(mean, var))
    ref_mean, ref_var = _sampled(act, mean, var)
    torch.testing.assert_close(m.mean, ref_mean, rtol=0, atol=1e-2)
    torch.testing.assert_close(m.var, ref_var, rtol=2e-2, atol=1e-2)


def test_activation_options_are_used_or_declined():
    src = Moments(torch.tensor([0.3, -1.0]), torch.tensor([1.0, 2.0]))
    clipped = _activation_moments(F.hardtanh, (0.0, 1.0), {}, src)
    ref_mean, _ = _sampled(lambda z: z.clamp(0.0, 1.0), src.mean, src.var)
    torch.testing.assert_close(clipped.mean, ref_mean, rtol=0, atol=1e-2)
    leaky = _activation_moments(F.leaky_relu, (), {"negative_slope": 0.3, "inplace": False}, src)
    torch.testing.assert_close(leaky.mean, _sampled(lambda z: F.leaky_relu(z, 0.3), src.mean, src.var)[0],
                               rtol=0, atol=1e-2)
    assert _activation_moments(nn.SiLU(), (), {}, Moments(src.mean, None)) is None  # variance unknown


class MobileBlock(nn.Module):
    """Depthwise-separable blocks with ReLU6 and SiLU, a spatial-mean head (as MobileNets are written)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu6(self.bn_dw(self.dw(self.stem(x))))
        y = F.silu(self.bn_pw(self.pw(y)))
        return self.fc(y.mean((2, 3)))


def test_moments_reach_every_layer_after_relu6_silu_and_a_spatial_mean():
    assert sorted(input_moments(MobileBlock())) == ["dw", "fc", "pw"]


def test_mean_over_the_channel_axis_is_not_taken_for_a_spatial_mean():
    class Head(MobileBlock):
        def forward(self, x):
            y = F.relu6(self.bn_dw(self.dw(self.stem(x))))
            return self.fc(self.bn_pw(self.pw(y)).mean(1).flatten(1)[:, :16])

    assert "fc" not in input_moments(Head())


def test_correction_after_relu6_cancels_the_shift_of_a_depthwise_layer():
    torch.manual_seed(0)
    m = MobileBlock().eval()
    with torch.no_grad():
        for bn in (m.stem[1], m.bn_dw, m.bn_pw):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 3.0)
            bn.running_mean.uniform_(-0.3, 0.3)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    noisy = dict(sd)
    noisy["pw.weight"] = sd["pw.weight"] + 0.05
    noisy["dw.weight"] = sd["dw.weight"] - 0.04
    new, rep = correct_bias(m, sd, noisy)
    assert set(rep.corrected) == {"dw.weight", "pw.weight"} and rep.uncorrected == ()
    # the stem's BatchNorm output is N(beta, gamma^2) by construction: feed it directly
    g = torch.Generator().manual_seed(1)
    z = sd["stem.1.bias"][None, :, None, None] + sd["stem.1.weight"][None, :, None, None] * \
        torch.randn(256, 8, 16, 16, generator=g)

    def pre_norm_mean(state, layer):
        net = MobileBlock().eval()
        net.load_state_dict(state)
        with torch.no_grad():
            y = net.bn_dw(net.dw(F.relu6(z)))
            return y.mean((0, 2, 3)) if layer == "dw" else net.bn_pw(net.pw(F.relu6(y))).mean((0, 2, 3))

    for layer in ("dw", "pw"):
        ref = pre_norm_mean(sd, layer)
        err_before = (pre_norm_mean(noisy, layer) - ref).abs().max()
        err_after = (pre_norm_mean(new, layer) - ref).abs().max()
        assert err_before > 0.1 and err_after < 0.3 * err_before, (layer, err_before, err_after)


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
