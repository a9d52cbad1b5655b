import pytest
import torch
from torch import nn

from legonet.calibrate.pipeline import calibrated_compress
from legonet.calibrate.refine import RefineConfig
from legonet.datafree import batchnorm_eps, fold_batchnorm_statistics
from legonet.datafree.pipeline import datafree_compress
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
    plain, _ = datafree_compress(model, 8.0, sd, fold_norms=False)
    for cm in (folded, plain):
        assert cm.report().ratio >= 8.0
    rep_f, rep_p = folded.report(), plain.report()
    assert rep_f.kept_bytes < rep_p.kept_bytes
    assert rep_f.index_bytes + rep_f.codebook_bytes > rep_p.index_bytes + rep_p.codebook_bytes
    assert any(e[3] == "fill" for e in _entries(folded))


def _entries(cm):
    import json
    import struct

    data = serialize(cm)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    off = header["legonet.meta"]["data_offsets"]
    return json.loads(data[8 + n + off[0] : 8 + n + off[1]])["tensors"]


def test_calibrated_pipeline_folds_after_batchnorm_reestimation():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    cm, _, _ = calibrated_compress(model, 5.0, calib, menu=MENU, refine=RefineConfig(epochs=1, batch_size=32))
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
        calibrated_compress(model, 4.0, calib, menu=(((2, 2), 16),), refine=None, fold_norms=fold)
        outs.append(model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
