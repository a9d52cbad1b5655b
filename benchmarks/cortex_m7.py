"""ResNet-20 C export on a Cortex-M7: arm-none-eabi-size against STM32F7 budgets, and a host run.

One command (from the repository root)::

    python benchmarks/cortex_m7.py      # writes benchmarks/results/cortex_m7.{md,json}

For each setting, the bundled ResNet-20 is compressed, exported with ``legonet export-c``, then

* compiled for Cortex-M7 (``arm-none-eabi-gcc -mcpu=cortex-m7 -mthumb -Os``, single-precision
  hard float as on the STM32F746): ``arm-none-eabi-size`` of model.o, and of a linked image
  (newlib nosys, --gc-sections) whose main runs one inference on a static image;
* compiled for this machine (``gcc -std=c99 -Wall -Werror -O2``) and run on bundled CIFAR-10 test
  images: top-1, agreement with the lean PyTorch runtime, and milliseconds per image (median).

Without arm-none-eabi-gcc (Debian: apt-get install gcc-arm-none-eabi) the Cortex-M7 part is skipped
and the results say so.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import legonet  # noqa: E402
from legonet.data import load_images, to_input  # noqa: E402
from legonet.export.c import export_c  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.nn import load_lean  # noqa: E402
from legonet.zoo import get_arch  # noqa: E402

DATA = ROOT / "legonet" / "data"
SETTINGS = [legonet.LegoConfig(block=4, clusters=32), legonet.LegoConfig(block=(1, 2), clusters=256)]
ARM_FLAGS = ["-mcpu=cortex-m7", "-mthumb", "-Os", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard",
             "-ffunction-sections", "-fdata-sections", "-std=c99", "-Wall", "-Werror"]
BUDGETS = {"STM32F746": (1 << 20, 320 << 10), "STM32F767/769": (2 << 20, 512 << 10)}
FIRMWARE = """#include "model.h"
static uint8_t image[LEGONET_IN_H * LEGONET_IN_W * LEGONET_IN_C];
static float logits[LEGONET_NUM_CLASSES];
volatile float sink;
int main(void) { legonet_infer(image, logits); sink = logits[0]; return 0; }
"""


def _size(tool: str, path: Path) -> dict:
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True).stdout.splitlines()[1].split()
    return {"text": int(out[0]), "data": int(out[1]), "bss": int(out[2])}


def _arm(folder: Path) -> dict | None:
    gcc, size = shutil.which("arm-none-eabi-gcc"), shutil.which("arm-none-eabi-size")
    if not gcc or not size:
        return None
    subprocess.run([gcc, *ARM_FLAGS, "-c", "-o", str(folder / "model.o"), str(folder / "model.c")], check=True)
    (folder / "firmware.c").write_text(FIRMWARE)
    subprocess.run([gcc, *ARM_FLAGS, "--specs=nosys.specs", "-Wl,--gc-sections", "-o", str(folder / "fw.elf"),
                    str(folder / "model.c"), str(folder / "firmware.c"), "-lm"], check=True)
    obj, elf = _size(size, folder / "model.o"), _size(size, folder / "fw.elf")
    flash, ram = elf["text"] + elf["data"], elf["data"] + elf["bss"]
    return {"flags": " ".join(ARM_FLAGS), "model_o": obj, "firmware_elf": elf, "flash": flash, "ram": ram,
            "fits": {k: flash <= f and ram <= r for k, (f, r) in BUDGETS.items()}}


def _host(folder: Path, cm: legonet.CompressedModel, n_images: int) -> dict:
    exe = folder / "host"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-O2", "-o", str(exe), str(folder / "model.c"),
                    str(folder / "main.c"), "-lm"], check=True)
    images = load_images(DATA / "cifar10-test-1000.npz").subset(n_images, seed=0)
    times, lines = [], []
    for i in range(len(images)):
        t = time.perf_counter()
        r = subprocess.run([str(exe)], input=images.x[i : i + 1].tobytes(), capture_output=True, check=True)
        times.append(time.perf_counter() - t)
        lines.append([float(v) for v in r.stdout.decode().split()])
    c = torch.tensor(lines)
    spec = get_arch("resnet20")
    with torch.no_grad():
        ref = load_lean(cm, "resnet20")(to_input(images.x, spec.mean, spec.std))
    return {"images": len(images), "top1_c": float((c.argmax(1).numpy() == images.y).mean()),
            "top1_lean": float((ref.argmax(1).numpy() == images.y).mean()),
            "argmax_agree": float((c.argmax(1) == ref.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((c - ref).abs().max()),
            "ms_per_image_median_incl_process_start": 1e3 * statistics.median(times)}


def main() -> None:
    n_images = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    sd = read_state_dict(DATA / "resnet20_cifar10.safetensors")
    rows = []
    for cfg in SETTINGS:
        cm = legonet.compress(sd, cfg)
        with tempfile.TemporaryDirectory() as tmp:
            info = export_c(cm, "resnet20", tmp)
            row = {"setting": f"{cfg.block[0]}x{cfg.block[1]} K={cfg.clusters}", "export": info.__dict__,
                   "cortex_m7": _arm(Path(tmp)), "host": _host(Path(tmp), cm, n_images)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cortex_m7.json").write_text(json.dumps(rows, indent=2))
    md = render(rows)
    (out / "cortex_m7.md").write_text(md)
    print(md)


def render(rows: list[dict]) -> str:
    lines = ["ResNet-20 (bundled weights) exported with `legonet export-c`. Flash/RAM from the generated arrays; "
             "text/data/bss from `arm-none-eabi-size`.", "",
             "| setting | const arrays (flash) B | static buffers (RAM) B | model.o text/data/bss | firmware text/data/bss "
             "| fits F746 (1 MB/320 KB) | fits F767/769 (2 MB/512 KB) | top-1 C | top-1 lean | argmax agree | max logit diff |",
             "|" + "---|" * 11]
    for r in rows:
        e, a, h = r["export"], r["cortex_m7"], r["host"]
        arm = ("not built: arm-none-eabi-gcc missing | - | - | -" if a is None else
               f"{a['model_o']['text']:,}/{a['model_o']['data']:,}/{a['model_o']['bss']:,} | "
               f"{a['firmware_elf']['text']:,}/{a['firmware_elf']['data']:,}/{a['firmware_elf']['bss']:,} | "
               f"{'yes' if a['fits']['STM32F746'] else 'no'} | {'yes' if a['fits']['STM32F767/769'] else 'no'}")
        lines.append(f"| {r['setting']} | {e['flash_bytes']:,} | {e['ram_bytes']:,} | {arm} | "
                     f"{100 * h['top1_c']:.1f} % | {100 * h['top1_lean']:.1f} % | {100 * h['argmax_agree']:.1f} % | "
                     f"{h['max_abs_logit_diff']:.2e} |")
    lines.append("")
    lines.append(f"Host C run: {rows[0]['host']['images']} bundled test images, one process per image; median "
                 + ", ".join(f"{r['setting']}: {r['host']['ms_per_image_median_incl_process_start']:.1f} ms"
                             for r in rows) + " per image including process start (gcc -O2, x86-64, shared machine).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
