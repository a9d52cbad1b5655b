import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.calibrate.layer_fit import fit_layer_outputs, propagated_targets
from legonet.config import LayerFitConfig, TargetConfig
from legonet.calibrate.pipeline import calibrated_compress
from legonet.calibrate.stats import (
    _input_rows,
    covariance_layers,
    input_covariances,
    input_second_moments,
    input_statistics,
    paired_input_statistics,
)
from legonet.compact import RECODE_RESERVE
from legonet.runlog import RunLog
from legonet.errors import ConfigError
from legonet.format import deserialize
from legonet.ops.scalar_codes import codebook_levels, gain_levels
from legonet.target import compress_to_ratio
from tests.nets import conv_bn_net

MENU = (((4, 4), 16), ((2, 2), 16), ((1, 2), 64))


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, dilation=1),
    dict(kernel_size=(3, 2), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, dilation=2, padding=2, padding_mode="circular"),
])
def test_conv_covariance_is_over_receptive_fields_in_weight_column_order(conv):
    torch.manual_seed(0)
    m = nn.Conv2d(3, 5, bias=False, **conv)
    x = torch.randn(4, 3, 7, 7)
    h = input_covariances(m, [x], ["weight"], rows_per_batch=10**6)["weight"]
    # E[x x^T] must satisfy E|W x|^2 = mean over outputs of |out|^2 for any W: check with the layer itself
    w2 = m.weight.reshape(5, -1)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(torch.diagonal(w2 @ h @ w2.T), out.pow(2).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(1, 3), padding=(0, 2), padding_mode="reflect"),
    dict(kernel_size=3, dilation=2, padding=2),
])
def test_subsampled_conv_rows_are_distinct_receptive_fields_drawn_by_the_seed(conv):
    torch.manual_seed(0)
    m = nn.Conv2d(3, 2, bias=False, **conv)
    x = torch.randn(2, 3, 8, 9)
    every = _input_rows(m, x)  # (positions, cols): checked against the layer's output above
    with torch.no_grad():
        out = m(x)
    assert every.shape == (out.shape[0] * out.shape[2] * out.shape[3], 3 * m.kernel_size[0] * m.kernel_size[1])
    drawn = _input_rows(m, x, torch.Generator().manual_seed(4), 7)
    again = _input_rows(m, x, torch.Generator().manual_seed(4), 7)
    assert drawn.shape == (7, every.shape[1]) and torch.equal(drawn, again)
    match = torch.cdist(drawn, every).argmin(1)
    torch.testing.assert_close(drawn, every[match])
    assert len(set(match.tolist())) == 7


def test_linear_covariance_flattens_tokens_and_subsamples_deterministically():
    m = nn.Linear(6, 2)
    x = torch.randn(3, 50, 6)
    full = input_covariances(m, [x], ["weight"], rows_per_batch=10**6)["weight"]
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(full, flat.T @ flat / 150)
    a = input_covariances(m, [x], ["weight"], rows_per_batch=40, seed=1)["weight"]
    b = input_covariances(m, [x], ["weight"], rows_per_batch=40, seed=1)["weight"]
    assert torch.equal(a, b) and not torch.allclose(a, full)


def _conv_grouped_linear():
    """A Conv2d, a grouped Conv2d and a Linear, two batches for it, and its weights' names."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                      nn.Linear(4 * 5 * 5, 3))
    x = [torch.randn(4, 3, 7, 7), torch.randn(4, 3, 7, 7)]
    names = ["0.weight", "2.weight", "4.weight"]
    return m, x, names


def test_one_pass_gives_the_same_moments_and_covariances_as_two():
    m, x, names = _conv_grouped_linear()
    moments, covs = input_statistics(m, x, names, covariance_rows=50, seed=3)
    assert moments.keys() == input_second_moments(m, x, names).keys()
    assert all(torch.equal(moments[n], input_second_moments(m, x, names)[n]) for n in moments)
    alone = input_covariances(m, x, names, rows_per_batch=50, seed=3)
    assert covs.keys() == alone.keys() == {"0.weight", "4.weight"}
    assert all(torch.equal(covs[n], alone[n]) for n in covs)
    assert input_statistics(m, x, names)[1] == {}


def test_grouped_convolutions_and_other_layers_get_no_covariance():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Embedding(3, 2))
    assert covariance_layers(m, ["0.weight", "1.weight", "3.weight"]) == ["1.weight"]
    with pytest.raises(ConfigError, match="no calibration batch"):
        input_covariances(m[:2], [], ["1.weight"])


def _compressed(seed=0):
    torch.manual_seed(seed)
    model = conv_bn_net(32)
    calib = torch.randn(96, 3, 8, 8)
    names = [n for n, t in model.state_dict().items() if t.ndim >= 2]
    cm, _ = compress_to_ratio(model, 10.0, config=TargetConfig(seed=seed), menu=MENU)
    return model, calib, names, cm


def test_fit_lowers_the_output_error_keeps_indices_and_the_file_size():
    model, calib, names, cm = _compressed()
    covs = input_covariances(model, [calib], names)
    indices = {n: ct.indices.clone() for n, ct in cm.clustered.items()}
    size = len(cm.to_bytes())
    res = fit_layer_outputs(cm, model.state_dict(), covs, LayerFitConfig(reassign=False))
    assert res.fitted == len(covs) == res.clustered
    assert res.error_after < 0.9 * res.error_before
    assert all(torch.equal(indices[n], ct.indices) for n, ct in cm.clustered.items())
    # only the SQNR text and the 8-bit codes' fixed-width fields in the compressed metadata change
    assert abs(len(cm.to_bytes()) - size) <= (8 + RECODE_RESERVE) * res.fitted
    assert cm.codebook_scales  # at 10x some tensors are stored compactly: their codes must hold too
    for i, cb in enumerate(cm.codebooks):  # values stay storable: on their int8 grid, or as float16
        if i in cm.codebook_scales:
            assert codebook_levels(cb, cm.codebook_scales[i]) is not None
        else:
            assert torch.equal(cb, cb.half().float())
    for ct in cm.clustered.values():
        if ct.gain_code is not None:
            assert gain_levels(ct.scale, *ct.gain_code) is not None
        else:
            assert torch.equal(ct.scale, ct.scale.half().float())
        assert bool((ct.scale > 0).all())


def test_reassigning_indices_with_error_feedback_lowers_the_error_further():
    model, calib, names, cm = _compressed()
    covs = input_covariances(model, [calib], names)
    kept = copy.deepcopy(cm)
    size = len(cm.to_bytes())
    fixed = fit_layer_outputs(kept, model.state_dict(), covs, LayerFitConfig(reassign=False))
    moved = fit_layer_outputs(cm, model.state_dict(), covs)
    assert moved.error_before == pytest.approx(fixed.error_before)
    assert moved.error_after < 0.9 * fixed.error_after
    changed = [n for n, ct in cm.clustered.items() if not torch.equal(ct.indices, kept.clustered[n].indices)]
    assert changed
    for n in changed:  # the new indices are what the file stores and what the model computes with
        assert cm.clustered[n].indices.dtype == kept.clustered[n].indices.dtype
    assert abs(len(cm.to_bytes()) - size) <= 8 * moved.fitted
    assert torch.equal(deserialize(cm.to_bytes()).clustered[changed[0]].indices,
                       cm.clustered[changed[0]].indices)


def test_tensors_without_covariance_are_left_as_they_are():
    model, calib, names, cm = _compressed()
    covs = input_covariances(model, [calib], names)
    skip = names[0]
    del covs[skip]
    before = cm.codebooks[cm.clustered[skip].codebook].clone()
    indices = cm.clustered[skip].indices.clone()
    res = fit_layer_outputs(cm, model.state_dict(), covs)
    assert res.fitted == len(names) - 1
    assert torch.equal(cm.codebooks[cm.clustered[skip].codebook], before)
    assert torch.equal(cm.clustered[skip].indices, indices)


def test_a_singular_covariance_without_damping_is_named():
    model, calib, names, cm = _compressed()
    covs = input_covariances(model, [calib], names)
    cols = covs[names[1]].shape[0]
    covs[names[1]] = torch.zeros(cols, cols)  # an input that is always zero
    with pytest.raises(ConfigError, match=names[1].replace(".", r"\.") + ".*singular"):
        fit_layer_outputs(cm, model.state_dict(), covs, LayerFitConfig(damp=0.0))


def test_a_covariance_of_the_wrong_size_is_named():
    model, calib, names, cm = _compressed()
    covs = input_covariances(model, [calib], names)
    covs[names[1]] = torch.eye(3)
    with pytest.raises(ConfigError, match=names[1].replace(".", r"\.")):
        fit_layer_outputs(cm, model.state_dict(), covs)


@pytest.mark.parametrize("bad", [dict(rounds=0), dict(cg_iters=1.5), dict(damp=-0.1), dict(rows_per_batch=True),
                                 dict(reassign="yes"), dict(propagate=1), dict(propagate_damp=2.0)])
def test_layer_fit_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        LayerFitConfig(**bad)


def test_pipeline_fits_layers_by_default_and_brings_the_logits_closer():
    torch.manual_seed(0)
    model = conv_bn_net(32)
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)

    def logit_error(options):
        m = copy.deepcopy(model)
        cm, _, res = calibrated_compress(m, 10.0, calib, menu=MENU, config=TargetConfig(refine=None, **options))
        student = conv_bn_net(32)
        cm.load_into(student)
        with torch.no_grad():
            return float(F.mse_loss(student.eval()(held_out), model.eval()(held_out))), res

    fitted, res = logit_error({})
    plain, none = logit_error({"layer_fit": None})
    assert res.layer_fit is not None and res.layer_fit.fitted > 0 and none.layer_fit is None
    assert fitted < plain


def test_paired_statistics_of_one_model_are_its_covariances():
    m, x, names = _conv_grouped_linear()
    h, c = paired_input_statistics(m, copy.deepcopy(m), x, names, rows_per_batch=50, seed=3)
    alone = input_covariances(m, x, names, rows_per_batch=50, seed=3)
    assert h.keys() == c.keys() == alone.keys() == {"0.weight", "4.weight"}
    for n in alone:
        torch.testing.assert_close(h[n], alone[n])
        torch.testing.assert_close(c[n], alone[n])


def test_paired_statistics_pair_the_same_inputs_of_both_models():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 2))
    other = copy.deepcopy(m)
    with torch.no_grad():
        other[0].weight.add_(0.1 * torch.randn(6, 5))
    x = torch.randn(40, 5)
    h, c = paired_input_statistics(m, other, [x[:20], x[20:]], ["1.weight"], rows_per_batch=10**6)
    with torch.no_grad():
        xo, xc = m[0](x), other[0](x)
    torch.testing.assert_close(h["1.weight"], xc.T @ xc / 40)
    torch.testing.assert_close(c["1.weight"], xc.T @ xo / 40)


def test_propagated_targets_undo_what_the_layers_before_changed():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    x = torch.randn(500, 4)
    mix = torch.eye(4) + 0.3 * torch.randn(4, 4)  # the compressed network's input: x~ = x mix^T
    xc = x @ mix.T
    h, c = xc.T @ xc / 500, xc.T @ x / 500
    v = propagated_targets({"w": w}, {"w": h}, {"w": c}, damp=0.0)["w"]
    torch.testing.assert_close(xc @ v.T, x @ w.T, rtol=1e-4, atol=1e-4)
    # the ridge pulls the target toward the original weight, all the way as it grows
    near = propagated_targets({"w": w}, {"w": h}, {"w": c}, damp=1e6)["w"]
    torch.testing.assert_close(near, w, rtol=1e-3, atol=1e-3)
    same = propagated_targets({"w": w}, {"w": x.T @ x / 500}, {"w": x.T @ x / 500}, damp=0.3)["w"]
    torch.testing.assert_close(same, w, rtol=1e-4, atol=1e-4)


def test_the_propagated_fit_brings_held_out_logits_closer_and_keeps_the_file_size():
    torch.manual_seed(0)
    model = conv_bn_net(32)
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)

    def run(propagate):
        m, log = copy.deepcopy(model), RunLog()
        cfg = TargetConfig(refine=None, layer_fit=LayerFitConfig(propagate=propagate))
        cm, _, _ = calibrated_compress(m, 10.0, calib, menu=MENU, config=cfg, log=log)
        with torch.no_grad():
            return float(F.mse_loss(m.eval()(held_out), model.eval()(held_out))), cm, [s for s, _ in log.steps]

    (again, cm, steps), (once, _, plain) = run(True), run(False)
    assert "propagated layer fit" in steps and "propagated layer fit" not in plain
    assert steps.count("BatchNorm re-estimation") == 2
    assert again < once
    assert len(cm.to_bytes()) <= int(sum(t.numel() * 4 for t in model.state_dict().values()
                                         if t.is_floating_point()) / 10.0)
