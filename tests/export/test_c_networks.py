"""C export of CNNs traced by torch.fx: tiny networks built in code, compressed in target mode (mixed
settings, compact storage, entropy coding) and plainly (4x4, K=32), written to .lego and read back;
the compiled C's logits equal PyTorch's on the reconstructed weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import legonet
from legonet.artifact import fills
from legonet.compact import store_compact
from legonet.data import to_input
from legonet.errors import ArchitectureError
from legonet.export.c import export_c, generate
from legonet.export.c.firmware import build_host, run_host
from legonet.format import load
from legonet.target import compress_to_ratio
from tests.export.cnn_models import FunctionalNet, MixedOpsNet, TinyMobileNetV2, randomize_batchnorm

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
NETS = {"mobilenet_v2": (TinyMobileNetV2, 16), "mixed_ops": (MixedOpsNet, 17), "functional": (FunctionalNet, 12)}
PLAIN = legonet.LegoConfig(block=4, clusters=32, kmeans=legonet.KMeansConfig(max_iters=10))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """k-means on these tiny tensors is slower with several threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(NETS[name][0]())


def _roundtrip(cm: legonet.CompressedModel, path) -> legonet.CompressedModel:
    cm.save(path)
    return load(path)


def _images(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def check_against_pytorch(cm: legonet.CompressedModel, name: str, out, model_dtype=torch.float32) -> np.ndarray:
    """Export ``cm`` for network ``name``, compile (-O1), run on 4 images; assert agreement; return logits."""
    cls, size = NETS[name]
    export_c(cm, cls(), out, (3, size, size))
    images = _images(size)
    c_logits = run_host(build_host(out, "-O1"), images)
    model = cm.load_into(cls()).eval()
    with torch.no_grad():
        ref = model(to_input(images, (0.0,) * 3, (1.0,) * 3)).numpy()
    assert c_logits.shape == ref.shape
    np.testing.assert_allclose(c_logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (c_logits.argmax(1) == ref.argmax(1)).all()
    return c_logits


@pytest.fixture(scope="module", params=sorted(NETS))
def target_mode(request, tmp_path_factory):
    cm, _ = compress_to_ratio(_model(request.param), 8)
    return request.param, _roundtrip(cm, tmp_path_factory.mktemp("lego") / "t.lego")


@needs_gcc
def test_target_mode_files_run_in_c(target_mode, tmp_path):
    name, cm = target_mode
    assert cm.config.entropy_coding and cm.config.compact_storage
    settings = {(ct.block, cm.codebooks[ct.codebook].shape[0]) for ct in cm.clustered.values()}
    assert len(settings) > 1  # mixed block shapes / K
    check_against_pytorch(cm, name, tmp_path)


@needs_gcc
@pytest.mark.parametrize("name", sorted(NETS))
def test_plain_files_run_in_c(name, tmp_path):
    cm = _roundtrip(legonet.compress(_model(name), PLAIN), tmp_path / "p.lego")
    check_against_pytorch(cm, name, tmp_path / "c")


@needs_gcc
def test_compact_storage_and_log_coded_gains(tmp_path):
    cm, _ = compress_to_ratio(_model("mixed_ops"), 8)
    store_compact(cm, list(cm.clustered))  # every codebook int8, every gain vector 8-bit log-coded
    cm = _roundtrip(cm, tmp_path / "c.lego")
    assert len(cm.codebook_scales) == len(cm.codebooks) and all(ct.gain_code for ct in cm.clustered.values())
    _, info = generate(cm, MixedOpsNet(), (3, 17, 17))
    assert info.codebook_bytes == sum(b.numel() for b in cm.codebooks)  # one byte per centroid value
    rows = sum(ct.shape[0] for ct in cm.clustered.values())
    assert rows < info.scale_bytes < 2 * rows + 4 * 128 * len(cm.clustered)  # a byte per row plus level tables
    check_against_pytorch(cm, "mixed_ops", tmp_path / "c")


@needs_gcc
@pytest.mark.parametrize("kept", ["float16", "keep"])
def test_kept_weight_tensors(kept, tmp_path):
    """Weights kept dense (not clustered), in float16 or float32, beside clustered ones."""
    config = legonet.LegoConfig(block=4, clusters=32, kept_dtype=kept, exclude=("stem.*", "classifier.*"),
                                kmeans=legonet.KMeansConfig(max_iters=5))
    cm = _roundtrip(legonet.compress(_model("mobilenet_v2"), config), tmp_path / "k.lego")
    assert cm.tensors["stem.0.weight"].dtype == (torch.float16 if kept == "float16" else torch.float32)
    check_against_pytorch(cm, "mobilenet_v2", tmp_path / "c")


@needs_gcc
def test_constant_tensors_written_as_fills(tmp_path):
    model = _model("functional")
    model.bn.running_mean.fill_(0.0)
    model.bn.running_var.fill_(1.0)
    cm = legonet.compress(model, PLAIN)
    assert {"bn.running_mean", "bn.running_var"} <= set(fills(cm.tensors))  # the file stores them as one value
    check_against_pytorch(_roundtrip(cm, tmp_path / "f.lego"), "functional", tmp_path / "c")


@needs_gcc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_with_row_gains(dtype, tmp_path):
    """Clustered tensors of a float16/bfloat16 model: the decode rounds gain x centroid to that dtype."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _model("mobilenet_v2").state_dict().items()}
    config = legonet.LegoConfig(block=(1, 4), clusters=16, scales="row", kmeans=legonet.KMeansConfig(max_iters=5))
    cm = _roundtrip(legonet.compress(sd, config), tmp_path / "h.lego")
    assert all(ct.dtype == dtype and ct.scale is not None for ct in cm.clustered.values())
    check_against_pytorch(cm, "mobilenet_v2", tmp_path / "c")


def test_memory_plan_reuses_and_works_in_place():
    cm = legonet.compress(_model("mobilenet_v2"), PLAIN)
    files, info = generate(cm, TinyMobileNetV2(), (3, 16, 16))
    # peak: a block's input (24x16x16, kept for the residual) beside its expanded and depthwise
    # outputs (96x16x16 each); BatchNorm and ReLU6 are folded into the convolutions, the residual
    # add writes over the projection's output
    assert info.activation_bytes == 4 * (24 + 96 + 96) * 16 * 16
    assert info.activation_bytes < info.activation_sum_bytes / 2
    body = files["model.c"].split("void legonet_infer")[1]
    assert "lg_pointwise" not in body  # every BatchNorm and activation was fused
    add = next(line for line in body.splitlines() if line.strip().startswith("lg_binary"))
    args = [a.strip() for a in add.split("(", 1)[1].split(",")]
    assert args[2] in args[:2]  # in place


class _Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return F.gelu(self.conv(x)).mean((2, 3))


class _Permute(_Gelu):
    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class _OffsetConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1.0


class _OffsetNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _OffsetConv(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("cls, words", [(_Gelu, ["'gelu'", "gelu"]), (_Permute, ["'permute'", "Tensor.permute"]),
                                        (_OffsetNet, ["'conv'", "_OffsetConv", "overrides forward"])])
def test_unsupported_op_is_one_line_naming_the_node(cls, words, tmp_path):
    cm = legonet.compress(cls(), legonet.LegoConfig(block=2, clusters=4, kmeans=legonet.KMeansConfig(max_iters=2)))
    with pytest.raises(ArchitectureError) as err:
        export_c(cm, cls(), tmp_path / "x", (3, 8, 8))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "x").exists()


def test_module_needs_its_input_shape():
    cm = legonet.compress(_Gelu(), legonet.LegoConfig(block=2, clusters=4, kmeans=legonet.KMeansConfig(max_iters=2)))
    with pytest.raises(ArchitectureError, match="input shape"):
        generate(cm, _Gelu())
