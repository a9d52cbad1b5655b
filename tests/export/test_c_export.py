"""C export of the bundled ResNet-20: generated C99 compiles with -Wall -Werror, runs on bundled CIFAR-10
images, and its logits match the lean PyTorch runtime; reported flash/RAM equal the compiled object's
symbols; the memory plan reuses buffers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import legonet
from legonet.data import load_images, to_input
from legonet.errors import ArchitectureError
from legonet.export.c import export_c, generate
from legonet.export.c.firmware import build_host, run_host
from legonet.io.checkpoints import read_state_dict
from legonet.nn import load_lean
from legonet.zoo import get_arch

DATA = Path(legonet.__file__).parent / "data"
GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc not installed")


@pytest.fixture(scope="module")
def resnet20_cm() -> legonet.CompressedModel:
    sd = read_state_dict(DATA / "resnet20_cifar10.safetensors")
    # 1x2 blocks, K=256 keeps the fixture's accuracy well above chance (4x4/K=32 without retraining
    # does not), so agreement of the top-1 with PyTorch means something
    km = legonet.KMeansConfig(max_iters=10, max_fit_points=16384)
    return legonet.compress(sd, legonet.LegoConfig(block=(1, 2), clusters=256, kmeans=km))


def compiled_and_lean_logits(cm: legonet.CompressedModel, out: Path, images):
    """``(C logits, lean PyTorch logits)`` of ``images`` for the export of ``cm`` in ``out``: the
    generated C compiled with ``-Wall -Werror`` and run on the images' raw bytes."""
    c_logits = torch.from_numpy(run_host(build_host(out, "-O2"), images.x, timeout=120))
    spec = get_arch("resnet20")
    with torch.no_grad():
        ref = load_lean(cm, "resnet20")(to_input(images.x, spec.mean, spec.std))
    return c_logits, ref


@needs_gcc
def test_compiled_export_matches_lean_runtime(resnet20_cm, tmp_path):
    info = export_c(resnet20_cm, "resnet20", tmp_path / "out")
    out = tmp_path / "out"
    model_c = (out / "model.c").read_text()
    includes = {line.split()[1] for line in model_c.splitlines() if line.startswith("#include")}
    assert includes == {"<stdint.h>", "<string.h>", "<math.h>", '"model.h"'}
    assert "alloc(" not in model_c

    images = load_images(DATA / "cifar10-test-1000.npz").subset(24, seed=11)
    c_logits, ref = compiled_and_lean_logits(resnet20_cm, out, images)
    assert c_logits.shape == (24, 10)
    torch.testing.assert_close(c_logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(c_logits.argmax(1), ref.argmax(1))
    assert (ref.argmax(1).numpy() == images.y).mean() > 0.5  # the compressed net still classifies

    # the reported sizes are the sizes of the arrays the compiler sees
    obj = tmp_path / "model.o"
    subprocess.run([GCC, "-std=c99", "-O0", "-c", "-o", str(obj), str(out / "model.c")], check=True)
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-S", str(obj)], capture_output=True, check=True, text=True).stdout.split("\n")
        size = {p[3]: int(p[1], 16) for p in (s.split() for s in syms) if len(p) == 4}
        assert sum(v for k, v in size.items() if k.startswith("lgd_")) == info.flash_bytes
        assert sum(v for k, v in size.items() if k.startswith("lgb_")) == info.ram_bytes
        assert size["lgb_arena"] == info.activation_bytes
    header = (out / "model.h").read_text()
    assert f"#define LEGONET_FLASH_DATA_BYTES {info.flash_bytes}u" in header
    assert f"#define LEGONET_ARENA_BYTES {info.activation_bytes}u" in header


def test_sizes_follow_from_the_compressed_model(resnet20_cm):
    _, info = generate(resnet20_cm, "resnet20")
    cm = resnet20_cm
    assert info.codebook_bytes == 256 * 2 * 4  # float32 centroids: the config stores float32
    assert info.index_bytes == sum(ct.tiling.num_blocks for ct in cm.clustered.values())  # 8-bit indices
    # BatchNorm folded into each convolution: a multiplier and an offset per output channel
    conv_channels = sum(t.shape[0] for n, t in cm.tensors.items() if n.endswith(".weight") and len(t.shape) == 4)
    assert info.dense_bytes == 4 * (2 * conv_channels + 10) + 2 * 3 * 4  # + linear bias, input mean and std
    # the activation arena: the largest activation is 16x32x32 floats and a basic block needs three
    # live (input kept for the shortcut, conv1 output, conv2 output); the add and ReLU run in place
    assert info.activation_bytes == 3 * 16 * 32 * 32 * 4
    assert info.activation_bytes < info.activation_sum_bytes / 4  # buffers are reused
    assert info.scratch_bytes == 4 * 64 * 9 * 4  # four decoded rows of the widest layer


def test_unsupported_architecture_is_a_legonet_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    cm = legonet.compress(model, legonet.LegoConfig(block=2, clusters=4))
    with pytest.raises(ArchitectureError):
        export_c(cm, "resnet20", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@needs_gcc
def test_per_row_scales_in_c_match_lean(resnet20_cm, tmp_path):
    """Per-row gains (``ClusteredTensor.scale``) in the C runtime."""
    import copy

    cm = copy.deepcopy(resnet20_cm)
    gen = torch.Generator().manual_seed(0)
    for ct in cm.clustered.values():
        ct.scale = 0.75 + 0.5 * torch.rand(ct.shape[0], generator=gen)
    info = export_c(cm, "resnet20", tmp_path)
    assert info.scale_bytes == 4 * sum(ct.shape[0] for ct in cm.clustered.values())  # not float16 values: float32
    images = load_images(DATA / "cifar10-test-1000.npz").subset(4, seed=5)
    c_logits, ref = compiled_and_lean_logits(cm, tmp_path, images)
    torch.testing.assert_close(c_logits, ref, rtol=1e-4, atol=1e-4)
