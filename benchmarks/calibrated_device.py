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

from legonet.cli_target import compress_to_ratio_from_options, parse_device  # noqa: E402
from legonet.config import LegoConfig  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.report import build_report  # noqa: E402

DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "cifar10-calib.npz"
# the CLI's refinement options, none given: RefineConfig's defaults
DEFAULT_REFINEMENT = {"epochs": None, "feature_weight": None, "feature_fallback": None, "average": None,
                      "precision": None}


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
    timeline: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        timeline.append((round(time.perf_counter() - t0, 1), msg))
        print(f"{timeline[-1][0]:7.1f} s  {msg}", flush=True)

    sd = read_state_dict(args.weights)
    cm = compress_to_ratio_from_options(sd, LegoConfig(), args.ratio, args.arch, args.calib, args.calib_images, 0,
                                        DEFAULT_REFINEMENT, {}, device, progress)
    seconds = time.perf_counter() - t0
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
