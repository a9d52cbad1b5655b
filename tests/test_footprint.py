"""Footprint arithmetic, checked by hand on a small model and against real .lego files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import legonet
from legonet.errors import ArchitectureError
from legonet.footprint import STM32F7, footprint, legonet_bytes, render_table, weight_shapes


def _small() -> nn.Module:
    # conv weight (4, 3, 3, 3) = 108, conv bias 4, BN 4 x 2 = 8 (weight, bias, running mean/var: 16),
    # linear weight (2, 4) = 8, linear bias 2
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_hand_computed_figures():
    e = {x.scheme: x.nbytes for x in footprint(_small(), [legonet.LegoConfig(block=2, clusters=4)], (2,))}
    n_all = 108 + 4 + 16 + 8 + 2  # 138 floats; num_batches_tracked (int64) is not a weight
    assert e["fp32"] == 4 * n_all and e["fp16"] == 2 * n_all
    rest = 4 * (4 + 16 + 2)  # biases and BN stay fp32
    assert e["int8 (per-channel)"] == (108 + 4 * 4) + (8 + 2 * 4) + rest
    assert e["int4 (per-channel)"] == (54 + 4 * 4) + (4 + 2 * 4) + rest
    assert e["palettized 2-bit LUT"] == (4 * 4 + 27) + (4 * 4 + 2) + rest
    # conv (4, 27) -> 2 x 14 = 28 blocks of 2 bits = 7 bytes; linear (2, 4) -> 1 x 2 blocks = 1 byte;
    # codebook 4 x 4 floats = 64 bytes
    assert e["legonet 2x2 K=4"] == 64 + 7 + 1 + rest


@pytest.mark.parametrize("config", [legonet.LegoConfig(block=2, clusters=8),
                                    legonet.LegoConfig(block=(1, 3), clusters=3, scope="layer", codebook_dtype="float16"),
                                    legonet.LegoConfig(block=2, clusters=4, exclude=("3.weight",))])
def test_legonet_bytes_equal_the_lego_file_payload(config, tmp_path):
    torch.manual_seed(0)
    model = _small()
    with torch.no_grad():  # trained-like statistics: a fresh BatchNorm's constant tensors would be written as fills
        for t in (model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias):
            t.uniform_(0.5, 1.5)
    cm = legonet.compress(model, config)
    path = tmp_path / "m.lego"
    cm.save(path)
    with safe_open(str(path), "pt") as f:
        payload = sum(f.get_tensor(k).numel() for k in ("codebooks", "indices", "dense"))
        counters = 8  # BatchNorm's num_batches_tracked is stored in the file but is not a weight
    assert legonet_bytes(weight_shapes(_small()), config) == payload - counters


def test_vgg16_and_table():
    e = footprint("vgg16")
    assert e[0].nbytes == 4 * 138_357_544
    assert e[0].bits_per_weight == 32.0
    table = render_table("vgg16", e)
    assert all(d.name in table for d in STM32F7)
    assert "| fp32 | 553,430,176 |" in table


def test_unknown_architecture():
    with pytest.raises(ArchitectureError):
        footprint("no-such-net")


def test_plot_without_matplotlib_says_how_to_install_it_before_any_output(tmp_path, monkeypatch):
    import builtins

    from click.testing import CliRunner

    from legonet.cli import main

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = CliRunner().invoke(main, ["footprint", "--arch", "resnet20", "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 1 and r.output.splitlines() == [
        "legonet: error: plotting needs matplotlib, which is not installed: pip install matplotlib"]
