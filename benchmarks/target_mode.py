"""Accuracy of legonet's target-ratio mode: data-free, calibrated, calibrated + refinement.

    python benchmarks/target_mode.py --arch resnet50_cifar \
        --weights ../shared/models/resnet50_cifar10.safetensors.index.json \
        --points data-free:16 calib+refine:64 calib+refine:128

A point is ``MODE:RATIO`` with MODE one of
  data-free      ``datafree_compress``: BatchNorm folding, target mode, bias correction (the CLI with --arch),
  calib          activation-aware clustering + layer-output fit + BatchNorm re-estimation, no refinement,
  calib+refine   the CLI's default with ``--calib``: the above + codebook refinement by distillation.
``--no-layer-fit`` drops the layer-output fit from the calibrated modes (an ablation; such rows have
mode ``calib (no layer fit)`` or ``calib+refine (no layer fit)``); ``--no-reassign`` keeps the fit
but not its error-feedback reassignment of indices (rows ``... (no reassign)``);
``--no-group-channels`` skips the reordering of alike channels (rows ``... (no channel grouping)``;
every calibrated row records ``grouped_channels``, the channel dimensions reordered).
Calibration uses ``--calib-images`` (default 1,024, as the CLI) of ``cifar10-calib.npz``, never test
images. Top-1 is measured on ``--test-images`` of ``cifar10-test.npz`` (default: all 10,000) with a
95 % Wilson interval. Each point is appended to ``benchmarks/results/target_mode_<arch>.json`` as
soon as it is measured (same mode and ratio: replaced), with the compression wall time.

``--peers METHOD:BITS ...`` (e.g. ``rtn:4 kmeans-layer:4 coreml:4``, the reproduction benchmark's
peer methods, ``benchmarks/peers.py``) measures peers on the same test images, for a side-by-side at
matched ratios; their rows have mode ``peer METHOD`` and the ratio their byte count gives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from legonet.artifact import load_weights
from legonet.config import FEATURE_GATES
from legonet.config import LayerFitConfig
from legonet.calibrate.pipeline import calibrated_compress
from legonet.config import RefineConfig
from legonet.config import FEATURE_FALLBACKS, NORM_STATISTICS, PRECISIONS, TargetConfig
from legonet.runlog import RunLog
from legonet.data import load_images, to_input
from legonet.datafree.pipeline import datafree_compress
from legonet.evaluate import top1, wilson_interval
from legonet.io.checkpoints import read_state_dict
from legonet.report import fp32_bytes
from legonet.zoo import build, get_arch

if __package__ in (None, ""):  # run as ``python benchmarks/target_mode.py``: the repository root holds ``benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peers import PEER_METHODS

SHARED = Path(os.environ.get("LEGONET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODES = ("data-free", "calib", "calib+refine")


def state_top1(arch: str, state: dict[str, torch.Tensor], test) -> float:
    """Top-1 on ``test`` of architecture ``arch`` loaded with ``state`` (cast to float32)."""
    spec = get_arch(arch)
    model = build(arch)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return top1(model, test, spec.mean, spec.std)


def _point(text: str) -> tuple[str, float]:
    mode, _, ratio = text.partition(":")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"mode must be one of {MODES}, got {mode!r}")
    return mode, float(ratio)


def _peer(text: str) -> tuple[str, int]:
    method, _, bits = text.partition(":")
    if method not in PEER_METHODS or not bits.isdigit():
        raise argparse.ArgumentTypeError(f"expected METHOD:BITS with METHOD one of {sorted(PEER_METHODS)}, got {text!r}")
    return method, int(bits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--points", type=_point, nargs="*", default=[], help="MODE:RATIO ...")
    ap.add_argument("--peers", type=_peer, nargs="*", default=[], help="METHOD:BITS ... on the same test images")
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--refine-epochs", type=float, default=None,
                    help="passes of refinement (default: RefineConfig's); the row records the steps taken")
    ap.add_argument("--feature-weight", type=float, default=None,
                    help="weight of refinement's feature term (default: RefineConfig's); the row records it")
    ap.add_argument("--feature-gate", choices=FEATURE_GATES, default=None,
                    help="gate of refinement's feature term (default: RefineConfig's); the row records it")
    ap.add_argument("--feature-fallback", choices=FEATURE_FALLBACKS, default=None,
                    help="what refinement's feature term does where its gate closes (default: RefineConfig's); "
                         "the row records it and the steps that fell back")
    ap.add_argument("--refine-average", type=float, default=None,
                    help="decay of refinement's moving average of the tuned parameters, 0 = off "
                         "(default: RefineConfig's); the row records it")
    ap.add_argument("--refine-lr", type=float, default=None,
                    help="refinement's relative learning rate (default: RefineConfig's); the row records it")
    ap.add_argument("--refine-precision", choices=PRECISIONS, default=None,
                    help="precision of refinement's student passes (default: RefineConfig's); the row records it")
    ap.add_argument("--refine-boundary-share", type=float, default=None,
                    help="share of the original's top-1 margin that refinement's boundary views remove, 0 = off "
                         "(default: RefineConfig's); the row records it and the views made")
    ap.add_argument("--no-layer-fit", action="store_true",
                    help="calibrated modes without the layer-output fit (an ablation: the row's mode says so)")
    ap.add_argument("--no-reassign", action="store_true",
                    help="layer-output fit keeping the indices clustering chose (an ablation: the row's mode says so)")
    ap.add_argument("--no-group-channels", action="store_true",
                    help="calibrated modes without reordering alike channels into shared blocks (an ablation: "
                         "the row's mode says so)")
    ap.add_argument("--norm-statistics", choices=NORM_STATISTICS, default="relative",
                    help="BatchNorm re-estimation of the calibrated modes (the row records it)")
    ap.add_argument("--no-baseline", action="store_true", help="reuse the baseline already in the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    spec = get_arch(args.arch)
    sd = read_state_dict(args.weights)
    f32 = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    test = load_images(SHARED / "data/cifar10-test.npz").subset(args.test_images, 0)
    calib = load_images(SHARED / "data/cifar10-calib.npz", labels=False).subset(args.calib_images, 0)
    x = to_input(calib.x, spec.mean, spec.std)
    out = Path(args.out) / f"target_mode_{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {}
    if doc.get("test_images") != len(test):
        doc = {}

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        return state_top1(args.arch, state, test)

    doc.update({"arch": args.arch, "test_images": len(test), "calib_images": len(calib),
                "torch_threads": torch.get_num_threads()})
    rows = doc.setdefault("rows", [])
    for mode, ratio in args.points:
        load = os.getloadavg()
        t0 = time.time()
        refined = fitted = None
        grouped = 0
        if mode == "data-free":  # as the CLI with --arch and no --calib: BatchNorm folding, bias correction
            cm, plan = datafree_compress(build(args.arch), ratio, sd, log=RunLog())
        else:
            model = build(args.arch)
            load_weights(model, f32)
            refine = None
            if mode == "calib+refine":
                chosen = {"epochs": args.refine_epochs, "feature_weight": args.feature_weight,
                          "feature_gate": args.feature_gate, "feature_fallback": args.feature_fallback,
                          "average": args.refine_average, "precision": args.refine_precision,
                          "lr": args.refine_lr, "boundary_share": args.refine_boundary_share}
                refine = RefineConfig(**{k: v for k, v in chosen.items() if v is not None})
            options = {"layer_fit": None} if args.no_layer_fit else {}
            if args.no_reassign and not args.no_layer_fit:
                options = {"layer_fit": LayerFitConfig(reassign=False)}
            config = TargetConfig(refine=refine, norm_statistics=args.norm_statistics,
                                  group_channels=not args.no_group_channels, **options)
            cm, plan, steps = calibrated_compress(model, ratio, x, config=config)
            refined, fitted, grouped = steps.refine, steps.layer_fit, steps.grouped_channels
        seconds = time.time() - t0
        rep = cm.report()
        acc = accuracy(cm.to_state_dict())
        if mode != "data-free" and args.no_layer_fit:
            mode += " (no layer fit)"
        elif mode != "data-free" and args.no_reassign:
            mode += " (no reassign)"
        if mode != "data-free" and args.no_group_channels:
            mode += " (no channel grouping)"
        row = {
            "mode": mode, "target_ratio": ratio, "file_ratio": rep.ratio, "file_bytes": rep.file_bytes,
            "bits_per_weight": rep.bits_per_weight, "compress_seconds": round(seconds, 1),
            "settings": Counter(f"{c.block[0]}x{c.block[1]} K={c.clusters}" for c in plan.values()).most_common(),
            "top1": acc, "ci95": wilson_interval(acc, len(test)),
            "norm_statistics": None if mode == "data-free" else args.norm_statistics,
            "grouped_channels": grouped,
            "refine": None if refined is None else {"steps": refined.steps, "seconds": round(refined.seconds, 1),
                                                    "first_loss": refined.first_loss, "last_loss": refined.last_loss,
                                                    "tuned_parameters": refined.tuned_parameters,
                                                    "feature_weight": refine.feature_weight,
                                                    "feature_gate": refine.feature_gate,
                                                    "feature_fallback": refine.feature_fallback,
                                                    "fallback_steps": refined.fallback_steps,
                                                    "average": refine.average,
                                                    "precision": refine.precision, "lr": refine.lr,
                                                    "feature_layer": refined.feature_layer,
                                                    "boundary_share": refine.boundary_share,
                                                    "boundary_views": refined.boundary_views},
            "layer_fit": None if fitted is None else {
                "tensors": fitted.fitted, "seconds": round(fitted.seconds, 1), "reassign": not args.no_reassign,
                "output_error_before": fitted.error_before, "output_error_after": fitted.error_after},
            "load_average_before": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        rows[:] = [r for r in rows if (r["mode"], r["target_ratio"]) != (mode, ratio)] + [row]
        out.write_text(json.dumps(doc, indent=1))
        print(json.dumps(row), flush=True)
    for method, bits in args.peers:
        load = os.getloadavg()
        t0 = time.time()
        res = PEER_METHODS[method](f32, spec, None, bits=bits)
        seconds = time.time() - t0
        acc = accuracy(res.state_dict)
        row = {"mode": f"peer {method}", "target_ratio": None, "bits": bits, "file_ratio": fp32_bytes(sd) / res.file_bytes,
               "file_bytes": res.file_bytes, "compress_seconds": round(seconds, 1), "top1": acc,
               "ci95": wilson_interval(acc, len(test)), "load_average_before": load,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        rows[:] = [r for r in rows if (r["mode"], r.get("bits")) != (row["mode"], bits)] + [row]
        out.write_text(json.dumps(doc, indent=1))
        print(json.dumps(row), flush=True)
    if not (args.no_baseline and "baseline_top1" in doc):  # measured last: the points come first
        doc["baseline_top1"] = accuracy(sd)
    for r in rows:
        r["loss_points"] = 100 * (doc["baseline_top1"] - r["top1"])
    out.write_text(json.dumps(doc, indent=1))
    print(f"baseline {doc['baseline_top1']:.4f}; wrote {out}")


if __name__ == "__main__":
    main()
