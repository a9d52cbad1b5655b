import copy

import pytest
import torch
from torch import nn

from legonet.calibrate.bn import reestimate_batchnorm
from legonet.calibrate.pipeline import calibrated_compress
from legonet.calibrate.stats import input_second_moments
from legonet.config import RefineConfig, TargetConfig
from legonet.errors import ConfigError
from tests.marks import needs_cuda
from tests.nets import conv_bn_net


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
    kept, _, _ = calibrated_compress(copy.deepcopy(m), 8.0, calib, menu=menu,
                                     config=TargetConfig(fold_norms=False, refine=None))
    assert not torch.equal(kept.tensors["4.running_mean"].float(), before)
    # folded (the default): the re-estimated statistics live in the bias and, for the scale, in the
    # row gains of the convolution before
    cm, plan, _ = calibrated_compress(m, 8.0, calib, menu=menu)
    assert not cm.tensors["4.running_mean"].any()
    assert torch.equal(cm.tensors["4.weight"].float(), torch.ones(32))
    assert not torch.equal(cm.tensors["4.bias"].float(), kept.tensors["4.bias"].float())
    assert set(plan) == set(cm.clustered)
    fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in m.state_dict().values())
    assert fp32 / cm.save(tmp_path / "c.lego") >= 8.0


def _conv_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    for bn in (m[1], m[4]):  # statistics unlike any the calibration images give (as training's would be)
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.5, 4)
    return m.eval()


def test_relative_reestimation_keeps_an_unchanged_models_statistics():
    original = _conv_bn(0)
    student = copy.deepcopy(original)
    x = torch.randn(64, 3, 5, 5)
    reestimate_batchnorm(student, lambda: [x[:32], x[32:]], reference=original)
    for s, o in ((student[1], original[1]), (student[4], original[4])):
        torch.testing.assert_close(s.running_mean, o.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.running_var, o.running_var, rtol=1e-4, atol=1e-5)
    replaced = copy.deepcopy(original)
    reestimate_batchnorm(replaced, [x[:32], x[32:]])
    assert not torch.allclose(replaced[1].running_mean, original[1].running_mean, atol=1e-2)


def test_relative_reestimation_follows_an_affine_change_of_a_layers_output():
    original = _conv_bn(1)
    student = copy.deepcopy(original)
    with torch.no_grad():  # the first convolution's output becomes 2 y + 1 (per channel, exactly)
        student[0].weight.mul_(2)
        student[0].bias.mul_(2).add_(1)
    x = torch.randn(64, 3, 5, 5) * 2 + 1
    reestimate_batchnorm(student, lambda: [x[:32], x[32:]], reference=original)
    torch.testing.assert_close(student[1].running_mean, 2 * original[1].running_mean + 1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student[1].running_var, 4 * original[1].running_var, rtol=1e-4, atol=1e-4)
    # the second BatchNorm sees the same inputs as the original's (the first one undoes the change)
    torch.testing.assert_close(student[4].running_mean, original[4].running_mean, rtol=1e-3, atol=1e-3)
    assert not student.training and not original.training and student[1].momentum == 0.1


def test_relative_reestimation_rejects_a_reference_of_another_shape_and_one_pass_batches():
    original, student = _conv_bn(0), _conv_bn(0)
    x = torch.randn(8, 3, 5, 5)
    with pytest.raises(ConfigError, match="callable"):
        reestimate_batchnorm(student, [x], reference=original)
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ConfigError, match="'4'"):
        reestimate_batchnorm(student, lambda: [x], reference=other)


def test_an_unknown_norm_statistics_mode_is_refused_where_it_is_written():
    with pytest.raises(ConfigError, match="norm_statistics"):
        TargetConfig(norm_statistics="fresh")


@needs_cuda
def test_calibrated_pipeline_with_the_model_on_the_gpu_matches_the_cpu_run(tmp_path):
    # The passes run on the GPU, clustering and the layer fit on the CPU: the same method, so the
    # file meets the ratio and every tensor's SQNR is the CPU run's up to float rounding.
    calib = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for device in ("cpu", "cuda"):
        m = conv_bn_net().to(device)
        cm, _, _ = calibrated_compress(m, 6.0, calib, config=TargetConfig(refine=RefineConfig(epochs=2)))
        assert next(m.parameters()).device.type == device  # the model stays where it was
        runs[device] = cm
    fp32 = sum(4 * t.numel() for t in conv_bn_net().state_dict().values() if t.is_floating_point())
    assert runs["cuda"].save(tmp_path / "gpu.lego") <= fp32 / 6.0
    for name, ct in runs["cpu"].clustered.items():
        assert runs["cuda"].clustered[name].sqnr_db == pytest.approx(ct.sqnr_db, abs=1.0)


def test_channel_grouping_reorders_the_model_and_the_file_alike():
    # The caller's model ends with the compressed weights in the grouped order: it computes what
    # the file computes; without grouping nothing is reordered.
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    menu = (((2, 2), 16), ((1, 2), 64))
    results = {}
    for group in (True, False):
        m = conv_bn_net()
        cm, _, steps = calibrated_compress(m, 6.0, calib, menu=menu,
                                           config=TargetConfig(refine=None, group_channels=group))
        assert steps.grouped_channels == (1 if group else 0)  # conv 0 -> BN -> ReLU -> conv 3
        fresh = cm.load_into(conv_bn_net())
        with torch.no_grad():
            torch.testing.assert_close(m(calib), fresh(calib))
        results[group] = cm
    assert not torch.equal(results[True].tensors["1.bias"], results[False].tensors["1.bias"])
