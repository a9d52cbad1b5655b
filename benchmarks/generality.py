"""Generality: legonet's defaults on networks of other families than the ResNets it was developed on.

    python benchmarks/generality.py                      # every model, about 16 minutes on 2 cores
    python benchmarks/generality.py --models tiny_vit    # one of them

The networks (``benchmarks/generality_models.py``: depthwise-separable CNNs with ReLU6 and with SiLU,
a small vision transformer) are built in code and trained here from a fixed seed, for ``--epochs``
passes over the 2,048 calibration images plus 8,000 of the 10,000 CIFAR-10 test images (a seeded
split); top-1 is measured on the other 2,000 test images, which no step sees. The calibrated
pipeline uses 1,024 of the calibration images, labels ignored (images the network was trained on,
as a calibration set drawn from a training split is). Every method is given the same trained
weights; ratios are file bytes against the fp32 weights (legonet: the .lego file; peers: counted by
``benchmarks/peers.py``'s rules).

Methods: legonet data-free (``datafree_compress``, the CLI's ``--target-ratio R --arch``), calibrated
(``calibrated_compress`` with its defaults, the CLI's ``--calib``), the paper's method (one model-wide
codebook of 4x4 blocks, K=32), and the peers (per-channel round-to-nearest, per-layer scalar
k-means, coremltools palettization when installed). Results go to
``benchmarks/results/generality.json`` and ``generality.md``; the trained weights are kept in
``benchmarks/results/generality_weights/`` (not committed) so that a rerun measures the same networks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

if __package__ in (None, ""):  # run as ``python benchmarks/generality.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import shared_dir
from benchmarks.generality_models import MODELS
from benchmarks.peers import PEER_METHODS, coreml_available
from legonet.artifact import load_weights
from legonet.calibrate.pipeline import calibrated_compress
from legonet import compress
from legonet.config import LegoConfig
from legonet.data import ImageSet, load_images, to_input
from legonet.datafree.pipeline import datafree_compress
from legonet.runlog import RunLog
from legonet.evaluate import top1, wilson_interval
from legonet.report import fp32_bytes
from legonet.zoo import RESNET50_CIFAR_NORM, ArchSpec

MEAN, STD = RESNET50_CIFAR_NORM  # CIFAR-10's per-channel statistics, as the zoo's CIFAR ResNet-50 uses
RESULTS = Path(__file__).parent / "results"
RATIOS = (8.0, 12.0, 16.0)
PEERS = (("rtn", 4), ("rtn", 3), ("kmeans-layer", 4), ("kmeans-layer", 3), ("kmeans-layer", 2),
         ("coreml", 4), ("coreml", 2))


def split(seed: int = 7) -> tuple[ImageSet, ImageSet, ImageSet]:
    """``(train, held-out test, calibration)``: calibration images + 8,000 test images to train on,
    the other 2,000 test images to score on, 1,024 calibration images (no labels) to calibrate on."""
    calib = load_images(shared_dir() / "data/cifar10-calib.npz")
    test = load_images(shared_dir() / "data/cifar10-test.npz")
    order = np.random.default_rng(seed).permutation(len(test))
    train = ImageSet(np.concatenate([calib.x, test.x[order[:8000]]]), np.concatenate([calib.y, test.y[order[:8000]]]))
    held = ImageSet(test.x[np.sort(order[8000:])], test.y[np.sort(order[8000:])])
    return train, held, ImageSet(calib.x, None).subset(1024, 0)


def train(name: str, data: ImageSet, epochs: int, seed: int = 0) -> nn.Module:
    """``MODELS[name]`` trained from ``seed``: SGD (CNNs) or AdamW (the transformer), one-cycle
    learning rate, batches of 128, random horizontal flips."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    if name == "tiny_vit":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batches = len(data) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, opt.param_groups[0]["lr"], total_steps=epochs * batches)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for b in range(batches):
            idx = order[b * 128:(b + 1) * 128]
            x = to_input(data.x[idx], MEAN, STD)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x[flip] = x[flip].flip(3)
            loss = nn.functional.cross_entropy(model(x), torch.from_numpy(data.y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def trained_weights(name: str, data: ImageSet, epochs: int) -> dict[str, torch.Tensor]:
    path = RESULTS / "generality_weights" / f"{name}_{epochs}ep.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = train(name, data, epochs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return load_file(path)


def scored(name: str, state: dict[str, torch.Tensor], held: ImageSet) -> dict:
    model = MODELS[name]()
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    with torch.no_grad():
        acc = top1(model, held, MEAN, STD)
    lo, hi = wilson_interval(acc, len(held))
    return {"top1": round(100 * acc, 2), "interval": [round(100 * lo, 1), round(100 * hi, 1)]}


def measure(name: str, sd: dict[str, torch.Tensor], held: ImageSet, calib: torch.Tensor) -> list[dict]:
    fp32 = fp32_bytes(sd)
    rows = [{"method": "original", "ratio": 1.0, "bytes": fp32, **scored(name, sd, held)}]

    def legonet_row(method: str, cm, seconds: float, **extra) -> dict:
        nbytes = len(cm.to_bytes())
        return {"method": method, **extra, "ratio": round(fp32 / nbytes, 2), "bytes": nbytes,
                **scored(name, cm.to_state_dict(), held), "seconds": round(seconds, 1)}

    t0 = time.time()
    rows.append(legonet_row("paper (model-wide 4x4, K=32)", compress(sd, LegoConfig(block=4, clusters=32)),
                            time.time() - t0))
    for ratio in RATIOS:
        log = RunLog()
        t0 = time.time()
        cm, _ = datafree_compress(MODELS[name](), ratio, sd, log=log)
        correction = next(n for n in log.notes if n.startswith("data-free bias correction"))
        rows.append(legonet_row("legonet data-free", cm, time.time() - t0, target=ratio, bias_correction=correction))
    for ratio in RATIOS:
        model = MODELS[name]()
        load_weights(model, sd)
        t0 = time.time()
        cm, _, _ = calibrated_compress(model, ratio, calib)
        rows.append(legonet_row("legonet calibrated", cm, time.time() - t0, target=ratio))
    arch = ArchSpec(name, MODELS[name], MEAN, STD)
    for method, bits in PEERS:
        if method == "coreml" and not coreml_available():
            continue
        out = PEER_METHODS[method](sd, arch, None, bits=bits)
        rows.append({"method": f"peer {method}", "bits": bits, "ratio": round(fp32 / out.file_bytes, 2),
                     "bytes": out.file_bytes, **scored(name, out.state_dict, held)})
    return rows


def render(doc: dict) -> str:
    lines = [f"# Generality: the defaults on other network families\n\n{doc['about']}\n"]
    for name, entry in doc["models"].items():
        base = entry["rows"][0]["top1"]
        lines += [f"\n## {name} ({entry['parameters']:,} parameters, trained {entry['epochs']} epochs: "
                  f"{base:.2f} % on {doc['test_images']:,} held-out test images)\n",
                  "| method | setting | ratio (file) | top-1 | 95 % interval | loss (points) | time |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in entry["rows"]:
            setting = f"target {r['target']:g}x" if "target" in r else (f"{r['bits']} bits" if "bits" in r else "")
            time_ = f"{r['seconds']:.0f} s" if "seconds" in r else ""
            lines.append(f"| {r['method']} | {setting} | {r['ratio']:.2f}x | {r['top1']:.2f} % | "
                         f"{r['interval'][0]}-{r['interval'][1]} | {base - r['top1']:+.2f} | {time_} |")
        notes = sorted({r["bias_correction"] for r in entry["rows"] if "bias_correction" in r})
        lines += [f"\n{n[0].upper()}{n[1:]} (data-free rows)." for n in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    train_set, held, calib_set = split()
    calib = to_input(calib_set.x, MEAN, STD)
    path = args.out / "generality.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"about": "Networks built in code (benchmarks/generality_models.py), trained here on the 2,048 "
                         "calibration images + 8,000 CIFAR-10 test images, scored on the other 2,000 test "
                         "images; calibrated rows use 1,024 calibration images. Command: "
                         "`python benchmarks/generality.py`.",
                "test_images": len(held), "calib_images": len(calib_set),
                "torch_threads": torch.get_num_threads()})
    models = doc.setdefault("models", {})
    for name in args.models:
        sd = trained_weights(name, train_set, args.epochs)
        rows = measure(name, sd, held, calib)
        models[name] = {"epochs": args.epochs, "parameters": sum(v.numel() for k, v in sd.items()
                                                                 if "running" not in k and "num_batches" not in k),
                        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "generality.md").write_text(render(doc))


if __name__ == "__main__":
    main()
