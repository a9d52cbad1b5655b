"""Speed benchmark of the k-means engine and of streaming compression (issue 7).

One command::

    python benchmarks/speed.py [--threads N] [--params 1e9] [--resnet50 INDEX.json]

(a) ResNet-50 blocks (4x4; K=32 and K=256): wall time and final inertia of legonet's engine,
    scikit-learn's KMeans and faiss-cpu's Kmeans, in one process, same blocks, same K, same cap
    on iterations (25, faiss's default), same thread count. Every inertia is measured the same way:
    each method's centroids, every block assigned to its nearest one (exact float64 distances).
    Every time covers fitting the centroids and labelling every block (faiss: ``train`` on its
    default sample, then ``index.search`` of all blocks; scikit-learn: ``fit``, whose ``labels_``
    cover all blocks; legonet: ``kmeans``, which returns every label).
    Also the end-to-end time of ``legonet compress`` on the sharded ResNet-50 (read, fit, assign,
    write), in process and as the CLI command.
(b) A synthetic sharded checkpoint of ``--params`` float16 parameters (Linear shapes of a
    TinyLlama-1.1B-like decoder, heavy-tailed weights), generated under /tmp and deleted afterwards,
    compressed at 4x4/K=256 by the streaming path in a subprocess: wall time and peak RSS.
(c) The same on a GPU when ``torch.cuda.is_available()``; otherwise recorded as not available.

Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``. The machine may be
shared: the load average before and after each part is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from legonet.compress import select_tensors  # noqa: E402
from legonet.config import LegoConfig  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.ops.kmeans import kmeans  # noqa: E402
from legonet.ops.tiling import tile  # noqa: E402

DEFAULT_R50 = ROOT.parent / "shared" / "models" / "resnet50_cifar10.safetensors.index.json"
ITERS = 25


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def exact_inertia(x: torch.Tensor, c: torch.Tensor) -> float:
    """Sum over all rows of the squared distance to the nearest centroid, in float64."""
    xd, cd = x.double(), torch.as_tensor(np.asarray(c), dtype=torch.float64)
    total, c_sq = 0.0, (cd * cd).sum(1)
    for s in range(0, xd.shape[0], 65536):
        xc = xd[s : s + 65536]
        d = (xc * xc).sum(1, keepdim=True) - 2 * xc @ cd.T + c_sq
        total += float(d.min(1).values.clamp_min(0).sum())
    return total


def resnet50_blocks(index: Path) -> torch.Tensor:
    sd = read_state_dict(index)
    names = select_tensors(sd, LegoConfig())
    return torch.cat([tile(sd[n].float(), (4, 4)) for n in names]).contiguous()


def bench_engines(x: torch.Tensor, k: int, threads: int) -> dict:
    """Every engine's time covers producing the centroids AND the label of every block."""
    import faiss
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    out: dict = {"K": k, "blocks": int(x.shape[0]), "max_iters": ITERS}
    xn = x.numpy()
    fit_sample = LegoConfig().kmeans.max_fit_points
    t = time.perf_counter()
    r = kmeans(x, k, seed=0, max_iters=ITERS, max_fit_points=fit_sample)
    out["legonet"] = {"seconds": time.perf_counter() - t, "inertia": exact_inertia(x, r.centroids),
                      "lloyd_iterations": r.iterations, "fit_sample": min(fit_sample, int(x.shape[0])),
                      "working_set": max(1 << 16, 1024 * k), "labels": int(r.labels.numel())}
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    f = faiss.Kmeans(x.shape[1], k, niter=ITERS, seed=1, verbose=False)
    f.train(xn)
    _, labels = f.index.search(xn, 1)  # the label of every block, as the others produce
    out["faiss"] = {"seconds": time.perf_counter() - t, "inertia": exact_inertia(x, f.centroids),
                    "fit_sample": min(int(x.shape[0]), 256 * k), "labels": int(labels.size),
                    "note": "time = train (on faiss's default sample of 256 blocks per centroid) + index.search of all blocks"}
    with threadpool_limits(threads):
        t = time.perf_counter()
        s = KMeans(k, n_init=1, max_iter=ITERS, random_state=0).fit(xn)
        out["sklearn"] = {"seconds": time.perf_counter() - t, "inertia": exact_inertia(x, s.cluster_centers_),
                          "lloyd_iterations": int(s.n_iter_), "labels": int(s.labels_.size),
                          "note": "fit() computes labels_ for all blocks (final E-step included)"}
    # The same engine at faiss's operating point: 256 blocks per centroid, a uniform sample (as
    # faiss) or the importance-sampled working set drawn from all blocks, no full-data polish.
    t = time.perf_counter()
    r = kmeans(x, k, seed=0, max_iters=ITERS, max_fit_points=256 * k)
    out["legonet_faiss_sample"] = {"seconds": time.perf_counter() - t, "inertia": exact_inertia(x, r.centroids),
                                   "lloyd_iterations": r.iterations, "fit_sample": 256 * k}
    t = time.perf_counter()
    r = kmeans(x, k, seed=0, max_iters=ITERS, max_fit_points=fit_sample, working_points=256 * k, polish_iters=0)
    out["legonet_faiss_working_set"] = {"seconds": time.perf_counter() - t, "inertia": exact_inertia(x, r.centroids),
                                        "lloyd_iterations": r.iterations, "working_set": 256 * k, "polish_iters": 0}
    lg, sk, fa = out["legonet"], out["sklearn"], out["faiss"]
    for name in ("legonet_faiss_sample", "legonet_faiss_working_set"):
        out[f"{name}_time_vs_faiss"] = out[name]["seconds"] / fa["seconds"]
        out[f"{name}_inertia_vs_faiss"] = out[name]["inertia"] / fa["inertia"]
    out["speedup_vs_sklearn"] = sk["seconds"] / lg["seconds"]
    out["time_vs_faiss"] = lg["seconds"] / fa["seconds"]
    out["inertia_vs_sklearn"] = lg["inertia"] / sk["inertia"]
    out["inertia_vs_faiss"] = lg["inertia"] / fa["inertia"]
    return out


def bench_seeds(x: torch.Tensor, seeds: int) -> dict:
    """legonet's default engine over several seeds: the spread of its inertia (and time)."""
    out: dict = {"seeds": list(range(seeds)), "max_iters": ITERS}
    for k in (32, 256):
        runs = []
        for seed in range(seeds):
            t = time.perf_counter()
            r = kmeans(x, k, seed=seed, max_iters=ITERS, max_fit_points=LegoConfig().kmeans.max_fit_points)
            runs.append({"seed": seed, "seconds": time.perf_counter() - t, "inertia": exact_inertia(x, r.centroids)})
        out[f"K{k}"] = runs
    return out


def bench_end_to_end(index: Path, threads: int, tmp: Path) -> dict:
    from legonet.compress import compress
    from legonet.report import build_report
    from legonet.streaming import compress_sharded

    t = time.perf_counter()
    cm, nbytes = compress_sharded(index, tmp / "r50-stream.lego", LegoConfig(block=4, clusters=32))
    stream_s = time.perf_counter() - t
    t = time.perf_counter()
    compress(read_state_dict(index), LegoConfig(block=4, clusters=32)).save(tmp / "r50-mem.lego")
    mem_s = time.perf_counter() - t
    same = (tmp / "r50-stream.lego").read_bytes() == (tmp / "r50-mem.lego").read_bytes()
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "legonet", "compress", str(index), "-o", str(tmp / "r50-cli.lego"),
                    "-k", "32", "--quiet"], check=True, env=env)
    cli_s = time.perf_counter() - t
    return {"streaming_in_process_seconds": stream_s, "in_memory_in_process_seconds": mem_s,
            "cli_seconds_including_interpreter_start": cli_s, "file_bytes": nbytes,
            "streaming_equals_in_memory_bytes": same, "compression_ratio_file": build_report(cm, nbytes).ratio}


# -- (b) synthetic sharded checkpoint ---------------------------------------------------------------
def synthetic_shapes(params: float) -> list[tuple[str, tuple[int, ...]]]:
    """Linear weights (and norms) of a TinyLlama-1.1B-like decoder, layers scaled to ``params``."""
    h, inter, kv = 2048, 5632, 256
    per_layer = [("self_attn.q_proj.weight", (h, h)), ("self_attn.k_proj.weight", (kv, h)),
                 ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, h)),
                 ("mlp.gate_proj.weight", (inter, h)), ("mlp.up_proj.weight", (inter, h)),
                 ("mlp.down_proj.weight", (h, inter)), ("input_layernorm.weight", (h,)),
                 ("post_attention_layernorm.weight", (h,))]
    layer_params = sum(int(np.prod(s)) for _, s in per_layer)
    head = ("lm_head.weight", (32000, h))
    layers = max(1, math.ceil((params - 32000 * h) / layer_params))
    shapes = [(f"model.layers.{i}.{n}", s) for i in range(layers) for n, s in per_layer]
    return shapes + [("model.norm.weight", (h,)), head]


def write_synthetic(folder: Path, params: float, shard_bytes: int, seed: int = 0) -> tuple[Path, int]:
    """Generate the checkpoint shard by shard (never more than one shard in memory)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = synthetic_shapes(params)
    groups, size = [[]], 0
    for name, shape in shapes:
        nb = 2 * int(np.prod(shape))
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"synthetic-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for name, shape in group:
            if len(shape) == 1:
                part[name] = (1 + 0.1 * torch.randn(shape, generator=g)).half()
                continue
            # Heavy tails: a Gaussian scale mixture (log-normal scale per element), a few outlier
            # input channels, and per-row scales; std about 0.02 like trained LLM layers.
            w = torch.randn(shape, generator=g)
            w *= torch.exp(0.4 * torch.randn(shape, generator=g))
            w *= torch.exp(0.2 * torch.randn(shape[0], 1, generator=g))
            cols = torch.randperm(shape[1], generator=g)[: max(1, shape[1] // 100)]
            w[:, cols] *= 6.0
            part[name] = (0.02 * w).half()
            del w
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() for t in part.values())
        del part
    index = folder / "synthetic.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_parameters": total}, "weight_map": weight_map}))
    return index, total


_STREAM_CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    from legonet.config import LegoConfig
    from legonet.streaming import compress_sharded
    index, out, threads, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(threads)
    stages = {}
    def progress(task, done, total):
        stages.setdefault(task, [time.perf_counter(), None])[1] = time.perf_counter()
    t = time.perf_counter()
    cm, nbytes = compress_sharded(index, out, LegoConfig(block=4, clusters=256), progress=progress,
                                  device=None if device == "cpu" else device)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": wall, "peak_rss_bytes": peak, "file_bytes": nbytes,
                      "stage_seconds": {k: v[1] - v[0] for k, v in stages.items()}}))
""")


def bench_streaming(params: float, threads: int, shard_bytes: int, device: str) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="legonet-speed-", dir="/tmp"))
    try:
        t = time.perf_counter()
        index, total = write_synthetic(folder, params, shard_bytes)
        gen_s = time.perf_counter() - t
        shards = len(list(folder.glob("*.safetensors")))
        env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
        before = load()
        out = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(index), str(folder / "out.lego"),
                              str(threads), device], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(parameters=total, checkpoint_bytes=2 * total, shards=shards, shard_bytes=shard_bytes,
                   generation_seconds=gen_s, load_before=before, load_after=load(), device=device,
                   fp32_bytes=4 * total, compression_ratio_file=4 * total / res["file_bytes"], config="4x4 blocks, K=256, model-wide codebook, default k-means")
        return res
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every engine")
    ap.add_argument("--params", type=float, default=1e9, help="size of the synthetic checkpoint (b)")
    ap.add_argument("--shard-bytes", type=int, default=500_000_000, help="shard size of the synthetic checkpoint")
    ap.add_argument("--resnet50", type=Path, default=DEFAULT_R50, help="sharded ResNet-50 index for (a)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["engines", "seeds", "end2end", "stream", "gpu"])
    ap.add_argument("--seeds", type=int, default=5, help="seeds of legonet's default engine in the seed study")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Parts skipped in this run keep their figures from the previous results file (each part
    # carries its own date-free load readings; the header records the latest run).
    prev = args.out / "speed.json"
    res: dict = json.loads(prev.read_text()) if prev.is_file() else {}
    res |= {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                 "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                 "load_at_start": load(),
                 "note": "shared machine: other jobs ran during the benchmark; see the load averages"}
    res["command"] = " ".join(["python", "benchmarks/speed.py"] + sys.argv[1:])
    try:
        import faiss
        import sklearn

        res["versions"] = {"scikit-learn": sklearn.__version__, "faiss": getattr(faiss, "__version__", "?")}
    except ImportError:
        res["versions"] = None
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "speed.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "speed.md").write_text(markdown(res))

    if args.resnet50.is_file():
        if "engines" not in args.skip and res["versions"]:
            x = resnet50_blocks(args.resnet50)
            res["resnet50_engines"] = []
            for k in (32, 256):
                before = load()
                r = bench_engines(x, k, args.threads)
                r.update(load_before=before, load_after=load())
                res["resnet50_engines"].append(r)
                print(json.dumps(r), flush=True)
                save()
        if "seeds" not in args.skip:
            x = resnet50_blocks(args.resnet50)
            before = load()
            r = bench_seeds(x, args.seeds)
            r.update(load_before=before, load_after=load())
            res["resnet50_seeds"] = r
            print(json.dumps(r), flush=True)
            save()
        if "end2end" not in args.skip:
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                before = load()
                r = bench_end_to_end(args.resnet50, args.threads, Path(tmp))
                r.update(load_before=before, load_after=load())
                res["resnet50_end_to_end"] = r
                print(json.dumps(r), flush=True)
                save()
    else:
        res["resnet50_engines"] = f"skipped: {args.resnet50} not found"
    if "stream" not in args.skip:
        r = bench_streaming(args.params, args.threads, args.shard_bytes, "cpu")
        res["synthetic_streaming_cpu"] = r
        print(json.dumps(r), flush=True)
        save()
    if torch.cuda.is_available() and "gpu" not in args.skip:
        res["gpu"] = {"device": torch.cuda.get_device_name(0)}
        if args.resnet50.is_file():
            x = resnet50_blocks(args.resnet50).cuda()
            for k in (32, 256):
                kmeans(x[:100_000], k, seed=0, max_iters=2)  # warm-up (CUDA context, kernels)
                torch.cuda.synchronize()
                t = time.perf_counter()
                r = kmeans(x, k, seed=0, max_iters=ITERS)
                torch.cuda.synchronize()
                res["gpu"][f"resnet50_K{k}"] = {"seconds": time.perf_counter() - t,
                                                 "inertia": exact_inertia(x.cpu(), r.centroids.cpu())}
        res["gpu"]["synthetic_streaming"] = bench_streaming(args.params, args.threads, args.shard_bytes, "cuda")
    else:
        res["gpu"] = "not available: no CUDA device on this machine (torch.cuda.is_available() is False)"
    res["load_at_end"] = load()
    save()
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = [f"# legonet speed benchmark ({res['date']})", "",
             f"CPU: {res['cpu']} ({res['cpu_count']} cores), {res['threads']} thread(s) for every engine; "
             f"torch {res['torch']}; load average at start {res['load_at_start']} ({res['note']}).", ""]
    eng = res.get("resnet50_engines")
    if isinstance(eng, list) and eng:
        lines += ["## ResNet-50 blocks (4x4), same blocks, K and iteration cap (25) for every engine", "",
                  "legonet: default settings (fit sample = all blocks here, importance-sampled working set, "
                  "1 full-data polish iteration, final assignment).", "",
                  "| K | blocks | legonet s | sklearn s | faiss s | legonet inertia | sklearn inertia | faiss inertia "
                  "| speed-up vs sklearn | time vs faiss | load before/after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in eng:
            lines.append(f"| {r['K']} | {r['blocks']:,} | {r['legonet']['seconds']:.2f} | {r['sklearn']['seconds']:.2f} "
                         f"| {r['faiss']['seconds']:.2f} | {r['legonet']['inertia']:.2f} | {r['sklearn']['inertia']:.2f} "
                         f"| {r['faiss']['inertia']:.2f} | {r['speedup_vs_sklearn']:.1f}x | {r['time_vs_faiss']:.2f}x "
                         f"| {r['load_before']} / {r['load_after']} |")
        lines += ["", "Same engine at faiss's operating point (256 blocks per centroid, no full-data polish): "
                  "a uniform sample like faiss's, or the importance-sampled working set drawn from all blocks:", "",
                  "| K | uniform sample s | inertia | working set s | inertia | faiss s | faiss inertia "
                  "| time vs faiss (uniform / working set) |", "|---|---|---|---|---|---|---|---|"]
        for r in eng:
            if "legonet_faiss_working_set" in r:
                lf, lw = r["legonet_faiss_sample"], r["legonet_faiss_working_set"]
                lines.append(f"| {r['K']} | {lf['seconds']:.2f} | {lf['inertia']:.2f} | {lw['seconds']:.2f} "
                             f"| {lw['inertia']:.2f} | {r['faiss']['seconds']:.2f} | {r['faiss']['inertia']:.2f} "
                             f"| {r['legonet_faiss_sample_time_vs_faiss']:.2f}x / "
                             f"{r['legonet_faiss_working_set_time_vs_faiss']:.2f}x |")
        lines += ["", "Every time covers the centroids and the label of every block (faiss: train + index.search)."]
        lines.append("")
    sd = res.get("resnet50_seeds")
    if sd:
        lines += ["## Seed study: legonet's default engine on ResNet-50 blocks, seeds "
                  f"{sd['seeds'][0]}..{sd['seeds'][-1]}", "",
                  "| K | inertia min / median / max | seconds min / median / max | sklearn inertia (seed 0) "
                  "| seeds at or below sklearn |", "|---|---|---|---|---|"]
        sk = {r["K"]: r["sklearn"]["inertia"] for r in eng} if isinstance(eng, list) else {}
        for k in (32, 256):
            runs = sd.get(f"K{k}", [])
            if not runs:
                continue
            inert = sorted(r["inertia"] for r in runs)
            secs = sorted(r["seconds"] for r in runs)
            ref = sk.get(k)
            below = sum(v <= ref for v in inert) if ref else "-"
            lines.append(f"| {k} | {inert[0]:.2f} / {inert[len(inert) // 2]:.2f} / {inert[-1]:.2f} "
                         f"| {secs[0]:.2f} / {secs[len(secs) // 2]:.2f} / {secs[-1]:.2f} "
                         f"| {ref:.2f} | {below} of {len(runs)} |" if ref else f"| {k} | {inert} | {secs} | - | - |")
        lines += [f"load {sd['load_before']} / {sd['load_after']}", ""]
    e2e = res.get("resnet50_end_to_end")
    if e2e:
        lines += ["## ResNet-50 end to end (read, fit, assign, write), 4x4, K=32", "",
                  f"- streaming path, in process: {e2e['streaming_in_process_seconds']:.2f} s",
                  f"- in-memory path, in process: {e2e['in_memory_in_process_seconds']:.2f} s",
                  f"- `legonet compress ... -k 32 --quiet` including interpreter start: "
                  f"{e2e['cli_seconds_including_interpreter_start']:.2f} s",
                  f"- file {e2e['file_bytes']:,} bytes ({e2e['compression_ratio_file']:.1f}x); streaming bytes == "
                  f"in-memory bytes: {e2e['streaming_equals_in_memory_bytes']}; load {e2e['load_before']} / "
                  f"{e2e['load_after']}", ""]
    st = res.get("synthetic_streaming_cpu")
    if st:
        lines += [f"## Synthetic sharded checkpoint, {st['parameters']:,} float16 parameters, {st['shards']} shards", "",
                  f"- {st['config']}: {st['seconds']:.1f} s, peak RSS {st['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"(checkpoint {st['checkpoint_bytes'] / 2**30:.2f} GiB, shard <= {st['shard_bytes'] / 1e6:.0f} MB)",
                  "- stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in st["stage_seconds"].items()),
                  f"- file {st['file_bytes']:,} bytes ({st['compression_ratio_file']:.1f}x vs fp32); load "
                  f"{st['load_before']} / {st['load_after']}", ""]
    gpu = res.get("gpu")
    lines += ["## GPU", "", json.dumps(gpu, indent=1) if isinstance(gpu, dict) else str(gpu), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
