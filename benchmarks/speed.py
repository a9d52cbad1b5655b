"""Speed benchmark of the k-means engine, of its thread use on a busy machine, of streaming and of target mode.

One command::

    python benchmarks/speed.py [--threads N] [--params 1e9] [--resnet50 INDEX.json] [--skip PART ...]
                               [--target-nets resnet20,resnet56,...]

(a) The k-means table, measured in one run on ResNet-50's 4x4 blocks. Each row (or group of rows
    measured together) is a function in ``ROWS``: add a function there to add a row.
    * engines at K=32 and K=256: legonet (default settings, and at faiss's operating point:
      256 blocks per centroid, no full-data pass but the final assignment), scikit-learn's KMeans
      and faiss-cpu's Kmeans (its default, and trained on more blocks, which is what it takes to
      approach legonet's inertia), ``--threads`` threads each (1 for the published figures), same
      blocks, same cap of 25 Lloyd iterations. Every time covers the centroids AND the label of
      every block (faiss: ``train`` + ``index.search``; scikit-learn: ``fit``, whose ``labels_``
      cover every block; legonet: ``kmeans``). Every inertia is measured the same way: each
      method's centroids, every block assigned to its nearest one, float64 distances.
    * threads: legonet's K=256 job idle and beside two processes that keep both cores busy
      (spawned here, killed after), with the thread count chosen by ``legonet.threads`` and with
      PyTorch's default; the busy/idle ratio of each.
(b) Seed study: legonet's default engine over several seeds.
(c) ResNet-50 end to end: ``legonet compress`` in process (streaming and in memory) and as the CLI.
(d) A synthetic sharded checkpoint of ``--params`` float16 parameters (Linear shapes of a
    TinyLlama-1.1B-like decoder, heavy-tailed weights), generated under /tmp and deleted afterwards,
    compressed at 4x4/K=256 by the streaming path in a subprocess: wall time and peak RSS.
(e) The same on a GPU when ``torch.cuda.is_available()``; otherwise recorded as not available.
(f) Target mode end to end (rows in ``TARGET_ROWS``, ``--target-nets`` picks some): data-free 8x of
    ResNet-20, ResNet-56, ResNet-50 (CIFAR-10) and EfficientNet-Lite1 through ``legonet.compress`` and
    ``cm.save``, and ResNet-56 at 8, 12 and 16x as one ``legonet compress --target-ratio 8,12,16`` call
    against one call per ratio. Each run is a fresh process timed from after its imports and model
    load (CLI rows: from the call, which reads the checkpoint) to the last file written; each row
    idle, then beside two busy processes (as the threads rows), with legonet choosing its threads.
    Per-step times, file ratio and threads are recorded; rows whose weights are missing
    (``$LEGONET_SHARED`` or ``../shared``) are recorded as skipped.

Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``. The machine may be
shared: the load average before the run and before/after each part is recorded with the figures,
with the CPU model and the torch version. Parts skipped keep their figures from the previous file.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import bundled, shared_dir  # noqa: E402
from legonet.clustering import select_tensors  # noqa: E402
from legonet.config import LegoConfig  # noqa: E402
from legonet.io.checkpoints import read_state_dict  # noqa: E402
from legonet.ops.kmeans import kmeans  # noqa: E402
from legonet.ops.tiling import tile  # noqa: E402
from legonet.threads import own_load, usable_cores, using_threads  # noqa: E402

DEFAULT_R50 = ROOT.parent / "shared" / "models" / "resnet50_cifar10.safetensors.index.json"
ITERS = 25
# PyTorch's own choice, before this script sets anything.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


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


# -- (a) the k-means table: rows are functions ------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """What every row function gets: the blocks ``(n, 16)`` and the run's settings."""

    blocks: torch.Tensor
    threads: int
    busy_warmup_s: float


@dataclass(frozen=True)
class RowGroup:
    """Rows measured together: ``part`` names them for ``--skip``; ``measure`` returns row dicts
    with at least ``table``, ``row`` and ``seconds``."""

    part: str
    measure: Callable[[Context], list[dict]]


def _timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``(result, wall seconds, CPU seconds of this process)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _engine_row(engine: str, k: int, x: torch.Tensor, centroids, wall: float, cpu: float, **extra) -> dict:
    return {"table": "engines", "row": engine, "K": k, "seconds": wall, "cpu_seconds": cpu,
            "inertia": exact_inertia(x, centroids), **extra}


def legonet_rows(k: int) -> Callable[[Context], list[dict]]:
    """legonet's default engine, and at faiss's operating point (256 blocks per centroid)."""

    def measure(ctx: Context) -> list[dict]:
        x, fit = ctx.blocks, LegoConfig().kmeans.max_fit_points
        with using_threads(ctx.threads):
            r, wall, cpu = _timed(lambda: kmeans(x, k, seed=0, max_iters=ITERS, max_fit_points=fit))
            rows = [_engine_row("legonet", k, x, r.centroids, wall, cpu, lloyd_iterations=r.iterations,
                                labels=int(r.labels.numel()), settings="default")]
            r, wall, cpu = _timed(lambda: kmeans(x, k, seed=0, max_iters=ITERS, max_fit_points=fit,
                                                 working_points=256 * k, polish_iters=0))
            rows.append(_engine_row("legonet, faiss's operating point", k, x, r.centroids, wall, cpu,
                                    lloyd_iterations=r.iterations, labels=int(r.labels.numel()),
                                    settings=f"working_points={256 * k}, polish_iters=0"))
        return rows

    return measure


def faiss_rows(k: int, points_per_centroid: tuple[int, ...]) -> Callable[[Context], list[dict]]:
    """faiss-cpu's Kmeans: ``train`` on its sample (256 blocks per centroid by default), then the
    label of every block by ``index.search``."""

    def measure(ctx: Context) -> list[dict]:
        import faiss

        x, xn, rows = ctx.blocks, ctx.blocks.numpy(), []
        faiss.omp_set_num_threads(ctx.threads)
        for ppc in points_per_centroid:
            def run():
                f = faiss.Kmeans(x.shape[1], k, niter=ITERS, seed=1, verbose=False, max_points_per_centroid=ppc)
                f.train(xn)
                _, labels = f.index.search(xn, 1)
                return f.centroids, labels

            (centroids, labels), wall, cpu = _timed(run)
            name = "faiss" if ppc == 256 else f"faiss, {ppc} blocks per centroid"
            rows.append(_engine_row(name, k, x, centroids, wall, cpu, labels=int(labels.size),
                                    settings=f"trains on {min(ppc * k, x.shape[0]):,} blocks"))
        return rows

    return measure


def sklearn_rows(k: int) -> Callable[[Context], list[dict]]:
    """scikit-learn's KMeans (Lloyd, k-means++ on every block); ``fit`` labels every block."""

    def measure(ctx: Context) -> list[dict]:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        x = ctx.blocks
        with threadpool_limits(ctx.threads):
            s, wall, cpu = _timed(lambda: KMeans(k, n_init=1, max_iter=ITERS, random_state=0).fit(x.numpy()))
        return [_engine_row("scikit-learn", k, x, s.cluster_centers_, wall, cpu, lloyd_iterations=int(s.n_iter_),
                            labels=int(s.labels_.size), settings="n_init=1")]

    return measure


@contextmanager
def busy_cores(count: int, warmup_s: float, own_session: bool = True) -> Iterator[list[float]]:
    """``count`` processes that each keep a core busy, killed on exit; waits ``warmup_s`` first so
    that the 1-minute load average sees them. Yields the load average after the wait.

    ``own_session``: started in a session of their own, as another program would be. Linux's
    scheduler (autogroup) shares the CPU between sessions first, then between the threads of a
    session: busy processes in this script's session take their share out of the job's.
    """
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=own_session)
             for _ in range(count)]
    try:
        time.sleep(warmup_s)
        yield load()
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def thread_rows(k: int) -> Callable[[Context], list[dict]]:
    """legonet's default K=``k`` job idle, then beside two processes that keep both cores busy: with
    the thread count ``legonet.threads`` chooses and with PyTorch's default."""

    def job(ctx: Context, condition: str, threads: int | None, seen_load: list[float]) -> dict:
        x = ctx.blocks
        with using_threads(threads) as n:
            r, wall, cpu = _timed(lambda: kmeans(x, k, seed=0, max_iters=ITERS))
        rule = "legonet.threads" if threads is None else "PyTorch default"
        return {"table": "threads", "row": f"{condition}, {rule}",
                "K": k, "threads": n, "seconds": wall, "cpu_seconds": cpu, "inertia": exact_inertia(x, r.centroids),
                "load_seen": seen_load[0], "own_load": round(own_load(), 2), "cores": usable_cores()}

    def measure(ctx: Context) -> list[dict]:
        rows = [job(ctx, "idle", t, load()) for t in (None, TORCH_DEFAULT_THREADS)]
        with busy_cores(2, ctx.busy_warmup_s) as seen:
            rows += [job(ctx, BUSY, None, seen), job(ctx, BUSY, TORCH_DEFAULT_THREADS, load())]
        # The same processes started from this script's session: no thread count wins back the
        # share they take (the load average still holds the processes above, hence no wait).
        with busy_cores(2, 1.0, own_session=False) as seen:
            rows.append(job(ctx, BUSY_SAME_SESSION, None, seen))
        return rows

    return measure


BUSY = "beside 2 busy processes"
BUSY_SAME_SESSION = "beside 2 busy processes of this session"


ROWS: list[RowGroup] = [
    RowGroup("engines", legonet_rows(32)),
    RowGroup("engines", faiss_rows(32, (256,))),
    RowGroup("engines", sklearn_rows(32)),
    RowGroup("engines", legonet_rows(256)),
    RowGroup("engines", faiss_rows(256, (256, 1024, 6000))),
    RowGroup("engines", sklearn_rows(256)),
    RowGroup("threads", thread_rows(256)),
]


def summarize(rows: list[dict]) -> dict:
    """Ratios asked of the table: legonet against faiss and scikit-learn per K, busy/idle per rule."""
    by = {(r["table"], r["row"], r.get("K")): r for r in rows}
    out: dict = {}
    for k in sorted({r["K"] for r in rows if r["table"] == "engines"}):
        lg, fa, sk = (by.get(("engines", name, k)) for name in ("legonet", "faiss", "scikit-learn"))
        fast = by.get(("engines", "legonet, faiss's operating point", k))
        entry: dict = {}
        if lg and fa:
            entry |= {"legonet_time_vs_faiss": lg["seconds"] / fa["seconds"],
                      "legonet_cpu_vs_faiss": lg["cpu_seconds"] / fa["cpu_seconds"],
                      "legonet_inertia_vs_faiss": lg["inertia"] / fa["inertia"]}
        if fast and fa:
            entry |= {"faiss_point_time_vs_faiss": fast["seconds"] / fa["seconds"],
                      "faiss_point_cpu_vs_faiss": fast["cpu_seconds"] / fa["cpu_seconds"],
                      "faiss_point_inertia_vs_faiss": fast["inertia"] / fa["inertia"]}
        if lg and sk:
            entry |= {"legonet_speedup_vs_sklearn": sk["seconds"] / lg["seconds"],
                      "legonet_inertia_vs_sklearn": lg["inertia"] / sk["inertia"]}
        out[f"K{k}"] = entry
    threads = [r for r in rows if r["table"] == "threads"]
    idle = {r["row"].split(", ", 1)[1]: r for r in threads if r["row"].startswith("idle, ")}
    for rule, base in idle.items():
        busy = next((r for r in threads if r["row"] == f"{BUSY}, {rule}"), None)
        if busy:
            out[f"busy_over_idle, {rule}"] = busy["seconds"] / base["seconds"]
    if "legonet.threads" in idle:
        # Every threads row against the job alone with the threads legonet.threads chooses.
        ref = idle["legonet.threads"]["seconds"]
        out["vs_idle_with_legonet.threads"] = {r["row"]: r["seconds"] / ref for r in threads}
    return out


def measure_table(ctx: Context, skip: list[str], log: Callable[[dict], None]) -> list[dict]:
    rows = []
    for group in ROWS:
        if group.part in skip:
            continue
        before = load()
        for r in group.measure(ctx):
            r.update(load_before=before, load_after=load())
            rows.append(r)
            log(r)
            before = load()
    return rows


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
    from legonet import compress
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


# -- (f) target mode end to end ---------------------------------------------------------------------
# The slow-down target mode may show beside two busy processes (the time limits, idle, are per row).
TARGET_BUSY_OVER_IDLE = 2.0
# legonet.threads samples /proc/stat when a run starts: the busy processes only need to be running
# (the 60 s warm-up of the threads rows is for the 1-minute load average).
TARGET_BUSY_WARMUP_S = 5.0


@dataclass(frozen=True)
class TargetRow:
    """One target-mode measurement. ``name`` selects it with ``--target-nets`` (rows may share it);
    ``how``: ``"api"`` (``legonet.compress`` + ``cm.save`` per ratio, one process), ``"cli"`` (one
    ``legonet compress --target-ratio R1,R2,...`` call) or ``"cli-separately"`` (one CLI call per
    ratio, each in a fresh process)."""

    name: str
    label: str
    arch: str
    weights: Callable[[], Path]
    ratios: tuple[float, ...] = (8.0,)
    how: str = "api"
    limit_s: float | None = None


def _shared_model(file: str) -> Callable[[], Path]:
    return lambda: shared_dir() / "models" / file


TARGET_ROWS: list[TargetRow] = [
    TargetRow("resnet20", "ResNet-20, 8x", "resnet20", lambda: bundled("resnet20_cifar10.safetensors"), limit_s=10),
    TargetRow("resnet56", "ResNet-56, 8x", "resnet56", _shared_model("resnet56_cifar10.safetensors"), limit_s=10),
    TargetRow("resnet50", "ResNet-50 (CIFAR-10), 8x", "resnet50_cifar",
              _shared_model("resnet50_cifar10.safetensors.index.json"), limit_s=30),
    TargetRow("lite1", "EfficientNet-Lite1, 8x", "efficientnet_lite1",
              _shared_model("efficientnet_lite1_imagenet.safetensors"), limit_s=60),
    TargetRow("resnet56-ratios", "ResNet-56, CLI --target-ratio 8,12,16", "resnet56",
              _shared_model("resnet56_cifar10.safetensors"), (8.0, 12.0, 16.0), "cli"),
    TargetRow("resnet56-ratios", "ResNet-56, CLI 8 / 12 / 16 as three runs", "resnet56",
              _shared_model("resnet56_cifar10.safetensors"), (8.0, 12.0, 16.0), "cli-separately"),
]

# Runs in a fresh interpreter; its clock starts after the imports and the model load. Every call
# of legonet.compress (the CLI's too) is wrapped to record its time, its steps and the threads
# legonet chose: read inside the call, where legonet's own thread scope is in effect.
_TARGET_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    import legonet
    from legonet.report import build_report
    spec = json.loads(sys.argv[1])
    ratios, out = spec["ratios"], Path(spec["out"])
    calls, compress = [], legonet.compress
    def recorded(model, config=None, **kw):
        threads, outer = set(), kw.get("progress")
        def progress(task, done, total):
            threads.add(torch.get_num_threads())
            if outer is not None:
                outer(task, done, total)
        t = time.perf_counter()
        cm = compress(model, config, **(kw | {"progress": progress}))
        seconds = time.perf_counter() - t
        ratios_given = kw.get("target_ratio")
        # a list of ratios returns a list of models, made in one call (one analysis of the weights)
        many = cm if isinstance(cm, list) else [cm]
        each = ratios_given if isinstance(ratios_given, list) else [ratios_given]
        for i, (one, r) in enumerate(zip(many, each)):
            calls.append({"ratio": r, "compress_seconds": seconds if i == 0 else 0.0,
                          "call_covers": len(many), "threads": sorted(threads),
                          "steps": one.log.timing_lines(), "cm": one})
        return cm
    legonet.compress = recorded
    if spec["how"] == "api":
        from legonet.artifact import load_weights
        from legonet.io.checkpoints import read_state_dict
        from legonet.zoo import build
        sd = read_state_dict(spec["weights"])
        model = build(spec["arch"])
        load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        model.eval()
        files = [out.with_name(f"{out.stem}-{r:g}x{out.suffix}") for r in ratios]
        t = time.perf_counter()
        for ratio, path in zip(ratios, files):
            cm = legonet.compress(model, target_ratio=ratio)
            w = time.perf_counter()
            # what the CLI writes: the checkpoint's own tensors, in its dtypes
            cm.tensors = {k: v for k, v in cm.tensors.items() if k in sd}
            cm.adopt_dtypes(sd)
            cm.save(path)
            calls[-1]["write_seconds"] = time.perf_counter() - w
        wall = time.perf_counter() - t
    else:
        from legonet.cli import main
        from legonet.cli.compress import output_paths
        files = output_paths(out, tuple(ratios))
        args = ["compress", spec["weights"], "--target-ratio", ",".join(f"{r:g}" for r in ratios),
                "--arch", spec["arch"], "-o", str(out), "-q"]
        t = time.perf_counter()
        main(args, standalone_mode=False)
        wall = time.perf_counter() - t
    for call, path in zip(calls, files):
        cm = call.pop("cm")
        call.update(file_bytes=os.path.getsize(path), file_ratio=build_report(cm, os.path.getsize(path)).ratio)
    print(json.dumps({"seconds": wall, "calls": calls}))
""")


def _target_child(row: TargetRow, ratios: tuple[float, ...], tmp: Path) -> dict:
    """One fresh process compressing ``row`` at ``ratios``; its own figures (see ``_TARGET_CHILD``)."""
    spec = {"how": "api" if row.how == "api" else "cli", "arch": row.arch, "weights": str(row.weights()),
            "ratios": list(ratios), "out": str(tmp / f"{row.arch}.lego")}
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _TARGET_CHILD, json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(f"target mode, {row.label}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _target_run(row: TargetRow, tmp: Path) -> dict:
    """``row`` measured once: one process, or one per ratio (``cli-separately``, times summed)."""
    batches = [(r,) for r in row.ratios] if row.how == "cli-separately" else [row.ratios]
    runs = []
    for i, ratios in enumerate(batches):
        folder = tmp / f"run{i}"
        folder.mkdir()
        runs.append(_target_child(row, ratios, folder))
        shutil.rmtree(folder)
    return {"seconds": sum(r["seconds"] for r in runs), "run_seconds": [r["seconds"] for r in runs],
            "calls": [c for r in runs for c in r["calls"]]}


def measure_target_row(row: TargetRow, busy_warmup_s: float, tmp: Path) -> dict:
    """``row`` idle, then beside two processes that keep both cores busy; skipped if its weights are missing."""
    out: dict = {"row": row.name, "label": row.label, "arch": row.arch, "ratios": list(row.ratios), "how": row.how,
                 "limit_s": row.limit_s}
    if not row.weights().exists():
        return out | {"skipped": f"weights not found: {row.weights()}"}
    before = load()
    out["idle"] = _target_run(row, tmp) | {"load_before": before, "load_after": load()}
    with busy_cores(2, busy_warmup_s) as seen:
        out[BUSY] = _target_run(row, tmp) | {"load_before": seen, "load_after": load()}
    return out


def target_summary(rows: list[dict], busy_limit: float = TARGET_BUSY_OVER_IDLE) -> dict:
    """Per measured row: busy/idle, and each target met or not (idle time within ``limit_s``,
    busy time within ``busy_limit`` x idle); and one CLI call over several ratios against one call
    per ratio (``at_once_over_separately``, both idle and busy), where both rows were measured."""
    out: dict = {}
    for r in rows:
        if "idle" not in r:
            continue
        idle, busy = r["idle"]["seconds"], r[BUSY]["seconds"]
        entry = {"idle_seconds": idle, "busy_seconds": busy, "busy_over_idle": busy / idle,
                 "busy_met": busy <= busy_limit * idle}
        if r.get("limit_s") is not None:
            entry["idle_met"] = idle <= r["limit_s"]
        out[r["label"]] = entry
    for once in (r for r in rows if r.get("how") == "cli" and "idle" in r):
        apart = next((r for r in rows if r.get("how") == "cli-separately" and r["arch"] == once["arch"]
                      and r["ratios"] == once["ratios"] and "idle" in r), None)
        if apart is not None:
            out[once["label"]]["at_once_over_separately"] = {
                c: once[c]["seconds"] / apart[c]["seconds"] for c in ("idle", BUSY)}
    return out


def merge_target_rows(previous: list[dict], measured: list[dict]) -> list[dict]:
    """This run's rows, plus the previous file's rows of the others (by label), in the order of
    ``TARGET_ROWS`` (labels no longer defined there last)."""
    merged = {r["label"]: r for r in previous} | {r["label"]: r for r in measured}
    order = [r.label for r in TARGET_ROWS]
    return sorted(merged.values(), key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))


def bench_target(nets: list[str] | None, busy_warmup_s: float, log: Callable[[dict], None]) -> list[dict]:
    """The rows of ``TARGET_ROWS`` whose name is in ``nets`` (all when None)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="legonet-speed-", dir="/tmp") as tmp:
        for row in TARGET_ROWS:
            if nets is None or row.name in nets:
                rows.append(measure_target_row(row, busy_warmup_s, Path(tmp)))
                log(rows[-1])
    return rows


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
    ap.add_argument("--threads", type=int, default=TORCH_DEFAULT_THREADS, help="threads for every engine")
    ap.add_argument("--params", type=float, default=1e9, help="size of the synthetic checkpoint (d)")
    ap.add_argument("--shard-bytes", type=int, default=500_000_000, help="shard size of the synthetic checkpoint")
    ap.add_argument("--resnet50", type=Path, default=DEFAULT_R50, help="sharded ResNet-50 index for (a)-(c)")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["engines", "threads", "seeds", "end2end", "stream", "gpu", "target"])
    ap.add_argument("--target-nets", type=lambda v: [n for n in v.split(",") if n],
                    help="comma list of the target-mode rows to run (default: all): "
                         + ", ".join(dict.fromkeys(r.name for r in TARGET_ROWS)))
    ap.add_argument("--seeds", type=int, default=5, help="seeds of legonet's default engine in the seed study")
    ap.add_argument("--busy-warmup", type=float, default=60.0,
                    help="seconds the busy processes run before the threads rows, so that the 1-minute load sees them")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    unknown = sorted(set(args.target_nets or []) - {r.name for r in TARGET_ROWS})
    if unknown:
        ap.error(f"--target-nets: unknown row(s) {', '.join(unknown)}")
    start_load = load()
    torch.set_num_threads(args.threads)
    # Parts skipped in this run keep their figures from the previous results file (each part
    # carries its own load readings; the header records the latest run).
    prev = args.out / "speed.json"
    res: dict = json.loads(prev.read_text()) if prev.is_file() else {}
    res.pop("resnet50_engines", None)  # the layout before the k-means table
    res |= {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(), "threads": args.threads, "torch_default_threads": TORCH_DEFAULT_THREADS,
            "torch": torch.__version__, "python": platform.python_version(), "load_at_start": start_load,
            "note": "shared machine: other jobs may run during the benchmark; see the load averages"}
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
        skip = list(args.skip) + ([] if res["versions"] else ["engines"])
        x = resnet50_blocks(args.resnet50) if {"engines", "threads", "seeds"} - set(skip) else None
        if not {"engines", "threads"} <= set(skip):
            ctx = Context(blocks=x, threads=args.threads, busy_warmup_s=args.busy_warmup)
            rows = measure_table(ctx, skip, lambda r: print(json.dumps(r), flush=True))
            measured = {g.part for g in ROWS if g.part not in skip}
            kept = [r for r in res.get("kmeans_table", []) if r["table"] not in measured]
            res["kmeans_table"] = kept + rows
            res["kmeans_summary"] = summarize(res["kmeans_table"])
            save()
        if "seeds" not in args.skip:
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
        res["kmeans_table"] = f"skipped: {args.resnet50} not found"
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
    elif "gpu" not in args.skip:
        res["gpu"] = "not available: no CUDA device on this machine (torch.cuda.is_available() is False)"
    if "target" not in args.skip:
        rows = bench_target(args.target_nets, TARGET_BUSY_WARMUP_S, lambda r: print(json.dumps(r), flush=True))
        merged = merge_target_rows(res.get("target_mode", {}).get("rows", []), rows)
        res["target_mode"] = {"rows": merged, "summary": target_summary(merged), "busy_warmup_s": TARGET_BUSY_WARMUP_S}
        save()
    res["load_at_end"] = load()
    save()
    print(markdown(res))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


_TABLES = {
    "engines": ("k-means engines on ResNet-50's 4x4 blocks (same blocks, K and cap of 25 iterations; "
                "time covers the centroids and the label of every block)"),
    "threads": "Thread use: legonet's job idle and beside two processes that keep both cores busy",
}


def table_markdown(rows: list[dict], table: str) -> list[str]:
    """One markdown table: the union of the rows' columns, in order of first appearance."""
    rows = [r for r in rows if r["table"] == table]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c != "table"]
    lines = [f"## {_TABLES.get(table, table)}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines + [""]


def markdown(res: dict) -> str:
    lines = [f"# legonet speed benchmark ({res['date']})", "",
             f"CPU: {res['cpu']} ({res['cpu_count']} cores, {res.get('usable_cores', '?')} usable), "
             f"{res['threads']} thread(s) for every engine (PyTorch's default here: "
             f"{res.get('torch_default_threads', '?')}); torch {res['torch']}; load average before the run "
             f"{res['load_at_start']} ({res['note']}).", "", f"Command: `{res['command']}`", ""]
    table = res.get("kmeans_table")
    if isinstance(table, list) and table:
        for name in dict.fromkeys(r["table"] for r in table):
            lines += table_markdown(table, name)
        summ = res.get("kmeans_summary", {})
        lines += ["## Ratios (from the table above, one run)", ""]
        for key, v in summ.items():
            if isinstance(v, dict):
                lines.append(f"- {key}: " + ", ".join(f"{a} {b:.4f}" for a, b in v.items()))
            else:
                lines.append(f"- {key}: {v:.2f}")
        lines.append("")
    elif table:
        lines += [str(table), ""]
    sd = res.get("resnet50_seeds")
    if sd:
        lines += ["## Seed study: legonet's default engine on ResNet-50 blocks, seeds "
                  f"{sd['seeds'][0]}..{sd['seeds'][-1]}", "",
                  "| K | inertia min / median / max | seconds min / median / max | sklearn inertia (seed 0) "
                  "| seeds at or below sklearn |", "|---|---|---|---|---|"]
        sk = {r["K"]: r["inertia"] for r in table if r["row"] == "scikit-learn"} if isinstance(table, list) else {}
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
    gpu = res.get("gpu", "not measured")
    lines += ["## GPU", "", json.dumps(gpu, indent=1) if isinstance(gpu, dict) else str(gpu), ""]
    if res.get("target_mode"):
        lines += target_markdown(res["target_mode"])
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def target_markdown(tm: dict) -> list[str]:
    """The target-mode table, the per-step times and the several-ratios comparison."""
    summ = tm["summary"]
    lines = ["## Target mode end to end, data-free: idle and beside 2 busy processes", "",
             "Time: `legonet.compress(model, target_ratio=R)` and writing the file with `cm.save` (CLI rows: the "
             "whole `legonet compress ... --arch NAME -q` call, which also reads the checkpoint), in a fresh process "
             "per run, interpreter start and model load excluded; threads chosen by legonet itself. Targets: "
             "idle time within the limit; busy at most "
             f"{TARGET_BUSY_OVER_IDLE:g}x idle (busy processes started {tm['busy_warmup_s']:g} s before).", "",
             "| row | ratio(s) | idle s | busy s | busy/idle | file ratio | threads idle / busy | limit s "
             f"| idle within limit | busy <= {TARGET_BUSY_OVER_IDLE:g}x idle "
             "| 1-min load idle / busy (before -> after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in tm["rows"]:
        ratios = ",".join(f"{v:g}" for v in r["ratios"])
        if "idle" not in r:
            lines.append(f"| {r['label']} | {ratios} | skipped: {r.get('skipped', '?')} |" + " |" * 8)
            continue
        idle, busy, s = r["idle"], r[BUSY], summ.get(r["label"], {})
        file_ratio = " / ".join(f"{c['file_ratio']:.2f}" for c in idle["calls"])
        threads = (",".join(str(t) for c in idle["calls"] for t in c["threads"]) + " / "
                   + ",".join(str(t) for c in busy["calls"] for t in c["threads"]))
        limit = "-" if r.get("limit_s") is None else f"{r['limit_s']:g}"
        lines.append(f"| {r['label']} | {ratios} | {idle['seconds']:.1f} | {busy['seconds']:.1f} "
                     f"| {s.get('busy_over_idle', float('nan')):.2f} | {file_ratio} | {threads} | {limit} "
                     f"| {_met(s.get('idle_met'))} | {_met(s.get('busy_met'))} "
                     f"| {idle['load_before'][0]} -> {idle['load_after'][0]} "
                     f"/ {busy['load_before'][0]} -> {busy['load_after'][0]} |")
        for cond, run in (("idle", idle), ("busy", busy)):
            per_call = "; ".join(f"{c['ratio']:g}x: {c['compress_seconds']:.1f} s in legonet.compress ("
                                 + ", ".join(c["steps"]) + ")"
                                 + (f", {c['write_seconds']:.1f} s writing" if "write_seconds" in c else "")
                                 for c in run["calls"])
            notes.append(f"- {r['label']}, {cond}: {per_call}")
        if "at_once_over_separately" in s:
            a = s["at_once_over_separately"]
            notes.append(f"- {r['label']}: one call over the ratios / one call per ratio: idle {a['idle']:.2f}, "
                         f"busy {a[BUSY]:.2f}")
    return lines + ["", "Steps (per call of `legonet.compress`):", ""] + notes + [""]


if __name__ == "__main__":
    main()
