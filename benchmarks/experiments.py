"""The paper's claims as experiments on one :class:`~benchmarks.common.Bench` each.

Each function measures (through the cache) and returns plain rows (dicts) for the tables and plots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import Bench, NotMeasured
from legonet.ops.tiling import make_tiling

POW2_K = tuple(2**i for i in range(1, 13))  # 2 .. 4096
FIG3_BLOCKS = (1, 2, 3, 4, 6, 8)
TOLERANCES = (0.5, 1.0, 3.0)  # accuracy points


def lego(block: int | tuple[int, int], clusters: int, **extra: Any) -> dict[str, Any]:
    """A legonet setting (LegoConfig keys) in the canonical form used as cache key."""
    b = [block, block] if isinstance(block, int) else list(block)
    return {"block": b, "clusters": clusters, **extra}


def _row(rec: dict, **extra: Any) -> dict:
    keep = ("model", "method", "setting", "file_bytes", "fp32_bytes", "ratio", "bits_per_weight",
            "sqnr_mean_db", "sqnr_global_db", "top1", "n", "ci95", "info")
    return {**{k: rec[k] for k in keep if k in rec}, **extra}


def drop(bench: Bench, rec: dict) -> float:
    """Accuracy points lost against the uncompressed model on the same images."""
    base = bench.measure("fp32", {}, None if rec["n"] == len(bench.test) else rec["n"])
    # rounded so that a drop of exactly one image's worth compares equal to a tolerance of the same size
    return round(100.0 * (base["top1"] - rec["top1"]), 9)


def headline(bench: Bench, n_images: int | None = None, clusters: Sequence[int] = (32, 16), block: int = 4) -> list[dict]:
    """Claim 1: model-wide codebook, 4x4 blocks, K=32 and K=16, data-free; all test images."""
    base = bench.measure("fp32", {}, n_images)
    rows = [_row(base, label="uncompressed (fp32 baseline)", drop_points=0.0)]
    for k in clusters:
        try:
            rec = bench.measure("legonet", lego(block, k), n_images)
        except NotMeasured:
            continue
        rows.append(_row(rec, label=f"legonet {block}x{block} K={k}", drop_points=drop(bench, rec),
                         paper_ratio=rec["info"]["paper_ratio"]))
    return rows


def fig4(bench: Bench, n_images: int, ks: Sequence[int] = POW2_K, block: int = 4) -> list[dict]:
    """Claim 2: top-1 versus K at b=4 (the baseline is measured on the same images)."""
    bench.measure("fp32", {}, n_images)
    rows = []
    for k in ks:
        try:
            rec = bench.measure("legonet", lego(block, k), n_images)
        except NotMeasured:
            continue
        rows.append(_row(rec, K=k, b=block, drop_points=drop(bench, rec)))
    return rows


def k_range(block: int, ks: Sequence[int] = POW2_K, max_bits_per_weight: float = 8.0) -> list[int]:
    """Powers of two worth trying for ``block``: index bits per weight at most ``max_bits_per_weight``."""
    return [k for k in ks if (k - 1).bit_length() / (block * block) <= max_bits_per_weight]


def smallest_passing(candidates: Sequence[int], passes: Callable[[int], bool]) -> int | None:
    """Smallest candidate for which ``passes`` holds, by bisection (assumes it is monotone)."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if passes(candidates[mid]):
            best, hi = candidates[mid], mid - 1
        else:
            lo = mid + 1
    return best


def fig3(bench: Bench, n_images: int, blocks: Sequence[int] = FIG3_BLOCKS,
         tolerances: Sequence[float] = TOLERANCES, ks: Sequence[int] = POW2_K) -> tuple[list[dict], list[dict]]:
    """Claim 3: for each block size, the highest ratio whose accuracy drop is within each tolerance.

    For a fixed b the ratio falls as K grows and accuracy (in expectation) rises, so the best ratio
    at a tolerance is at the smallest passing K, found by bisection over powers of two; this
    measures about log2(#K) points per (b, tolerance) instead of the whole grid, and the tolerances
    share points through the cache. The reported point is the highest-ratio measured point within
    the tolerance (noise can make a smaller K pass where a larger one failed). Returns (rows per
    (b, tolerance), every measured point of these block sizes).
    """
    bench.measure("fp32", {}, n_images)
    rows = []
    n = len(bench.images(n_images))

    def measured(b: int) -> list[dict]:
        return [r for r in bench.cache.values()
                if r["method"] == "legonet" and r.get("n") == n and r.get("on", "test") == "test"
                and set(r["setting"]) == {"block", "clusters"} and r["setting"]["block"] == [b, b]]

    for b in blocks:
        nblocks = sum(make_tiling(t.shape, (b, b)).num_blocks for t in bench.sd.values()
                      if t.ndim >= 2 and t.is_floating_point())
        cand = [k for k in k_range(b, ks) if k <= nblocks]
        for tol in tolerances:
            row = {"model": bench.name, "b": b, "tolerance": tol, "K": None, "ratio": None, "n": n}
            try:
                smallest_passing(cand, lambda kk: drop(bench, bench.measure("legonet", lego(b, kk), n_images)) <= tol)
            except NotMeasured:  # a partial run (--cached-only): this (b, tolerance) was not finished
                rows.append({**row, "note": "not measured"})
                continue
            # Accuracy is monotone in K only up to sampling noise, so report the highest ratio among
            # every point measured for this b (bisection's and any other) that is within tolerance.
            ok = [r for r in measured(b) if drop(bench, r) <= tol]
            if not ok:
                rows.append({**row, "note": f"no K up to {cand[-1]} within tolerance"})
                continue
            rec = max(ok, key=lambda r: r["ratio"])
            rows.append({**row, "K": rec["setting"]["clusters"], "ratio": rec["ratio"],
                         "paper_ratio": rec["info"]["paper_ratio"], "bits_per_weight": rec["bits_per_weight"],
                         "top1": rec["top1"], "drop_points": drop(bench, rec)})
    points = [_row(r, b=b, K=r["setting"]["clusters"], drop_points=drop(bench, r))
              for b in blocks for r in measured(b)]
    return rows, points


def peer_grid(bench: Bench, bits: Sequence[int] = (1, 2, 3, 4, 6, 8), coreml: bool = True,
              group_size: int = 8, cluster_dim: int = 4, vector_bits: Sequence[int] | None = None) -> list[tuple[str, dict]]:
    """The peers' settings: (method, setting) pairs."""
    grid: list[tuple[str, dict]] = [("rtn", {"bits": 8}), ("rtn", {"bits": 4})]
    grid += [("kmeans-layer", {"bits": b}) for b in bits]
    if coreml:
        grid += [("coreml", {"bits": b, "granularity": "per_tensor"}) for b in bits]
        grid += [("coreml", {"bits": b, "granularity": "per_grouped_channel", "group_size": group_size}) for b in bits]
        grid += [("coreml", {"bits": b, "granularity": "per_tensor", "cluster_dim": cluster_dim})
                 for b in (vector_bits if vector_bits is not None else bits)]
    return grid


def peers(bench: Bench, n_images: int, grid: Sequence[tuple[str, dict]]) -> list[dict]:
    """Every peer setting, measured on the sweep subset."""
    bench.measure("fp32", {}, n_images)
    rows = []
    for method, setting in grid:
        try:
            rec = bench.measure(method, setting, n_images)
        except NotMeasured:
            continue
        rows.append(_row(rec, drop_points=drop(bench, rec)))
    return rows


def family(rec: dict) -> str:
    """A short method label for plots and tables."""
    m, s = rec["method"], rec["setting"]
    if m == "legonet":
        b = s["block"]
        extra = "" if set(s) == {"block", "clusters"} else " (arrangement)"
        return f"legonet b={b[0]}" + ("" if b[0] == b[1] else f"x{b[1]}") + extra
    if m == "coreml":
        kind = "vector" if s.get("cluster_dim", 1) > 1 else "scalar"
        gran = "grouped-channel" if s.get("granularity") == "per_grouped_channel" else "per-tensor"
        return f"coremltools {kind} {gran}"
    if m == "kmeans-layer":
        return "per-layer k-means (Deep Compression)"
    if m == "rtn":
        return "RTN per-channel"
    return m


def best_ratio_within(bench: Bench, n_images: int, tolerances: Sequence[float] = TOLERANCES) -> list[dict]:
    """For every method family measured on ``n_images``: the highest ratio within each tolerance."""
    n = len(bench.images(n_images))
    recs = [r for r in bench.cache.values() if r.get("n") == n and r.get("on", "test") == "test" and r["method"] != "fp32"]
    out = []
    for fam in sorted({family(r) for r in recs}):
        mine = [r for r in recs if family(r) == fam]
        row: dict[str, Any] = {"model": bench.name, "method": fam, "points": len(mine)}
        for tol in tolerances:
            ok = [r for r in mine if drop(bench, r) <= tol]
            best = max(ok, key=lambda r: r["ratio"]) if ok else None
            row[f"ratio_within_{tol:g}"] = None if best is None else round(best["ratio"], 2)
            row[f"setting_within_{tol:g}"] = None if best is None else best["setting"]
        out.append(row)
    return out
