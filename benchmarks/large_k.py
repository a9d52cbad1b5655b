"""Time legonet's k-means at the large K of the reproduction sweeps (the bottleneck of the reproduction sweeps).

    python benchmarks/large_k.py --ks 1024 2048

ResNet-50's 4x4 blocks (1.47 M), random seeding, at most 20 Lloyd iterations (the setting
``benchmarks/experiments.py`` uses from K=512 on). Appends one row per K to
``benchmarks/results/large_k.json`` with the wall time, inertia, threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from legonet.clustering import select_tensors
from legonet.config import LegoConfig
from legonet.io.checkpoints import read_state_dict
from legonet.ops.kmeans import kmeans
from legonet.ops.tiling import tile

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEGONET_SHARED", ROOT.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--weights", type=Path, default=SHARED / "models/resnet50_cifar10.safetensors.index.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "large_k.json")
    args = ap.parse_args()
    sd = read_state_dict(args.weights)
    x = torch.cat([tile(sd[n].float(), (4, 4)) for n in select_tensors(sd, LegoConfig())])
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for k in args.ks:
        load = os.getloadavg()
        t0 = time.perf_counter()
        res = kmeans(x, k, seed=0, init="random", max_iters=20)
        row = {"k": k, "blocks": x.shape[0], "seconds": round(time.perf_counter() - t0, 1),
               "inertia": float(res.inertia), "threads": torch.get_num_threads(),
               "load_average_before": [round(v, 2) for v in load], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows.append(row)
        args.out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
