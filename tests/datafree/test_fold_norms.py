import pytest
import torch
from torch import nn

from legonet.calibrate.pipeline import calibrated_compress
from legonet.config import LegoConfig, RefineConfig, TargetConfig
from legonet import compress
from legonet.datafree import batchnorm_eps, fold_batchnorm_statistics
from legonet.datafree.fold_norms import (
    fold_norm_scales_into_gains,
    fold_planned_scales,
    norms_after_layers,
    unit_scales,
)
from legonet.datafree.pipeline import datafree_compress
from legonet.errors import ConfigError
from legonet.format import serialize
from legonet.io.checkpoints import read_state_dict
from legonet.zoo import build
from tests.nets import conv_bn_net

MENU = (((4, 4), 16), ((2, 2), 16), ((1, 2), 64))


def _net(eps: float = 1e-5) -> nn.Module:
    return conv_bn_net(16, eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_folding_keeps_eval_outputs_and_leaves_constant_statistics(eps):
    m = _net(eps)
    x = torch.randn(8, 3, 8, 8)
    ref = m(x)
    sd = dict(m.state_dict())
    assert fold_batchnorm_statistics(sd, batchnorm_eps(m)) == ["1", "4"]
    assert not sd["1.running_mean"].any() and torch.equal(sd["1.running_var"], torch.full((16,), 1 - eps))
    m.load_state_dict(sd)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    again = dict(sd)
    assert fold_batchnorm_statistics(again, batchnorm_eps(m)) == []  # already in inference form
    assert all(again[k] is sd[k] for k in sd)


def test_folding_needs_every_part_dense():
    m = _net()
    sd = dict(m.state_dict())
    del sd["4.running_var"]
    assert fold_batchnorm_statistics(sd, batchnorm_eps(m)) == ["1"]
    assert batchnorm_eps(nn.Sequential(nn.BatchNorm2d(3, affine=False))) == {}


def test_datafree_pipeline_spends_the_freed_bytes_on_weights_and_keeps_the_ratio(resnet20_path):
    model = build("resnet20")
    sd = read_state_dict(resnet20_path)
    folded, _ = datafree_compress(model, 8.0, sd)
    plain, _ = datafree_compress(model, 8.0, sd, config=TargetConfig(fold_norms=False))
    for cm in (folded, plain):
        assert cm.report().ratio >= 8.0
    rep_f, rep_p = folded.report(), plain.report()
    assert rep_f.kept_bytes < rep_p.kept_bytes
    assert rep_f.index_bytes + rep_f.codebook_bytes > rep_p.index_bytes + rep_p.codebook_bytes
    assert any(e[3] == "fill" for e in _entries(folded))


def _entries(cm):
    import json
    import struct
    import zlib

    data = serialize(cm)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    off = header["legonet.meta"]["data_offsets"]
    meta = data[8 + n + off[0] : 8 + n + off[1]]
    if header["__metadata__"]["version"] in ("3", "4"):  # target mode's files: compressed metadata
        meta = zlib.decompress(meta)
    return json.loads(meta)["tensors"]


def test_calibrated_pipeline_folds_after_batchnorm_reestimation():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    cm, _, _ = calibrated_compress(model, 5.0, calib, menu=MENU,
                                  config=TargetConfig(refine=RefineConfig(epochs=1, batch_size=32)))
    assert cm.report().ratio >= 5.0
    for bn in ("1", "4"):
        assert not cm.tensors[f"{bn}.running_mean"].any()
        assert torch.equal(cm.tensors[f"{bn}.running_var"], torch.full((16,), 1 - 1e-5).half())
    # the model now holds the compressed weights in inference form: same outputs as the file's
    student = _net()
    cm.load_into(student)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(student(x), model(x))


def test_calibrated_pipeline_gives_the_outputs_of_the_unfolded_pipeline():
    # one menu entry: both runs cluster alike, so they differ only in how BatchNorm is stored
    calib, x = torch.randn(64, 3, 8, 8), torch.randn(16, 3, 8, 8)
    outs = []
    for fold in (False, True):
        model = _net()
        calibrated_compress(model, 4.0, calib, menu=(((2, 2), 16),), config=TargetConfig(refine=None, fold_norms=fold))
        outs.append(model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)


class _Fork(nn.Module):
    """A convolution whose output feeds a BatchNorm and a second branch: its scale cannot move."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.a(x)
        return self.bn_b(self.b(self.bn_a(y))) + y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.c(x)) if float(x.sum()) > 0 else x  # data-dependent control flow


def test_pairs_are_norms_fed_by_one_layer_only():
    assert norms_after_layers(_net()) == {"1": "0", "4": "3"}
    assert norms_after_layers(_Fork()) == {"bn_b": "b"}  # ``a`` also feeds the addition
    assert norms_after_layers(_Untraceable()) == {}
    assert norms_after_layers(build("resnet20"))["layer1.0.bn1"] == "layer1.0.conv1"


def _folded_compressed(model):
    sd = dict(model.state_dict())
    fold_batchnorm_statistics(sd, batchnorm_eps(model))
    cm = compress(sd, LegoConfig(scope="layer", block=(2, 2), clusters=16, scales="row", codebook_dtype="float16",
                                 include=("0.weight", "3.weight")))
    return cm


def test_folding_scales_into_gains_keeps_the_outputs_and_stores_unit_scales():
    model = _net()
    with torch.no_grad():
        model[4].weight[:3] *= -1  # negative scales move as negative gains
    cm = _folded_compressed(model)
    x = torch.randn(8, 3, 8, 8)
    before = _net()
    cm.load_into(before)
    ref = before(x)
    gains = cm.tensors["3.weight"].scale.clone()
    assert fold_norm_scales_into_gains(cm, {"1": "0", "4": "3"}) == ["1", "4"]
    for bn in ("1", "4"):
        assert torch.equal(cm.tensors[f"{bn}.weight"], torch.ones(16))
    assert bool((cm.tensors["3.weight"].scale[:3] < 0).all()) and bool((gains > 0).all())
    after = _net()
    cm.load_into(after)
    torch.testing.assert_close(after(x), ref, rtol=2e-3, atol=2e-3)  # float16 rounding of the products
    # the unit scales are written as fills: the file shrinks by 2 bytes per channel, less the fill entries
    assert sum(e[3] == "fill" for e in _entries(cm)) == 6


def test_pairs_that_cannot_fold_are_left_and_reported():
    model = _net()
    cm = _folded_compressed(model)
    cm.tensors["4.running_mean"] = torch.full((16,), 0.1)  # not in inference form
    assert fold_norm_scales_into_gains(cm, {"1": "0", "4": "3"}) == ["1"]
    assert not torch.equal(cm.tensors["4.weight"], torch.ones(16))
    with pytest.raises(ConfigError, match="BatchNorm '4'.*'3'"):
        fold_planned_scales(cm, {"4": "3"})
    plain = compress(dict(model.state_dict()), LegoConfig(block=2, clusters=16, include=("0.weight",)))
    assert fold_norm_scales_into_gains(plain, {"1": "0"}) == []  # no row gains to carry the scale
    big = _folded_compressed(model)
    big.tensors["1.weight"] = torch.full((16,), 1e30)
    assert fold_norm_scales_into_gains(big, {"1": "0"}) == []  # beyond float16


def test_unit_scales_is_a_planning_copy():
    sd = dict(_net().state_dict())
    planned = unit_scales(sd, {"1": "0"})
    assert torch.equal(planned["1.weight"], torch.ones(16)) and not torch.equal(sd["1.weight"], torch.ones(16))
    assert planned["4.weight"] is sd["4.weight"]


def test_pipelines_store_every_batchnorm_scale_in_the_gains(resnet20_path):
    model = build("resnet20")
    sd = read_state_dict(resnet20_path)
    cm, _ = datafree_compress(model, 8.0, sd)
    assert cm.report().ratio >= 8.0
    norms = [k for k in sd if k.endswith("bn1.weight") or k.endswith("bn2.weight")]
    assert norms and all(torch.equal(cm.tensors[k].float(), torch.ones_like(cm.tensors[k].float())) for k in norms)
    fills = {e[0] for e in _entries(cm) if e[3] == "fill"}
    assert set(norms) <= fills
