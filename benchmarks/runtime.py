"""Lean runtime vs dense: resident memory, tensor bytes and latency for ResNet-20/56/50.

One command (from the repository root)::

    python benchmarks/runtime.py            # writes benchmarks/results/runtime.{json,md}

Each model is compressed once (4x4 blocks, K=32, one model-wide codebook: the paper's setting) from
the trained checkpoints in ../shared/models into --work (reused if present). Every measurement runs
in a fresh subprocess:

* RSS: the process's anonymous resident memory (RssAnon in /proc/self/status: heap and tensors,
  not library code pages) after loading the model minus before (after
  the imports and one read of the .lego file), both taken after gc and glibc's malloc_trim so
  that freed temporaries do not count; and the peak RSS (ru_maxrss) over loading and all
  forwards, minus that baseline (batch-64 activations dominate it);
* tensor bytes: the distinct storages of the model's parameters and buffers;
* latency: both models loaded in one process and timed alternately (dense, lean, lean, dense,
  ...), median of --repeats forwards each after one warm-up, at batch 1 and batch 64, random
  inputs, torch.inference_mode, --threads torch threads (default 1).

"dense" is the zoo model with the decompressed weights loaded (``CompressedModel.load_into``);
"lean" is ``legonet.nn.load_lean`` (meta skeleton, codebook + packed indices). Both compute the
same outputs (tests/nn). Top-1 on a seeded random subset of the shared CIFAR-10 test split is
reported for the original and the compressed weights so the setting's accuracy cost is visible.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's legonet, not another installed copy
SHARED = ROOT.parent / "shared"
CHECKPOINTS = {
    "resnet20": "models/resnet20_cifar10.safetensors",
    "resnet56": "models/resnet56_cifar10.safetensors",
    "resnet50_cifar": "models/resnet50_cifar10.safetensors.index.json",
}


def _trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS shows what is held, not what was."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss(field: str = "RssAnon") -> int:
    """Resident memory from /proc/self/status; RssAnon is heap and tensors, without the shared
    library code pages that a first call into some torch kernel maps in (VmRSS counts those)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, arch: str, lego: str) -> dict:
    import torch

    import legonet
    from legonet.nn import load_lean, tensor_bytes
    from legonet.zoo import build, get_arch

    # Warm the process first (read the file once and drop it) so that the RSS difference is the
    # model's memory, not code pages and allocator arenas touched for the first time.
    legonet.load(lego)
    gc.collect()
    _trim()
    rss0, total0 = _rss(), _rss("VmRSS")
    if mode == "dense":
        model = legonet.load(lego).load_into(build(arch)).eval()
    else:
        model = load_lean(lego, arch)
    gc.collect()
    _trim()
    rss1 = _rss()
    out = {"mode": mode, "arch": arch, "rss_bytes": rss1 - rss0, "rss_before_bytes": rss0,
           "tensor_bytes": tensor_bytes(model)}
    with torch.inference_mode():  # one batch-64 forward, so that the peak includes inference
        model(torch.randn(64, *get_arch(arch).input_size))
    out["peak_rss_over_baseline_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - total0
    return out


def latency(arch: str, lego: str, repeats: int, threads: int) -> dict:
    """Both models in one process, timed alternately, so that a changing machine load hits both alike."""
    import torch

    import legonet
    from legonet.nn import load_lean
    from legonet.zoo import build, get_arch

    torch.set_num_threads(threads)
    models = {"dense": legonet.load(lego).load_into(build(arch)).eval(), "lean": load_lean(lego, arch)}
    torch.manual_seed(0)
    out: dict = {"dense": {}, "lean": {}}
    for batch in (1, 64):
        x = torch.randn(batch, *get_arch(arch).input_size)
        times: dict[str, list[float]] = {"dense": [], "lean": []}
        with torch.inference_mode():
            for m in models.values():
                m(x)
            for r in range(repeats):
                for mode in (("dense", "lean") if r % 2 == 0 else ("lean", "dense")):
                    t = time.perf_counter()
                    models[mode](x)
                    times[mode].append(time.perf_counter() - t)
        for mode, ts in times.items():
            out[mode][f"latency_b{batch}_s"] = statistics.median(ts)
            out[mode][f"latency_b{batch}_all_s"] = ts
    return out


def _top1(arch: str, lego: Path, images: int) -> tuple[float, float]:
    import legonet
    from legonet.artifact import load_weights
    from legonet.data import load_images
    from legonet.evaluate import top1
    from legonet.io.checkpoints import read_state_dict
    from legonet.nn import load_lean
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    data = load_images(SHARED / "data" / "cifar10-test.npz").subset(images, seed=0)
    model = build(arch)
    load_weights(model, read_state_dict(SHARED / CHECKPOINTS[arch]))
    original = top1(model, data, spec.mean, spec.std)
    del model
    return original, top1(load_lean(legonet.load(lego), arch), data, spec.mean, spec.std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--work", type=Path, default=Path("/tmp/legonet-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ARCH", "LEGO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "latency":
            print(json.dumps(latency(*args.child[1:], args.repeats, args.threads)))
        else:
            print(json.dumps(child(*args.child)))
        return
    if not SHARED.is_dir():
        sys.exit(f"needs the shared checkpoints in {SHARED}")
    import legonet
    from legonet.io.checkpoints import read_state_dict

    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                           "load_avg_start": os.getloadavg()}, "setting": "4x4 blocks, K=32, model-wide", "models": []}
    for arch in args.models:
        lego = args.work / f"{arch}-b4k32.lego"
        if not lego.exists():
            print(f"compressing {arch} -> {lego}", file=sys.stderr)
            legonet.compress(read_state_dict(SHARED / CHECKPOINTS[arch]), legonet.LegoConfig(block=4, clusters=32)).save(lego)
        row = {"arch": arch, "lego_file_bytes": lego.stat().st_size}
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for mode in ("dense", "lean", "latency"):
            run = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads),
                                  "--child", mode, arch, str(lego)], capture_output=True, text=True, env=env)
            if run.returncode:
                sys.exit(f"{arch} {mode} failed:\n{run.stderr[-2000:]}")
            res = json.loads(run.stdout.strip().splitlines()[-1])
            if mode == "latency":
                row["dense"].update(res["dense"])
                row["lean"].update(res["lean"])
            else:
                row[mode] = res
        for mode in ("dense", "lean"):
            r = row[mode]
            print(f"{arch} {mode}: {r['tensor_bytes']:,} tensor B, rss {r['rss_bytes']:,} B, "
                  f"b1 {r['latency_b1_s'] * 1e3:.1f} ms, b64 {r['latency_b64_s'] * 1e3:.0f} ms", file=sys.stderr)
        if args.eval_images:
            row["top1_original"], row["top1_compressed"] = _top1(arch, lego, args.eval_images)
            row["eval_images"] = args.eval_images
        results["models"].append(row)
    results["machine"]["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps(results, indent=2))
    (args.out / "runtime.md").write_text(render(results))
    print(render(results))


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"Setting: {results['setting']}. Machine: {m['cpus']} CPUs shared with other jobs; load average "
             f"{m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end; torch threads "
             f"{m['torch_threads']}. Latency: median of the timed forwards.", "",
             "| model | tensor bytes dense | tensor bytes lean | ratio | RSS dense | RSS lean | ratio | peak MB dense | peak MB lean | "
             "b1 dense ms | b1 lean ms | b1 ratio | b64 dense ms | b64 lean ms | b64 ratio | top-1 orig | top-1 lean |",
             "|" + "---|" * 17]
    for r in results["models"]:
        d, ln = r["dense"], r["lean"]
        acc = (f"{100 * r['top1_original']:.1f} % | {100 * r['top1_compressed']:.1f} %" if "top1_original" in r
               else "- | -")
        lines.append(
            f"| {r['arch']} | {d['tensor_bytes']:,} | {ln['tensor_bytes']:,} | {d['tensor_bytes'] / ln['tensor_bytes']:.1f}x | "
            f"{d['rss_bytes']:,} | {ln['rss_bytes']:,} | {d['rss_bytes'] / max(ln['rss_bytes'], 1):.1f}x | "
            f"{d['peak_rss_over_baseline_bytes'] / 2**20:.0f} | {ln['peak_rss_over_baseline_bytes'] / 2**20:.0f} | "
            f"{d['latency_b1_s'] * 1e3:.1f} | {ln['latency_b1_s'] * 1e3:.1f} | {ln['latency_b1_s'] / d['latency_b1_s']:.2f}x | "
            f"{d['latency_b64_s'] * 1e3:.0f} | {ln['latency_b64_s'] * 1e3:.0f} | {ln['latency_b64_s'] / d['latency_b64_s']:.2f}x | {acc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
