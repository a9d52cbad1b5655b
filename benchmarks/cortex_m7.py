"""The C export on an emulated Cortex-M7: flash, arena RAM and instructions per inference, beside int8.

One command (from the repository root)::

    python benchmarks/cortex_m7.py [HOST_IMAGES]    # writes benchmarks/results/cortex_m7.{md,json}

Networks: ResNet-20 with the bundled CIFAR-10 weights; a MobileNetV2 for CIFAR-10 (the zoo's
inverted residuals, stride-1 stem, strides 1-1-2-2-1-2-1 as in the common CIFAR ports; random
initialisation); EfficientNet-Lite0 at 224x224 (the zoo's, random initialisation). Randomly
initialised networks get BatchNorm statistics estimated on a few random images, so that their
activations neither vanish nor explode; their sizes and instruction counts are those of the trained
networks (the code does not depend on the values), their logits are not meaningful.

Each network is compressed with ``legonet.target.compress_to_ratio`` at 4x, 8x and 16x (mixed
settings, compact storage, entropy coding), written to a .lego file and read back, exported with
``legonet.export.c.export_c``, then

* built for the host (gcc -O2) and run on HOST_IMAGES images (default 64; the bundled CIFAR-10
  test images for the CIFAR networks, seeded random images for EfficientNet): agreement with
  PyTorch on the same reconstructed weights (top-1, largest logit difference relative to the
  largest logit), and for ResNet-20 its top-1 accuracy;
* built for Cortex-M7 (arm-none-eabi-gcc -O2 -mcpu=cortex-m7 -mfpu=fpv5-d16 -mfloat-abi=hard,
  newlib rdimon) and run on one image under ``qemu-system-arm -M mps2-an500 -icount shift=0``:
  instructions per inference (the board's CMSDK timer runs on qemu's virtual clock, one tick per
  40 instructions; see :mod:`legonet.export.c.firmware`), logits against the host build's, and
  ``arm-none-eabi-size`` of the firmware.

The int8 reference follows the byte rules of a TensorFlow Lite Micro-class runtime applied to the
same network: every conv/linear weight 1 byte, per output channel a float32 scale and an int32 bias
(8 bytes; BatchNorm folded), activations int8 in an arena planned like ours (same liveness, same
fusions: 1 byte per element). It counts bytes only: no int8 kernels are run here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from legonet.artifact import load_weights  # noqa: E402
from legonet.data import load_images, to_input  # noqa: E402
from legonet.export.c import export_c  # noqa: E402
from legonet.export.c.firmware import arm_size, build_firmware, build_host, run_firmware, run_host  # noqa: E402
from legonet.format import load  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.target import compress_to_ratio  # noqa: E402
from legonet.zoo import ZOO, build, get_arch  # noqa: E402
from legonet.zoo.mobilenet_v2 import InvertedResidual, conv_bn_relu6  # noqa: E402

DATA = ROOT / "legonet" / "data"
RATIOS = (4, 8, 16)
BUDGETS = {"STM32F746 (1 MB / 320 KB)": (1 << 20, 320 << 10), "STM32H743 (2 MB / 1 MB)": (2 << 20, 1 << 20)}
CIFAR_MEAN, CIFAR_STD = get_arch("resnet20").mean, get_arch("resnet20").std


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: (N, 3, 32, 32) -> (N, 10); 2.24 M parameters."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, 32)]
        channels = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        layers.append(conv_bn_relu6(channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _estimate_batchnorm(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    """Running statistics of every BatchNorm from 16 seeded random images (cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def _networks() -> list[dict]:
    cifar = load_images(DATA / "cifar10-test-1000.npz")
    resnet = build("resnet20")
    load_weights(resnet, read_state_dict(DATA / "resnet20_cifar10.safetensors"))
    torch.manual_seed(0)
    nets = [dict(name="resnet20", weights="bundled CIFAR-10", model=resnet.eval(), factory=lambda: build("resnet20"),
                 size=32, mean=CIFAR_MEAN, std=CIFAR_STD, images=cifar),
            dict(name="mobilenet_v2_cifar", weights="random init", model=_estimate_batchnorm(CifarMobileNetV2(), 32),
                 factory=CifarMobileNetV2, size=32, mean=CIFAR_MEAN, std=CIFAR_STD, images=cifar)]
    if "efficientnet_lite0" in ZOO:
        spec = get_arch("efficientnet_lite0")
        nets.append(dict(name="efficientnet_lite0", weights="random init",
                         model=_estimate_batchnorm(build("efficientnet_lite0"), 224),
                         factory=lambda: build("efficientnet_lite0"), size=224, mean=spec.mean, std=spec.std,
                         images=None))
    return nets


def _macs(model: nn.Module, size: int) -> int:
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


def _int8_reference(model: nn.Module, arena_floats: int) -> dict:
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = sum(m.weight.numel() for m in layers)
    channels = sum(m.weight.shape[0] for m in layers)
    return {"weight_bytes": weights, "per_channel_bytes": 8 * channels, "flash_bytes": weights + 8 * channels,
            "arena_bytes": arena_floats}


def _images(net: dict, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    if net["images"] is not None:
        sub = net["images"].subset(n, seed=0)
        return sub.x, sub.y
    return np.random.default_rng(0).integers(0, 256, (n, net["size"], net["size"], 3), dtype=np.uint8), None


def _row(net: dict, ratio: int, n_host: int, folder: Path) -> dict:
    t0 = time.perf_counter()
    cm, _ = compress_to_ratio(net["model"], ratio)
    lego_bytes = cm.save(folder / "m.lego")
    cm = load(folder / "m.lego")
    t1 = time.perf_counter()
    info = export_c(cm, net["factory"](), folder / "c", (3, net["size"], net["size"]), mean=net["mean"], std=net["std"])
    images, labels = _images(net, n_host)
    host = run_host(build_host(folder / "c"), images)
    model = cm.load_into(net["factory"]()).eval()
    with torch.no_grad():
        ref = torch.cat([model(to_input(images[i:i + 16], net["mean"], net["std"])) for i in range(0, len(images), 16)])
    ref = ref.numpy()
    elf = build_firmware(folder / "c", "-O2")
    run = run_firmware(elf, images[:1], host.shape[1], timeout=1800)
    size = arm_size(elf)
    row = {
        "network": net["name"], "weights": net["weights"], "target_ratio": ratio, "lego_bytes": lego_bytes,
        "compress_s": round(t1 - t0, 1), "export": {k: v for k, v in info.__dict__.items() if k != "files"},
        "firmware": size, "firmware_flash": size["text"] + size["data"], "firmware_ram": size["data"] + size["bss"],
        "instructions": run.instructions[0],
        "host": {"images": len(images), "top1_agree": float((host.argmax(1) == ref.argmax(1)).mean()),
                 "max_rel_logit_diff": float(np.abs(host - ref).max() / np.abs(ref).max())},
        "m7_vs_host": {"top1_same": bool((run.logits.argmax(1) == host[:1].argmax(1)).all()),
                       "max_abs_diff": float(np.abs(run.logits - host[:1]).max())},
    }
    if labels is not None and net["weights"] != "random init":
        row["host"]["top1_c"] = float((host.argmax(1) == labels).mean())
        row["host"]["top1_pytorch"] = float((ref.argmax(1) == labels).mean())
    return row


def main() -> None:
    torch.set_num_threads(1)
    n_host = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    results = []
    for net in _networks():
        params = sum(p.numel() for p in net["model"].parameters())
        entry = {"network": net["name"], "weights": net["weights"], "input": [3, net["size"], net["size"]],
                 "parameters": params, "fp32_bytes": sum(t.numel() * 4 for t in net["model"].state_dict().values()
                                                         if t.is_floating_point()),
                 "macs": _macs(net["model"], net["size"]), "rows": []}
        for ratio in RATIOS:
            with tempfile.TemporaryDirectory() as tmp:
                row = _row(net, ratio, n_host, Path(tmp))
            entry["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        arena_floats = entry["rows"][0]["export"]["activation_bytes"] // 4
        entry["int8_reference"] = _int8_reference(net["model"], arena_floats)
        results.append(entry)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cortex_m7.json").write_text(json.dumps(results, indent=2) + "\n")
    md = render(results)
    (out / "cortex_m7.md").write_text(md)
    print(md)


def _kb(n: int) -> str:
    return f"{n / 1024:,.0f} KB" if n < 10 << 20 else f"{n / (1 << 20):,.1f} MB"


def render(results: list[dict]) -> str:
    lines = ["# C export on an emulated Cortex-M7 (`python benchmarks/cortex_m7.py`)", "",
             "Flash: the `const` data arrays of model.c (weights, folded BatchNorm, biases) and the whole firmware "
             "(`arm-none-eabi-size` text+data: code, newlib, semihosting driver). RAM: the activation arena (one "
             "static float buffer, liveness-planned) and the scratch of four decoded weight rows; the firmware's "
             "data+bss adds newlib's buffers and the image. Instructions: one inference under `qemu-system-arm "
             "-M mps2-an500 -icount shift=0` (instructions executed, not cycles: qemu models no pipeline, cache or "
             "wait states). int8: the byte rules of a TFLite-Micro-class runtime on the same network (1 B per "
             "weight, 8 B per output channel, int8 activations in the same arena plan); bytes only, not run.", ""]
    header = ("| target | .lego | flash data | firmware text+data | arena | arena without reuse | scratch "
              "| instructions / inference | instr. / MAC | fits F746 | fits H743 | top-1 C = PyTorch "
              "| max logit diff | M7 = host |")
    for e in results:
        ref = e["int8_reference"]
        lines += [f"## {e['network']} ({e['weights']}, input {'x'.join(map(str, e['input']))}, "
                  f"{e['parameters']:,} parameters, {e['macs'] / 1e6:,.1f} M MACs, fp32 {_kb(e['fp32_bytes'])})", "",
                  header, "|" + "---|" * 14]
        for r in e["rows"]:
            x, fw = r["export"], r["firmware"]
            fits = ["yes" if r["firmware_flash"] <= f and r["firmware_ram"] <= m else "no" for f, m in BUDGETS.values()]
            same = "yes" if r["m7_vs_host"]["top1_same"] and r["m7_vs_host"]["max_abs_diff"] < 1e-3 else "no"
            lines.append(f"| {r['target_ratio']}x | {_kb(r['lego_bytes'])} | {_kb(x['flash_bytes'])} | "
                         f"{_kb(fw['text'] + fw['data'])} | {_kb(x['activation_bytes'])} | "
                         f"{_kb(x['activation_sum_bytes'])} | {_kb(x['scratch_bytes'])} | "
                         f"{r['instructions'] / 1e6:,.0f} M | {r['instructions'] / e['macs']:.1f} | {fits[0]} | "
                         f"{fits[1]} | {100 * r['host']['top1_agree']:.0f} % of {r['host']['images']} | "
                         f"{r['host']['max_rel_logit_diff']:.1e} | {same} |")
        lines.append(f"| int8 reference | | {_kb(ref['flash_bytes'])} | | {_kb(ref['arena_bytes'])} |"
                     + " |" * 9)
        acc = [r for r in e["rows"] if "top1_c" in r["host"]]
        if acc:
            lines.append("")
            lines.append("Top-1 on the bundled CIFAR-10 images (C / PyTorch): " + ", ".join(
                f"{r['target_ratio']}x {100 * r['host']['top1_c']:.1f} % / {100 * r['host']['top1_pytorch']:.1f} %"
                for r in acc) + ".")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
