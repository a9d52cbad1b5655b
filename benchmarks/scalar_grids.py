"""Why legonet's data-free mode trails int4 on ResNet-56: scalar 4-bit grids compared.

    python benchmarks/scalar_grids.py --arch resnet56 --weights ../shared/models/resnet56_cifar10.safetensors

Every weight tensor (>= 2 dims) quantized at about 4 bits per weight several ways, top-1 on the test
set (default all 10,000 images):

* ``legonet-1x1-K16-datafree``: the data-free target pipeline with its menu forced to 1x1 blocks,
  K=16 (one float16 codebook per tensor, row gains as target mode sets them: statistic chosen per
  tensor, unshrink; BatchNorm folding, bias correction);
* ``legonet-1x1-K16``: the same setting through ``compress_to_ratio`` alone;
* ``legonet-1x1-K16-<stat>[-unshrink]``: ``legonet.compress`` with 1x1 blocks, K=16, one codebook per
  tensor and row gains by ``stat`` (RMS or largest magnitude), with or without the unshrink correction
  (``LegoConfig.scale_stat``, ``LegoConfig.unshrink``): which of the two changes closes the gap;
* ``uniform-16-no-zero``: per row, 16 evenly spaced levels over [-max|w|, max|w|] (no zero level);
* ``int4-rtn``: per row, symmetric round-to-nearest to -7..7 times max|w|/7 (the int4 peer).

Results are appended to ``benchmarks/results/scalar_grids_<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from legonet import LegoConfig, compress
from legonet.data import load_images
from legonet.datafree.pipeline import datafree_compress
from legonet.evaluate import wilson_interval
from legonet.io.checkpoints import read_state_dict
from legonet.target import compress_to_ratio
from legonet.zoo import build

if __package__ in (None, ""):  # run as ``python benchmarks/scalar_grids.py``: the repository root holds ``benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers import rtn_per_channel
from benchmarks.target_mode import SHARED, state_top1

FORCED = (((1, 1), 16),)


def uniform_rows(w: torch.Tensor, levels: int) -> torch.Tensor:
    """``w`` with each row rounded to ``levels`` evenly spaced values over [-max|row|, max|row|]."""
    m = w.reshape(w.shape[0], -1).float()
    g = m.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    grid = torch.linspace(-1.0, 1.0, levels)
    return (grid[((m / g)[..., None] - grid).abs().argmin(-1)] * g).reshape(w.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    sd = read_state_dict(args.weights)
    test = load_images(SHARED / "data/cifar10-test.npz").subset(args.test_images, 0)
    names = [n for n, t in sd.items() if t.ndim >= 2 and t.is_floating_point()]

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        return state_top1(args.arch, state, test)

    variants = {
        # ratio 2: below what the forced setting reaches, so every tensor gets it
        "legonet-1x1-K16-datafree": lambda: datafree_compress(build(args.arch), 2.0, sd, menu=FORCED)[0].to_state_dict(),
        "legonet-1x1-K16": lambda: compress_to_ratio(dict(sd), 2.0, menu=FORCED)[0].to_state_dict(),
        **{f"legonet-1x1-K16-{stat}{'-unshrink' if fix else ''}": (
            lambda stat=stat, fix=fix: compress(sd, LegoConfig(
                block=1, clusters=16, scope="layer", scales="row", scale_stat=stat, unshrink=fix,
                codebook_dtype="float16")).to_state_dict())
           for stat in ("rms", "absmax") for fix in (False, True)},
        "uniform-16-no-zero": lambda: {**sd, **{n: uniform_rows(sd[n], 16) for n in names}},
        "int4-rtn": lambda: {**sd, **{n: rtn_per_channel(sd[n], 4)[0] for n in names}},
    }
    rows = [{"variant": "fp32", "top1": accuracy(sd)}]
    for name, make in variants.items():
        t0 = time.time()
        acc = accuracy(make())
        rows.append({"variant": name, "top1": acc, "ci95": wilson_interval(acc, len(test)),
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) / f"scalar_grids_{args.arch}.json"
    out.write_text(json.dumps({"arch": args.arch, "test_images": len(test),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
