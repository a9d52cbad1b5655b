"""Lean runtime: outputs equal the dense-decompressed model's; only packed indices are held."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import legonet
from legonet.errors import ArchitectureError
from legonet.nn import LegoConv2d, LegoLinear, LegoModule, convert, load_lean, tensor_bytes, unpack_indices
from legonet.ops.bitpack import pack_bits
from legonet.zoo import build
from tests.marks import needs_cuda

DATA = Path(legonet.__file__).parent / "data"


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 32), data=st.data())
def test_unpack_matches_numpy_packing(width, data):
    n = data.draw(st.integers(1, 300))
    idx = np.array(data.draw(st.lists(st.integers(0, 2**width - 1), min_size=n, max_size=n)), dtype=np.int64)
    packed = torch.from_numpy(pack_bits(idx, width))
    assert torch.equal(unpack_indices(packed, width, n), torch.from_numpy(idx))


class _Mixed(nn.Module):
    """Every kind of layer the converter treats: Conv2d (grouped, biased), Linear, and fallbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.convt = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 + 12, 7)

    def forward(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.convt(torch.relu(self.dw(self.conv(x)))))
        y = y.mean((2, 3))
        return self.fc(torch.cat([y, self.emb(tok)], 1))


def _mixed_pair(config: legonet.LegoConfig):
    torch.manual_seed(0)
    model = _Mixed().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    cm = legonet.compress(model, config)
    dense = _Mixed().eval()
    cm.load_into(dense)
    return cm, dense


@pytest.mark.parametrize("config", [legonet.LegoConfig(block=2, clusters=16),
                                    legonet.LegoConfig(block=(1, 3), clusters=5, scope="layer")])
def test_convert_equals_dense_decompressed(config):
    cm, dense = _mixed_pair(config)
    with torch.device("meta"):
        skeleton = _Mixed()
    lean = convert(skeleton, cm)
    assert isinstance(lean.conv, LegoConv2d) and isinstance(lean.dw, LegoConv2d)
    assert isinstance(lean.fc, LegoLinear)
    assert isinstance(lean.emb, LegoModule) and isinstance(lean.convt, LegoModule)
    x, tok = torch.randn(5, 3, 6, 6), torch.randint(0, 50, (5,))
    with torch.no_grad():
        torch.testing.assert_close(lean(x, tok), dense(x, tok), rtol=1e-5, atol=1e-6)
    # no dense copy of a clustered weight anywhere in the lean model
    names = {n for n, _ in lean.named_parameters()} | {n for n, _ in lean.named_buffers()}
    assert not any(n.endswith("conv.weight") or n.endswith("emb.weight") for n in names)


def test_resnet20_lean_from_lego_file_matches_dense(tmp_path):
    from legonet.data import load_images, to_input
    from legonet.io.checkpoints import read_state_dict
    from legonet.zoo import get_arch

    sd = read_state_dict(DATA / "resnet20_cifar10.safetensors")
    km = legonet.KMeansConfig(max_iters=5, max_fit_points=4096)  # accuracy does not matter here, speed does
    cm = legonet.compress(sd, legonet.LegoConfig(block=4, clusters=32, kmeans=km))
    path = tmp_path / "r20.lego"
    cm.save(path)
    lean = load_lean(path, "resnet20")
    dense = legonet.load(path).load_into(build("resnet20")).eval()
    spec = get_arch("resnet20")
    x = to_input(load_images(DATA / "cifar10-test-1000.npz").subset(64, 3).x, spec.mean, spec.std)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), dense(x), rtol=1e-5, atol=1e-5)
    # weight memory: codebook + packed 5-bit indices + BN/bias, far below fp32
    held = tensor_bytes(lean)
    clustered_blocks = sum(ct.tiling.num_blocks for ct in cm.clustered.values())
    dense_bytes = sum(t.numel() * t.element_size() for t in cm.dense.values())
    packed = sum((ct.tiling.num_blocks * 5 + 7) // 8 for ct in cm.clustered.values())
    counters = 8 * sum(isinstance(m, nn.BatchNorm2d) for m in lean.modules())  # absent from the checkpoint
    assert held == 32 * 16 * 4 + dense_bytes + packed + counters
    assert packed >= clustered_blocks * 5 // 8
    assert held * 20 < tensor_bytes(dense)


def test_fp16_checkpoint_runs_in_model_dtype():
    torch.manual_seed(1)
    model = _Mixed().eval()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    cm = legonet.compress(sd, legonet.LegoConfig(block=2, clusters=8))
    dense = _Mixed().eval()
    cm.load_into(dense)
    with torch.device("meta"):
        lean = convert(_Mixed(), cm)
    x, tok = torch.randn(2, 3, 4, 4), torch.randint(0, 50, (2,))
    with torch.no_grad():
        torch.testing.assert_close(lean(x, tok), dense(x, tok), rtol=1e-5, atol=1e-6)


def test_wrong_architecture_is_a_legonet_error(tmp_path):
    cm, _ = _mixed_pair(legonet.LegoConfig(block=2, clusters=16))
    with pytest.raises(ArchitectureError, match="does not fit"):
        convert(build("resnet20"), cm)
    with pytest.raises(ArchitectureError, match="unknown architecture"):
        load_lean(cm, "no-such-net")


def test_from_module_on_a_real_layer():
    torch.manual_seed(2)
    conv, lin = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Linear(10, 6)
    cm_c = legonet.compress(conv, legonet.LegoConfig(block=2, clusters=8))
    cm_l = legonet.compress(lin, legonet.LegoConfig(block=(1, 5), clusters=4))
    lean_c, lean_l = LegoConv2d.from_module(conv, cm_c, "weight"), LegoLinear.from_module(lin, cm_l, "weight")
    x, v = torch.randn(2, 4, 7, 7), torch.randn(3, 10)
    ref_c = torch.nn.functional.conv2d(x, cm_c.reconstruct("weight"), conv.bias, 2, 1)
    torch.testing.assert_close(lean_c(x), ref_c)
    torch.testing.assert_close(lean_l(v), torch.nn.functional.linear(v, cm_l.reconstruct("weight"), lin.bias))
    assert lean_c.weight_packed.dtype == torch.uint8 and lean_c.weight_packed.numel() == (3 * 18 * 3 + 7) // 8


def test_decode_weight_equals_reconstruct():
    from legonet.nn import decode_weight, pack_indices
    from legonet.ops.bitpack import bits_for

    torch.manual_seed(3)
    sd = {"a.weight": torch.randn(7, 5, 3).half(), "b.weight": torch.randn(9, 4)}
    cm = legonet.compress(sd, legonet.LegoConfig(block=(2, 3), clusters=6))
    for name, ct in cm.clustered.items():
        book = cm.codebooks[ct.codebook]
        w = bits_for(book.shape[0])
        got = decode_weight(book, pack_indices(ct.indices, w), w, ct.tiling, ct.dtype)
        assert got.dtype == ct.dtype and torch.equal(got, cm.reconstruct(name))


def test_per_row_scales_are_applied_like_reconstruct():
    """Forward compatibility with per-row gains (``ClusteredTensor.scale``):
    w = untile(codebook[idx]) * scale[row], then rounded to the stored dtype."""
    from legonet.ops.tiling import untile

    torch.manual_seed(4)
    model = _Mixed().eval()
    cm = legonet.compress(model, legonet.LegoConfig(block=2, clusters=8))
    ref = _Mixed().eval()
    cm.load_into(ref)
    for name, ct in cm.clustered.items():
        ct.scale = torch.rand(ct.shape[0]) + 0.5
        w = untile(cm.codebooks[ct.codebook][ct.indices], ct.tiling)
        w = (w * ct.scale.reshape((-1,) + (1,) * (w.dim() - 1))).to(ct.dtype)
        owner, _, leaf = name.rpartition(".")
        with torch.no_grad():
            getattr(ref.get_submodule(owner), leaf).copy_(w)
    with torch.device("meta"):
        lean = convert(_Mixed(), cm)
    x, tok = torch.randn(3, 3, 5, 5), torch.randint(0, 50, (3,))
    with torch.no_grad():
        torch.testing.assert_close(lean(x, tok), ref(x, tok), rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("config", [legonet.LegoConfig(block=2, clusters=16),
                                    legonet.LegoConfig(block=(1, 3), clusters=5, scope="layer", scales="row")])
def test_lean_model_moved_to_gpu_gives_the_cpu_outputs(config):
    cm, _ = _mixed_pair(config)
    with torch.device("meta"):
        lean = convert(_Mixed(), cm)
    x, tok = torch.randn(5, 3, 6, 6), torch.randint(0, 50, (5,))
    with torch.no_grad():
        on_cpu = lean(x, tok)
        on_gpu = lean.to("cuda")(x.cuda(), tok.cuda())
    assert on_gpu.device.type == "cuda"
    assert all(b.device.type == "cuda" for b in lean.buffers())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)
