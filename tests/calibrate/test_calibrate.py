import copy

import torch
from torch import nn

from legonet.calibrate.bn import reestimate_batchnorm
from legonet.calibrate.pipeline import calibrated_compress_to_ratio
from legonet.calibrate.stats import input_second_moments


def test_bn_reestimation_matches_the_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    x = torch.randn(64, 3, 5, 5) * 3 + 1
    reestimate_batchnorm(m, [x[:32], x[32:]])
    with torch.no_grad():
        y = m[0](x)
    torch.testing.assert_close(m[1].running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m[1].running_var, y.var((0, 2, 3)), rtol=1e-2, atol=1e-3)
    assert not m.training and m[1].momentum == 0.1


def test_input_second_moments_layout():
    m = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 3 * 3, 2),)
    m[0].weight.data.zero_()
    x = torch.zeros(8, 2, 5, 5)
    x[:, 1] = 2.0  # channel 1 has E[x^2] = 4, channel 0 has 0
    mom = input_second_moments(m, [x], ["0.weight", "2.weight"])
    w = mom["0.weight"]
    assert w.shape == (1, 18)
    assert torch.all(w[0, 9:] > 100 * w[0, :9])  # columns of channel 1 (kernel positions 9..17)
    assert mom["2.weight"].shape == (1, 36)


def test_grouped_conv_moments_per_row_group():
    m = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    x = torch.zeros(2, 4, 3, 3)
    x[:, 0] = 1.0
    x[:, 3] = 3.0
    w = input_second_moments(m, [x], ["weight"])["weight"]
    assert w.shape == (4, 2)
    assert w[0, 0] > w[0, 1] and w[2, 1] > w[2, 0]  # group 0 sees channels 0,1; group 1 sees 2,3


def test_calibrated_pipeline_runs_and_updates_bn(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, bias=False),
                      nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    calib = torch.randn(32, 3, 8, 8)
    before = m[4].running_mean.clone()
    menu = (((4, 4), 16), ((2, 2), 16), ((1, 2), 64))
    kept, _ = calibrated_compress_to_ratio(copy.deepcopy(m), 8.0, calib, menu=menu, fold_norms=False, refine=None)
    assert not torch.equal(kept.tensors["4.running_mean"].float(), before)
    # folded (the default): the re-estimated statistics live in the bias and, for the scale, in the
    # row gains of the convolution before
    cm, plan = calibrated_compress_to_ratio(m, 8.0, calib, menu=menu)
    assert not cm.tensors["4.running_mean"].any()
    assert torch.equal(cm.tensors["4.weight"].float(), torch.ones(32))
    assert not torch.equal(cm.tensors["4.bias"].float(), kept.tensors["4.bias"].float())
    assert set(plan) == set(cm.clustered)
    fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in m.state_dict().values())
    assert fp32 / cm.save(tmp_path / "c.lego") >= 8.0
