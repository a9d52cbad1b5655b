"""Re-measure the paper's claims and the peers in one command.

    python -m benchmarks.reproduce                  # the paper's claims + peers, results in benchmarks/results/
    python -m benchmarks.reproduce --experiments target     # + legonet's target mode, resumable
    python -m benchmarks.reproduce --quick          # smoke run on the bundled ResNet-20 (~minutes)
    python -m benchmarks.reproduce --models resnet20,resnet56 --experiments headline,fig4
    python -m benchmarks.reproduce --fresh --out /tmp/run   # from an empty cache (timing a cold run)

Every measurement is cached (benchmarks/results/cache/<model>.json), so a rerun is incremental and
an interrupted run (Ctrl-C still writes the tables, plots and run_info.json) resumes; tables and
plots are rebuilt from the cache each time. Stages run experiment by experiment across the models
(:func:`stage_order`); run_info.json records each stage's wall and CPU time and the load averages.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import experiments as ex
from benchmarks.arrangement import search
from benchmarks.common import MODELS, Bench, NotMeasured
from benchmarks.methods import LEGONET_METHODS
from benchmarks.peers import PEER_METHODS, coreml_available
from benchmarks.summary import render
from legonet.errors import LegoError

EXPERIMENTS = ("headline", "fig4", "fig3", "arrangement", "peers", "target")
# what the default command runs: the paper's claims and the peers. ``target`` (legonet's
# target-ratio mode: calibrated points cost minutes each, ~13 min on ResNet-50) is opt-in;
# benchmarks/target_mode.py measures it on the whole test set.
DEFAULT_EXPERIMENTS = EXPERIMENTS[:-1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return v


def write_table(rows: list[dict], path: Path) -> None:
    """Rows as CSV (nested values as JSON) and the same rows as JSON beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))


def _per_model(value: str) -> dict[str, int] | int:
    """``1000`` (every model) or ``resnet50=1000,resnet56=2000``."""
    if "=" not in value:
        return int(value)
    return {m.strip(): int(n) for m, n in (item.split("=", 1) for item in value.split(",") if item)}


def plan(model: str, quick: bool, args: argparse.Namespace) -> dict[str, Any]:
    """What to run for one model: subset sizes and grids (the --quick plan is a small smoke run).

    The full plan aims at 90 minutes on 2 otherwise idle cores for the three models together (not
    yet demonstrated: docs/reproduce.md has the measured stage times): sweeps on a seeded test subset,
    only the headline on every test image; every method of one model on the same subset.
    """
    spec = MODELS[model]
    if quick:
        return {"headline_images": 500, "sweep_images": 200, "ks": (2, 16, 256), "blocks": (2, 4),
                "fig3_ks": (2, 8, 32, 128), "peer_bits": (2, 4), "vector_bits": (), "seeds": (0,),
                "calib_images": 0, "target": []}
    hl = args.headline_images.get(model) if isinstance(args.headline_images, dict) else args.headline_images
    p = {"headline_images": hl, "sweep_images": args.sweep_images or spec.sweep_images,
         "ks": ex.POW2_K, "blocks": ex.FIG3_BLOCKS, "fig3_ks": ex.POW2_K, "peer_bits": (1, 2, 3, 4, 6, 8),
         # coremltools' vector k-means (cluster_dim 4): seconds per setting on ResNet-20; on ResNet-50
         # (5.9 M vectors) one 8-bit setting ran over 10 minutes and was stopped, so none there.
         "vector_bits": args.vector_bits if args.vector_bits is not None else (() if model == "resnet50" else (1, 2, 3, 4, 6, 8)),
         "seeds": (0, 1, 2), "calib_images": 512, "defer_headline": False,
         # beyond the paper: target-ratio mode; the calibrated one distils for minutes per point
         "target": [("legonet-target", {"ratio": 8.0}), ("legonet-target", {"ratio": 16.0}),
                    ("legonet-target-calib", {"ratio": 8.0}), ("legonet-target-calib", {"ratio": 16.0})]}
    if model == "resnet50":
        # 87x ResNet-20's blocks: one arrangement seed, fewer calibration images for its data-driven pick,
        # and the calibrated target mode (~12 min a point) only at the ratios of its published targets.
        # Its three whole-test-set evaluations (~5 min each on an idle machine) run after every sweep.
        p.update(seeds=(0,), calib_images=256, defer_headline=True,
                 target=[("legonet-target", {"ratio": 16.0}),
                         ("legonet-target-calib", {"ratio": 64.0}), ("legonet-target-calib", {"ratio": 128.0})])
    return p


def stage_order(exps: list[str], plans: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(experiment, model) pairs in run order: experiment by experiment across the models, so the
    paper's claims on every model come first; deferred headlines (a large model's whole-test-set
    evaluations) after the sweeps, and the costliest extra (target mode) last."""
    order = [(e, m) for e in EXPERIMENTS if e in exps and e != "target" for m in plans
             if not (e == "headline" and plans[m].get("defer_headline"))]
    order += [("headline", m) for m in plans if "headline" in exps and plans[m].get("defer_headline")]
    return order + [("target", m) for m in plans if "target" in exps]


def open_bench(model: str, out: Path, cached_only: bool = False) -> Bench:
    return Bench.from_spec(MODELS[model], out / "cache", {**LEGONET_METHODS, **PEER_METHODS}, log=_log,
                           cached_only=cached_only)


def run_model(model: str, exps: list[str], p: dict[str, Any], out: Path, use_coreml: bool,
              cached_only: bool = False, stages: list[dict] | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"bench": open_bench(model, out, cached_only), "plan": p}
    _run_experiments(res["bench"], res, exps, p, use_coreml, stages if stages is not None else [])
    return res


def _stop(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run_experiments(bench: Bench, res: dict[str, Any], exps: list[str], p: dict[str, Any], use_coreml: bool,
                     stages: list[dict]) -> None:
    n = p["sweep_images"]
    steps = {
        "headline": lambda: {"headline": ex.headline(bench, p["headline_images"])},
        "fig4": lambda: {"fig4": ex.fig4(bench, n, p["ks"])},
        "fig3": lambda: dict(zip(("fig3", "fig3_points"), ex.fig3(bench, n, p["blocks"], ks=p["fig3_ks"]))),
        "arrangement": lambda: {"arrangement": search(bench, n, seeds=p["seeds"], calib_images=p["calib_images"])},
        "peers": lambda: {"peers": ex.peers(bench, n, ex.peer_grid(bench, p["peer_bits"], coreml=use_coreml,
                                                                    vector_bits=p["vector_bits"]))},
        "target": lambda: {"target": ex.target(bench, n, p["target"])},
    }
    for name in EXPERIMENTS:
        if name not in exps:
            continue
        _log(f"{bench.name}: {name} (sweeps on {n} images, headline on {p['headline_images'] or 'all'})")
        t0, c0, cpu0, load0 = time.time(), bench.computed, time.process_time(), _load()
        try:
            res.update(steps[name]())
        except NotMeasured as exc:  # --cached-only: the tables hold what was measured
            _log(f"{bench.name}: {name} left out: {exc}")
        finally:
            stages.append({"model": bench.name, "experiment": name, "wall_s": round(time.time() - t0, 1),
                           "cpu_s": round(time.process_time() - cpu0, 1), "computed": bench.computed - c0,
                           "load_start": load0, "load_end": _load(), "ended": time.strftime("%H:%M:%S")})
            _log(f"{bench.name}: {name} took {stages[-1]['wall_s']} s, {stages[-1]['computed']} measurements, "
                 f"load {stages[-1]['load_end']}")


def write_outputs(results: dict[str, dict], out: Path, info: dict | None = None) -> list[Path]:
    """Tables (CSV + JSON), plots (PNG) and summary.md from the results of every model."""
    from benchmarks import plots

    info = info or {}
    written = []
    tables: dict[str, list[dict]] = {}
    for model, res in results.items():
        bench: Bench = res["bench"]
        n = res["plan"]["sweep_images"]
        for name in ("headline", "fig4", "fig3", "fig3_points", "peers", "target"):
            tables.setdefault(name, []).extend(res.get(name, []))
        if "arrangement" in res:
            a = res["arrangement"]
            tables.setdefault("arrangement", []).extend(
                {"model": model, "pick": which, **a[which]} for which in ("reference", "sqnr_pick", "calib_pick") if a[which])
            tables.setdefault("arrangement_candidates", []).extend({"model": model, **c} for c in a["candidates"])
        try:
            base = bench.measure("fp32", {}, n)
        except NotMeasured:
            continue
        if res.get("fig4"):
            written.append(plots.plot_fig4(res["fig4"], base, out / f"fig4_{model}.png"))
        if any(r.get("note") != "not measured" for r in res.get("fig3", [])):
            written.append(plots.plot_fig3(res["fig3"], out / f"fig3_{model}.png"))
        recs = [r for r in bench.cache.values() if r.get("n") == base["n"] and r.get("on", "test") == "test"
                and r["method"] != "fp32"]
        if recs:
            tm_path = out / f"target_mode_{bench.arch.name}.json"  # written by benchmarks/target_mode.py
            tm = json.loads(tm_path.read_text()) if tm_path.exists() else None
            written.append(plots.plot_pareto(recs, base, out / f"pareto_{model}.png", tm))
            tables.setdefault("best_within", []).extend(ex.best_ratio_within(bench, n))
    for name, rows in tables.items():
        if rows:
            write_table(rows, out / f"{name}.csv")
            written.append(out / f"{name}.csv")
    (out / "summary.md").write_text(render(tables, info, ex.family))
    written.append(out / "summary.md")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (bundled ResNet-20 unless --models)")
    ap.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: resnet20,resnet56,resnet50)")
    ap.add_argument("--experiments", default=",".join(DEFAULT_EXPERIMENTS),
                    help=f"comma-separated from {', '.join(EXPERIMENTS)} (default: all but target)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results, or .../quick with --quick)")
    ap.add_argument("--sweep-images", type=int, help="test images for sweeps (default per model: 1000, 1000, 200)")
    ap.add_argument("--headline-images", type=_per_model,
                    help="test images for the headline table, N or MODEL=N,... (default: all)")
    ap.add_argument("--no-coreml", action="store_true", help="leave out coremltools even if installed")
    ap.add_argument("--vector-bits", type=lambda v: tuple(int(b) for b in v.split(",") if b),
                    help="n_bits of coremltools' vector palettization, e.g. 2,4 ('' for none; default 1,2,3,4,6,8, "
                         "none on resnet50)")
    ap.add_argument("--cached-only", action="store_true",
                    help="compute nothing: rebuild tables and plots from the cache, leaving out what is missing")
    ap.add_argument("--fresh", action="store_true",
                    help="start from an empty cache: delete the selected models' cache files under --out first")
    args = ap.parse_args(argv)
    models = (args.models or ("resnet20-bundled" if args.quick else "resnet20,resnet56,resnet50")).split(",")
    exps = args.experiments.split(",")
    bad = [m for m in models if m not in MODELS] + [e for e in exps if e not in EXPERIMENTS]
    if bad:
        print(f"reproduce: error: unknown model or experiment: {', '.join(bad)}", file=sys.stderr)
        return 1
    if args.fresh and args.cached_only:
        print("reproduce: error: --fresh and --cached-only exclude each other", file=sys.stderr)
        return 1
    out = args.out or (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if args.fresh:
        for m in models:
            (out / "cache" / f"{m}.json").unlink(missing_ok=True)
    use_coreml = not args.no_coreml and coreml_available()
    if not use_coreml:
        _log("coremltools not used (not installed or --no-coreml): its peer rows are left out")
    t0, cpu0, started = time.time(), time.process_time(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results: dict[str, dict] = {}
    stages: list[dict] = []
    samples: list[list[float]] = []  # (minute, load 1, 5, 15) while the run lasts: the machine is shared
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0 if not samples else 60):
            samples.append([round((time.time() - t0) / 60, 1), *_load()])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # SIGTERM (and SIGINT, which background jobs ignore) end the run through the finally below, so a
    # stopped run still writes its tables, plots and run_info.json; the cache is written atomically.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        for m in models:
            results[m] = {"bench": open_bench(m, out, args.cached_only), "plan": plan(m, args.quick, args)}
        for e, m in stage_order(exps, {m: r["plan"] for m, r in results.items()}):
            _run_experiments(results[m]["bench"], results[m], [e], results[m]["plan"], use_coreml, stages)
    except LegoError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 1
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)
        if results:
            info = {"command": "python -m benchmarks.reproduce " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "models": list(results), "experiments": exps, "quick": args.quick, "cached_only": args.cached_only,
                    "fresh": args.fresh, "started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "seconds": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                    "cpus": os.cpu_count(), "large_k": ex.LARGE_K,
                    "fit_points_per_centroid": ex.FIT_POINTS_PER_CENTROID, "stages": stages, "load_average_samples": samples,
                    "computed": {m: r["bench"].computed for m, r in results.items()},
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "coreml": use_coreml, "plans": {m: r["plan"] for m, r in results.items()},
                    # compute time of every cached measurement (whenever it was made): what a cold run costs here
                    "cached_measurements": {m: len(r["bench"].cache) for m, r in results.items()},
                    "cached_compute_s": {m: round(sum(c.get("compress_s", 0) + c.get("eval_s", 0)
                                                      for c in r["bench"].cache.values()), 1)
                                         for m, r in results.items()}}
            info_path = out / "run_info.json"
            if args.cached_only and info_path.exists():
                # a rebuild computes nothing: the tables keep describing the run that measured them
                info = {**json.loads(info_path.read_text()), "tables_rebuilt": info["ended"]}
            written = write_outputs(results, out, info)
            info_path.write_text(json.dumps(info, indent=1, default=str))
            _log(f"wrote {len(written)} files under {out} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
