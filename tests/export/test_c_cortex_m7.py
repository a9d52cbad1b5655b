"""The exported C built for Cortex-M7 (arm-none-eabi-gcc, hard float) and run on the emulated MPS2-AN500
(qemu-system-arm, semihosting): same logits as the host build, and an instruction count per inference.
Skipped where the toolchain or qemu is absent (Debian: gcc-arm-none-eabi libnewlib-arm-none-eabi
qemu-system-arm)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import legonet
from legonet.export.c import export_c
from legonet.export.c.firmware import arm_size, build_firmware, build_host, run_firmware, run_host
from tests.export.cnn_models import MixedOpsNet, randomize_batchnorm

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")),
    reason="needs gcc, arm-none-eabi-gcc (with newlib) and qemu-system-arm")


def _macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one inference of ``model``'s convolutions and linear layers."""
    total = 0

    def count(m, _inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


def test_emulated_cortex_m7_matches_host(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(MixedOpsNet())
    cm = legonet.compress(model, legonet.LegoConfig(block=(1, 4), clusters=16, scales="row",
                                                   kmeans=legonet.KMeansConfig(max_iters=5)))
    info = export_c(cm, MixedOpsNet(), tmp_path, (3, 17, 17))
    images = np.random.default_rng(2).integers(0, 256, (3, 17, 17, 3), dtype=np.uint8)
    host = run_host(build_host(tmp_path, "-O1"), images)
    elf = build_firmware(tmp_path, "-O1")
    run = run_firmware(elf, images, outputs=10, timeout=120)

    np.testing.assert_allclose(run.logits, host, rtol=1e-4, atol=1e-5 * np.abs(host).max())
    assert (run.logits.argmax(1) == host.argmax(1)).all()
    # the timer ticks once per 40 instructions at 25 MHz under -icount shift=0
    assert run.instructions_per_tick == pytest.approx(40.0, rel=1e-3)
    macs = _macs(model.eval(), 17)
    assert all(macs < n < 60 * macs for n in run.instructions)  # at least one instruction per MAC
    # the same work for every image: no data-dependent branches to speak of
    assert max(run.instructions) - min(run.instructions) < 0.01 * max(run.instructions)
    size = arm_size(elf)
    assert size["text"] + size["data"] > info.flash_bytes and size["bss"] >= info.ram_bytes
