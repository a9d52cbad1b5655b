"""The trained EfficientNet-Lite1 through both deployment routes, driven by the legonet command as a user drives it.

One command (from the repository root; about 15 minutes, most of it the emulated Cortex-M7)::

    python benchmarks/deploy_lite1.py    # writes benchmarks/results/deploy_lite1.{md,json}

Steps, each timed, in a work folder (``--work``, default a temporary one):

1. ``legonet compress`` the checkpoint at ``--ratio`` (data-free target mode), then ``legonet export-c``
   and ``legonet export-onnx`` of the .lego file;
2. ``make host`` and ``make m7`` with the Makefile the export wrote (gcc and arm-none-eabi-gcc, both
   ``-std=c99 -Wall -Werror``);
3. the host executable on ``--host-images`` photos, against PyTorch on the compressed weights (the
   dense weights ``legonet eval`` rebuilds from the .lego file): identical top-1 predictions and the
   largest logit difference;
4. the firmware under ``qemu-system-arm -M mps2-an500 -icount shift=0`` on the first of those photos,
   as many as ``--m7-seconds`` of emulation allow (one inference is timed first): top-1 and logits
   against the host build's, instructions per inference (:mod:`legonet.export.c.firmware`), and
   ``arm-none-eabi-size`` of the firmware;
5. onnxruntime (one thread) on ``--onnx-images`` photos against PyTorch on the compressed weights, and
   ``legonet eval --reference`` on the same photos: its top-1 must be the in-process PyTorch top-1
   (the same preprocessing), and it gives the uncompressed checkpoint's for context.

Photos are read as ``legonet eval`` reads them (:func:`legonet.io.images.open_images`, resized and
center-cropped to the architecture's input size, normalised by :func:`legonet.data.to_input` with its
mean and std); each step takes the seeded subset ``legonet eval --limit N`` takes. Every process runs on
one thread (``OMP_NUM_THREADS=1``, ``--threads 1``), so the times are single-core times.

The script exits with status 1, after writing the results, when a check fails: a top-1 that differs
between routes, or an .onnx file more than twice the .lego file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import shared_dir  # noqa: E402
from legonet.artifact import load_weights  # noqa: E402
from legonet.cli.data import image_source  # noqa: E402
from legonet.data import to_input  # noqa: E402
from legonet.export.c.firmware import arm_size, run_firmware, run_host  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.zoo import build  # noqa: E402

ARCH = "efficientnet_lite1"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path, timeout: float = 3600) -> dict:
    """Run ``cmd`` in ``cwd`` on one thread; ``{"command", "seconds", "stdout"}``. A failure stops the
    script with the command and the last line it wrote to stderr."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}): {last}")
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1), "stdout": done.stdout.strip()}


def _shown(path: Path) -> str:
    """``path`` as ``shared/...`` when it lies in the shared fixtures, else as given."""
    shared = shared_dir().resolve()
    return f"shared/{path.relative_to(shared)}" if path.is_relative_to(shared) else str(path)


def _legonet(args: list[str], cwd: Path) -> dict:
    """``legonet ARGS`` as :func:`_run` runs it; the shared fixtures' paths shown as ``shared/...``."""
    step = _run([sys.executable, "-m", "legonet", *args], cwd)
    for arg in args:
        if os.path.isabs(arg):
            step["stdout"] = step["stdout"].replace(arg, _shown(Path(arg)))
    step["command"] = "legonet " + " ".join(_shown(Path(a)) if os.path.isabs(a) else a for a in args)
    return step


def _defines(header: Path) -> dict[str, int]:
    """The integer ``#define LEGONET_*`` constants of the exported model.h."""
    found = re.findall(r"#define (LEGONET_\w+) (\d+)u?\b", header.read_text())
    return {name: int(value) for name, value in found}


def _photos(folder: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 (n, H, W, 3), labels (n,))``: the subset ``legonet eval --limit n --seed seed`` reads."""
    source, _ = image_source(folder, ARCH, labels=True)
    xs, ys = zip(*source.subset(n, seed).batches(50))
    return np.concatenate(xs), np.concatenate(ys)


@torch.no_grad()
def _pytorch(model: torch.nn.Module, images: np.ndarray, spec) -> tuple[np.ndarray, float]:
    """Logits ``(N, 1000)`` of ``model`` on uint8 ``images`` and the seconds per image."""
    t0 = time.perf_counter()
    out = [model(to_input(images[i:i + 25], spec.mean, spec.std)).numpy() for i in range(0, len(images), 25)]
    return np.concatenate(out), (time.perf_counter() - t0) / len(images)


def _agreement(out: np.ndarray, ref: np.ndarray) -> dict:
    """Identical top-1 predictions of ``out`` and ``ref`` ``(N, classes)``, and their largest logit
    difference, absolute and relative to the largest reference logit."""
    diff = float(np.abs(out - ref).max())
    return {"images": len(ref), "top1_identical": int((out.argmax(1) == ref.argmax(1)).sum()),
            "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / float(np.abs(ref).max())}


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _emulate(elf: Path, images: np.ndarray, host: np.ndarray, budget_s: float) -> dict:
    """The firmware on one image, timed, then on as many of the next as fit in ``budget_s`` seconds."""
    t0 = time.perf_counter()
    runs = [run_firmware(elf, images[:1], host.shape[1], timeout=budget_s)]
    per_image = time.perf_counter() - t0
    more = min(len(images) - 1, int(budget_s / per_image) - 1)
    if more > 0:
        runs.append(run_firmware(elf, images[1:1 + more], host.shape[1], timeout=2 * budget_s))
    logits = np.concatenate([r.logits for r in runs])
    instructions = [i for r in runs for i in r.instructions]
    return {**_agreement(logits, host[:len(logits)]), "instructions": instructions,
            "seconds_first_inference": round(per_image, 1),
            "seconds_per_inference": round((time.perf_counter() - t0) / len(logits), 2)}


def _onnxruntime(onnx_file: Path, images: np.ndarray, spec) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    out = [session.run(None, {name: to_input(images[i:i + 25], spec.mean, spec.std).numpy()})[0]
           for i in range(0, len(images), 25)]
    return np.concatenate(out), (time.perf_counter() - t0) / len(images)


def measure(args: argparse.Namespace, work: Path) -> dict:
    weights, photos = args.weights.resolve(), args.photos.resolve()
    lego, c_dir, onnx_file = work / "l1.lego", work / "c", work / "l1.onnx"
    steps = {
        "legonet compress": _legonet(["compress", str(weights), "--arch", ARCH, "--target-ratio", str(args.ratio),
                                      "--threads", "1", "-o", lego.name], work),
        "legonet export-c": _legonet(["export-c", lego.name, "--arch", ARCH, "-o", c_dir.name], work),
        "legonet export-onnx": _legonet(["export-onnx", lego.name, "--arch", ARCH, "-o", onnx_file.name], work),
        "make host": _run(["make", "--no-print-directory", "-C", c_dir.name, "host"], work),
        "make m7": _run(["make", "--no-print-directory", "-C", c_dir.name, "m7"], work),
    }
    model_h = _defines(c_dir / "model.h")

    model = build(ARCH)
    load_weights(model, read_state_dict(lego), str(lego), ARCH)  # as legonet eval loads a .lego file
    model.eval()
    _, spec = image_source(photos, ARCH, labels=True)

    x, y = _photos(photos, args.host_images, args.seed)
    ref, torch_s = _pytorch(model, x, spec)
    t0 = time.perf_counter()
    host = run_host(c_dir / "model", x)
    host_s = (time.perf_counter() - t0) / len(x)
    m7 = _emulate(c_dir / "firmware.elf", x, host, args.m7_seconds)

    xo, yo = _photos(photos, args.onnx_images, args.seed)
    ref_o, torch_o_s = _pytorch(model, xo, spec)
    ort_out, ort_s = _onnxruntime(onnx_file, xo, spec)
    steps["legonet eval"] = _legonet(["eval", "--arch", ARCH, "--weights", lego.name, "--data", str(photos), "--limit",
                              str(args.onnx_images), "--seed", str(args.seed), "--reference", str(weights)], work)
    eval_top1 = float(re.search(r"top-1 ([\d.]+) %", steps["legonet eval"]["stdout"]).group(1)) / 100

    lego_bytes, onnx_bytes = lego.stat().st_size, onnx_file.stat().st_size
    return {
        "network": ARCH, "weights": _shown(weights), "photos": _shown(photos),
        "input": [3, model_h["LEGONET_IN_H"], model_h["LEGONET_IN_W"]], "target_ratio": args.ratio, "seed": args.seed,
        "load_average": os.getloadavg()[0], "steps": steps,
        "sizes": {"checkpoint_bytes": weights.stat().st_size, "lego_bytes": lego_bytes, "onnx_bytes": onnx_bytes,
                  "onnx_over_lego": onnx_bytes / lego_bytes, "flash_data_bytes": model_h["LEGONET_FLASH_DATA_BYTES"],
                  "ram_bytes": model_h["LEGONET_RAM_BYTES"], "arena_bytes": model_h["LEGONET_ARENA_BYTES"],
                  "firmware": arm_size(c_dir / "firmware.elf")},
        "host_c": {**_agreement(host, ref), "top1_c": _top1(host, y), "top1_pytorch": _top1(ref, y),
                   "seconds_per_image": round(host_s, 3), "pytorch_seconds_per_image": round(torch_s, 3)},
        "m7": m7,
        "onnx": {**_agreement(ort_out, ref_o), "top1_onnx": _top1(ort_out, yo), "top1_pytorch": _top1(ref_o, yo),
                 "top1_legonet_eval": eval_top1, "seconds_per_image": round(ort_s, 3),
                 "pytorch_seconds_per_image": round(torch_o_s, 3)},
    }


def failed_checks(r: dict) -> list[str]:
    """The checks ``r`` fails, each in a few words."""
    checks = {
        "host C top-1 differs from PyTorch": r["host_c"]["top1_identical"] < r["host_c"]["images"],
        "Cortex-M7 top-1 differs from host C": r["m7"]["top1_identical"] < r["m7"]["images"],
        "onnxruntime top-1 differs from PyTorch": r["onnx"]["top1_identical"] < r["onnx"]["images"],
        "legonet eval top-1 differs from the in-process PyTorch top-1":
            abs(r["onnx"]["top1_legonet_eval"] - r["onnx"]["top1_pytorch"]) > 1e-9,
        ".onnx over twice the .lego size": r["sizes"]["onnx_over_lego"] > 2,
    }
    return [name for name, failed in checks.items() if failed]


def _mb(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(r: dict) -> str:
    s, h, m7, o = r["sizes"], r["host_c"], r["m7"], r["onnx"]
    fw, ins = s["firmware"], np.array(m7["instructions"])
    st = r["steps"]
    lines = [
        "# EfficientNet-Lite1 (trained) through both deployment routes (`python benchmarks/deploy_lite1.py`)", "",
        f"`{r['weights']}` compressed at {r['target_ratio']}x without data, exported to C99 and to ONNX with the "
        f"`legonet` command; photos from `{r['photos']}` ({'x'.join(map(str, r['input']))} input, read and "
        "normalised as `legonet eval` reads them; seeded subsets as `--limit N --seed "
        f"{r['seed']}` draws them). Reference: PyTorch on the dense weights rebuilt from the .lego file. "
        f"Single-thread times on a shared 2-core machine (load average {r['load_average']:.1f}).", "",
        "```", *[v["command"] for v in st.values()], "```", "",
        "| size | bytes | |", "|---|---|---|",
        f"| checkpoint (fp32 safetensors) | {s['checkpoint_bytes']:,} | {_mb(s['checkpoint_bytes'])} |",
        f"| .lego | {s['lego_bytes']:,} | {_mb(s['lego_bytes'])}, "
        f"{s['checkpoint_bytes'] / s['lego_bytes']:.2f}x smaller than the checkpoint |",
        f"| .onnx | {s['onnx_bytes']:,} | {s['onnx_over_lego']:.2f}x the .lego file |",
        f"| C flash data (const arrays: weights, codebooks, gains) | {s['flash_data_bytes']:,} | "
        f"{_mb(s['flash_data_bytes'])} |",
        f"| C activation arena | {s['arena_bytes']:,} | {_mb(s['arena_bytes'])} |",
        f"| C static RAM (arena + decode scratch) | {s['ram_bytes']:,} | {_mb(s['ram_bytes'])} |",
        f"| Cortex-M7 firmware text+data / bss | {fw['text'] + fw['data']:,} / {fw['bss']:,} | "
        "`arm-none-eabi-size` |", "",
        "| route | photos | top-1 identical to reference | max logit diff (abs / rel) | top-1 (route / PyTorch) "
        "| time per image |", "|---|---|---|---|---|---|",
        f"| C on the host (gcc -O2) | {h['images']} | {h['top1_identical']} of {h['images']} | "
        f"{h['max_abs_logit_diff']:.1e} / {h['max_rel_logit_diff']:.1e} | {100 * h['top1_c']:.1f} % / "
        f"{100 * h['top1_pytorch']:.1f} % | {1000 * h['seconds_per_image']:.0f} ms (PyTorch "
        f"{1000 * h['pytorch_seconds_per_image']:.0f} ms) |",
        f"| C on Cortex-M7 (qemu) vs the host C | {m7['images']} | {m7['top1_identical']} of {m7['images']} | "
        f"{m7['max_abs_logit_diff']:.1e} / {m7['max_rel_logit_diff']:.1e} | - | {m7['seconds_per_inference']:.1f} s "
        "emulated |",
        f"| ONNX (onnxruntime, 1 thread) | {o['images']} | {o['top1_identical']} of {o['images']} | "
        f"{o['max_abs_logit_diff']:.1e} / {o['max_rel_logit_diff']:.1e} | {100 * o['top1_onnx']:.1f} % / "
        f"{100 * o['top1_pytorch']:.1f} % | {1000 * o['seconds_per_image']:.0f} ms (PyTorch "
        f"{1000 * o['pytorch_seconds_per_image']:.0f} ms) |", "",
        f"Cortex-M7: {np.median(ins) / 1e9:.3f} G instructions per inference (median of {len(ins)}; "
        f"{ins.min() / 1e9:.3f}-{ins.max() / 1e9:.3f} G), under `qemu-system-arm -M mps2-an500 -icount shift=0` "
        "(instructions, not cycles).", "",
        f"`legonet eval` on the {o['images']} ONNX photos: " + "; ".join(
            line.strip() for line in st["legonet eval"]["stdout"].splitlines()) + ".", "",
        "| step | seconds |", "|---|---|",
        *[f"| `{name}` | {v['seconds']} |" for name, v in st.items()],
        f"| one Cortex-M7 inference under qemu | {m7['seconds_first_inference']} |", "",
    ]
    failed = failed_checks(r)
    lines.append("All checks pass." if not failed else "Failed: " + "; ".join(failed) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=shared_dir() / "models" / "efficientnet_lite1_imagenet.safetensors")
    ap.add_argument("--photos", type=Path, default=shared_dir() / "data" / "imagenet-dev" / "eval",
                    help="labelled photos (a folder with labels.csv)")
    ap.add_argument("--ratio", type=int, default=8)
    ap.add_argument("--host-images", type=int, default=50)
    ap.add_argument("--onnx-images", type=int, default=200)
    ap.add_argument("--m7-seconds", type=float, default=600, help="emulation time for the Cortex-M7 runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep the .lego, .onnx and C files here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        result = measure(args, args.work.resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_lite1.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (args.out / "deploy_lite1.md").write_text(md)
    print(md)
    if failed_checks(result):
        sys.exit(1)


if __name__ == "__main__":
    main()
