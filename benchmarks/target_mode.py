"""Accuracy of legonet's target-ratio mode, data-free and with BatchNorm re-estimation.

    python benchmarks/target_mode.py --arch resnet20 --weights ../shared/models/resnet20_cifar10.safetensors \
        --ratios 8 --test-images 1000

Writes ``benchmarks/results/target_mode_<arch>.json``. Test images are a seeded random subset of
``cifar10-test.npz``; BatchNorm re-estimation uses 1,024 images of ``cifar10-calib.npz`` (never test
images). Reports the whole-file ratio, the chosen settings and top-1 before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch

from legonet.artifact import load_weights
from legonet.calibrate.bn import reestimate_batchnorm
from legonet.data import load_images, to_input
from legonet.evaluate import top1, wilson_interval
from legonet.io.checkpoints import read_state_dict
from legonet.target import compress_to_ratio
from legonet.zoo import build, get_arch

SHARED = Path(os.environ.get("LEGONET_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", required=True)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    spec = get_arch(args.arch)
    sd = read_state_dict(args.weights)
    test = load_images(SHARED / "data/cifar10-test.npz").subset(args.test_images, 0)
    calib = load_images(SHARED / "data/cifar10-calib.npz", labels=False).subset(1024, 0)

    def evaluate(state: dict[str, torch.Tensor], bn: bool) -> float:
        model = build(args.arch)
        load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        if bn:
            reestimate_batchnorm(model, (to_input(calib.x[i : i + 128], spec.mean, spec.std)
                                         for i in range(0, len(calib), 128)))
        return top1(model, test, spec.mean, spec.std)

    base = evaluate(sd, False)
    rows = []
    for ratio in args.ratios:
        t0 = time.time()
        cm, plan = compress_to_ratio(sd, ratio)
        seconds = time.time() - t0
        rep = cm.report()
        dense = cm.to_state_dict()
        acc, acc_bn = evaluate(dense, False), evaluate(dense, True)
        rows.append({
            "target_ratio": ratio, "file_ratio": rep.ratio, "file_bytes": rep.file_bytes,
            "bits_per_weight": rep.bits_per_weight, "compress_seconds": seconds,
            "settings": Counter(f"{c.block[0]}x{c.block[1]} K={c.clusters}" for c in plan.values()).most_common(),
            "top1_data_free": acc, "top1_bn_reestimated": acc_bn,
            "ci95_data_free": wilson_interval(acc, len(test)), "ci95_bn": wilson_interval(acc_bn, len(test)),
        })
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) / f"target_mode_{args.arch}.json"
    out.write_text(json.dumps({"arch": args.arch, "test_images": len(test), "calib_images": len(calib),
                               "baseline_top1": base, "load_average": os.getloadavg(), "rows": rows}, indent=2))
    print(f"baseline {base:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
