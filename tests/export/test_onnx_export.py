"""ONNX export that stays compressed: the graph rebuilds each weight from codebook and packed indices."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import legonet
from legonet.artifact import ClusteredTensor, fills
from legonet.compact import store_compact
from legonet.data import load_images, to_input
from legonet.errors import ArchitectureError, ConfigError
from legonet.format import deserialize
from legonet.cli.export import export_onnx_cmd
from legonet.export.onnx import build_onnx, export_onnx
from legonet.export.onnx.builder import GraphBuilder
from legonet.export.onnx.decode import byte_layout, packed_indices
from legonet.io.checkpoints import read_state_dict
from legonet.ops.bitpack import bits_for, pack_bits, packed_nbytes, unpack_bits
from legonet.ops.rans import index_stream
from legonet.target import compress_to_ratio
from legonet.zoo import build, get_arch

DATA = Path(legonet.__file__).parent / "data"
FAST = legonet.KMeansConfig(max_iters=10, max_fit_points=16384)


class SameConv2d(nn.Conv2d):
    """TensorFlow's 'SAME' padding computed from the input size in forward (as EfficientNet ports do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return self._conv_forward(F.pad(x, (left, right, top, bottom)), self.weight, self.bias)


class SmallCNN(nn.Module):
    """3x3, depthwise, 1x1 and grouped convolutions, BatchNorm, a 'SAME' convolution and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)  # fresh statistics: stored as fills
        self.pw = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.same = SameConv2d(32, 24, 4, stride=2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.grouped(self.pw(x)))
        x = torch.relu(self.same(x)).mean((2, 3), keepdim=True)
        return self.fc(x.view(x.shape[0], -1))  # the batch read from the input's shape stays dynamic


# odd, so that -(-11 // 2) (the 'SAME' output size) differs from a division rounding toward zero;
# kernel 4, stride 2: padding 1 before and 2 after
INPUT = (3, 11, 11)


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        # a pruned layer: its skewed index histogram makes entropy coding pay in target mode
        keep = torch.rand(m.grouped.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.2
        m.grouped.weight.mul_(keep)
    return m


def _compress(setting: str, model: nn.Module) -> legonet.CompressedModel:
    if setting == "4x4-k32":
        return legonet.compress(model, legonet.LegoConfig(block=4, clusters=32, kmeans=FAST))
    if setting == "1x2-k256-layer-rows":  # (the excluded tensors have fewer than 256 blocks)
        return legonet.compress(model, legonet.LegoConfig(block=(1, 2), clusters=256, scope="layer", scales="row",
                                                          exclude=("conv.*", "dw.*", "fc.*"), kmeans=FAST))
    cm, _ = compress_to_ratio(model, 8)
    # a tiny network gives the planner little to choose from: store every tensor compactly
    # (int8 codebooks, 8-bit log-coded gains) so that those paths are exported here
    store_compact(cm, list(cm.clustered))
    return cm


@functools.cache
def lego_bytes_of(setting: str) -> bytes:
    """The .lego file of :func:`small_cnn` compressed with ``setting`` (compressed once per run)."""
    return _compress(setting, small_cnn()).to_bytes()


def saved(cm: legonet.CompressedModel, path: Path) -> tuple[legonet.CompressedModel, int]:
    """``cm`` as written to and read back from a .lego file, and the file's size."""
    size = cm.save(path)
    return legonet.load(path), size


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def assert_agrees(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> None:
    ref = torch_logits.numpy()
    assert onnx_logits.shape == ref.shape
    assert np.abs(onnx_logits - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(onnx_logits.argmax(1), ref.argmax(1))


# -- index unpacking ------------------------------------------------------------------------------
@pytest.mark.parametrize("width", range(1, 17))
def test_unpacking_matches_bitpack_for_every_width(width):
    rng = np.random.default_rng(width)
    for count in (1, 37, 64):  # partial last group, whole groups
        idx = rng.integers(0, 1 << width, size=count)
        idx[0] = (1 << width) - 1  # all bits set: the mask must keep every one
        gb = GraphBuilder(onnx, set())
        out = packed_indices(gb, "packed", torch.from_numpy(idx), width)
        graph = onnx.helper.make_graph(gb.nodes, "unpack", [],
                                       [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT32, [count])],
                                       gb.initializers)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        onnx.checker.check_model(model, full_check=True)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        packed = pack_bits(idx, width)
        assert np.array_equal(got, unpack_bits(packed, width, count)) and np.array_equal(got, idx)
        stored = next(t for t in gb.initializers if t.name == "packed")
        # the .lego file's packed stream, padded at most to a whole group of 8 indices
        assert packed_nbytes(count, width) <= len(stored.raw_data) < packed_nbytes(count, width) + width
        assert stored.raw_data[: packed.size] == packed.tobytes()


def test_byte_layout_reads_each_index_from_its_own_bytes():
    positions, shifts = byte_layout(12)  # 8 indices of 12 bits in 12 bytes
    assert positions.tolist() == [[0, 1], [1, 2], [3, 4], [4, 5], [6, 7], [7, 8], [9, 10], [10, 11]]
    assert shifts.tolist() == [0, 4] * 4
    positions, _ = byte_layout(15)  # an index at bit offset 7 spans 3 bytes
    assert positions.shape == (8, 3) and positions.max() == 14


# -- whole networks -------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["4x4-k32", "1x2-k256-layer-rows", "target-ratio-8"])
def test_small_cnn_agrees_with_pytorch(setting, tmp_path):
    model = small_cnn()
    data = lego_bytes_of(setting)
    cm, lego_bytes = deserialize(data), len(data)
    info = export_onnx(cm, model, tmp_path / "m.onnx", input_size=INPUT)
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"), full_check=True)
    assert info.onnx_bytes == (tmp_path / "m.onnx").stat().st_size
    assert info.clustered == len(cm.clustered) >= 3 and info.input_shape == ("batch", *INPUT)

    ref_model = cm.load_into(small_cnn()).eval()
    x = torch.randn(5, *INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(x)
    assert_agrees(run_onnx(tmp_path / "m.onnx", x), ref)  # dynamic batch: 5 ...
    assert_agrees(run_onnx(tmp_path / "m.onnx", x[:1]), ref[:1])  # ... and 1
    # no weight is stored dense: the file is far below the float32 weights (46 KiB) and near the
    # .lego file, plus the decoding nodes (a fixed cost per tensor that dominates so small a model)
    dense_bytes = sum(4 * p.numel() for p in model.parameters())
    assert info.onnx_bytes < dense_bytes / 2
    assert info.onnx_bytes < 2 * lego_bytes + 1500 * len(cm.clustered), (info.onnx_bytes, lego_bytes)


def test_target_mode_fixture_exercises_every_stored_form():
    cm = deserialize(lego_bytes_of("target-ratio-8"))
    assert cm.codebook_scales, "no int8 codebook"
    assert any(ct.gain_code is not None for ct in cm.clustered.values()), "no log-coded gains"
    assert fills(cm.tensors), "no fill"
    assert any(t.dtype == torch.float16 for t in cm.dense.values()), "no float16 kept tensor"
    assert any(index_stream(ct.indices.numpy(), int(cm.codebooks[ct.codebook].shape[0]), True)[1]
               for ct in cm.clustered.values()), "no entropy-coded index stream"
    settings = {(ct.block, int(cm.codebooks[ct.codebook].shape[0])) for ct in cm.clustered.values()}
    assert len(settings) > 1, "one setting for all tensors"


def test_initializers_hold_the_stored_forms():
    cm = deserialize(lego_bytes_of("target-ratio-8"))
    model = build_onnx(cm, small_cnn(), INPUT)
    inits = {t.name: t for t in model.graph.initializer}
    T = onnx.TensorProto
    for i, cb in enumerate(cm.codebooks):
        want = T.INT8 if i in cm.codebook_scales else T.FLOAT16
        assert inits[f"codebook.{i}"].data_type == want
    for name, ct in cm.clustered.items():
        k = int(cm.codebooks[ct.codebook].shape[0])
        width = bits_for(k)
        assert len(inits[f"{name}.idx"].raw_data) < packed_nbytes(ct.indices.numel(), width) + width
        if ct.scale is not None:
            assert inits[f"{name}.gains"].data_type == (T.UINT8 if ct.gain_code else T.FLOAT16)
    kept = [n for n, t in cm.dense.items() if n in inits or f"{n}.stored" in inits]
    assert kept and all((inits.get(n) or inits[f"{n}.stored"]).data_type == T.FLOAT16 for n in kept)
    # fills are a ConstantOfShape of one value, not an initializer
    filled = set(fills(cm.tensors))
    assert filled and not filled & set(inits)
    assert filled <= {n.output[0] for n in model.graph.node if n.op_type == "ConstantOfShape"}
    # the 'SAME' padding was folded: its amounts are constants, not computed at each run
    pads = [n.input[1] for n in model.graph.node if n.op_type == "Pad"]
    assert pads and all(p in inits for p in pads)
    assert onnx.numpy_helper.to_array(inits[pads[0]]).tolist() == [0, 0, 1, 1, 0, 0, 2, 2]
    assert "Constant" not in {n.op_type for n in model.graph.node}


def test_resnet20_top1_identical_to_pytorch_on_bundled_images(tmp_path):
    sd = read_state_dict(DATA / "resnet20_cifar10.safetensors")
    cm = legonet.compress(sd, legonet.LegoConfig(block=4, clusters=32, kmeans=FAST))
    cm, lego_bytes = saved(cm, tmp_path / "r20.lego")
    info = export_onnx(cm, "resnet20", tmp_path / "r20.onnx")
    assert info.onnx_bytes <= 2 * lego_bytes, (info.onnx_bytes, lego_bytes)

    spec = get_arch("resnet20")
    images = load_images(DATA / "cifar10-test-1000.npz")
    x = to_input(images.x[:200], spec.mean, spec.std)
    with torch.no_grad():
        ref = cm.load_into(build("resnet20")).eval()(x)
    assert_agrees(run_onnx(tmp_path / "r20.onnx", x), ref)


# -- errors and the command -----------------------------------------------------------------------
def test_missing_onnx_is_one_line_with_the_install_command(monkeypatch):
    cm = legonet.compress(small_cnn(), legonet.LegoConfig(block=4, clusters=4, kmeans=FAST))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install onnx onnxruntime") as err:
        build_onnx(cm, small_cnn(), INPUT)
    assert "\n" not in str(err.value)


def test_codebook_beyond_16_bit_indices_names_the_tensor(tmp_path):
    cm = legonet.compress(small_cnn(), legonet.LegoConfig(block=4, clusters=4, kmeans=FAST))
    ct = cm.tensors["pw.weight"]
    big = len(cm.codebooks)
    cm.codebooks.append(torch.zeros(70_000, math.prod(ct.block)))
    cm.tensors["pw.weight"] = ClusteredTensor(ct.shape, ct.dtype, ct.block, big, ct.indices)
    with pytest.raises(ConfigError, match=r"pw\.weight.*70000 entries.*17-bit"):
        export_onnx(cm, small_cnn(), tmp_path / "m.onnx", input_size=INPUT)
    assert not (tmp_path / "m.onnx").exists()


def test_wrong_architecture_and_missing_input_size(tmp_path):
    cm = legonet.compress(small_cnn(), legonet.LegoConfig(block=4, clusters=4, kmeans=FAST))
    with pytest.raises(ArchitectureError, match="do not fit"):
        export_onnx(cm, "resnet20", tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="input_size"):
        export_onnx(cm, small_cnn(), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_export_onnx_command_prints_both_sizes_and_the_ratio(tmp_path):
    cm = legonet.compress(build("resnet20"), legonet.LegoConfig(block=4, clusters=8,
                                                                kmeans=legonet.KMeansConfig(max_iters=3)))
    lego_bytes = cm.save(tmp_path / "m.lego")
    args = [str(tmp_path / "m.lego"), "--arch", "resnet20", "-o", str(tmp_path / "m.onnx")]
    r = CliRunner().invoke(export_onnx_cmd, args)
    assert r.exit_code == 0, r.output
    onnx_bytes = (tmp_path / "m.onnx").stat().st_size
    assert f"{onnx_bytes:,} B" in r.output and f"{lego_bytes:,} B" in r.output
    assert f"{onnx_bytes / lego_bytes:.2f}x" in r.output
