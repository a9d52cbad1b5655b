"""Time the calibrated pipeline on a device, stage by stage (the GPU path of ``--device``).

    python benchmarks/calibrated_device.py --arch resnet50_cifar \
        --weights ../shared/models/resnet50_cifar10.safetensors.index.json --ratio 64 --device cuda \
        --out benchmarks/results/gpu_h200

Runs the function behind ``legonet compress IN --arch A --target-ratio R --calib NPZ --device D``
with its defaults (1,024 calibration images, seed 0) and a time stamp on every progress line, then
writes ``<out>/calibrated_<arch>_<R>x_<device>.json`` (times, bytes, ratio, peak GPU memory, the
timeline) and the .lego file beside it. Accuracy is measured separately, on any machine, with
``legonet eval --arch A --weights FILE --data cifar10-test.npz``. On a GPU only the model's passes
(input statistics, BatchNorm re-estimation, refinement) run there; clustering and the layer fit use
the CPU's threads, so the wall time depends on both.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import legonet  # noqa: E402
from legonet.artifact import load_weights  # noqa: E402
from legonet.cli.compress import parse_device  # noqa: E402
from legonet.data import load_images, to_input  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.report import build_report  # noqa: E402
from legonet.zoo import build, get_arch  # noqa: E402

DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "cifar10-calib.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = parse_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"calibrated_{args.arch}_{args.ratio:g}x_{device.type}"
    t0 = time.perf_counter()
    sd = read_state_dict(args.weights)
    spec, model = get_arch(args.arch), build(args.arch)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, str(args.weights))
    x = to_input(load_images(args.calib, labels=False).subset(args.calib_images, 0).x, spec.mean, spec.std)
    cm = legonet.compress(model.eval(), target_ratio=args.ratio, calib=x, device=device)
    seconds = time.perf_counter() - t0
    timeline = [(name, round(s, 1)) for name, s in cm.log.steps]
    nbytes = cm.save(args.out / f"{stem}.lego")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arch": args.arch,
           "target_ratio": args.ratio, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "calib_images": args.calib_images, "compress_seconds": round(seconds, 1), "file_bytes": nbytes,
           "file_ratio": build_report(cm, nbytes).ratio,
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "timeline": timeline}
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}))


if __name__ == "__main__":
    main()
