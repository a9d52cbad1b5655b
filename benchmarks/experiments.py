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


# k-means++ seeding costs O(K^2) distance evaluations, hours for K in the thousands on 2 cores,
# and every Lloyd iteration costs (blocks x K). From LARGE_K on, sweeps seed at random, cap Lloyd
# iterations and fit the centroids on a seeded uniform sample of at most FIT_POINTS_PER_CENTROID
# blocks per centroid (Faiss's default ``max_points_per_centroid``); every block is then assigned
# to its nearest centroid. The same rule for every block size and model, recorded in the setting
# (and so in every table row); it can only cost legonet accuracy.
LARGE_K = 512
LARGE_K_KMEANS = {"init": "random", "max_iters": 20}
FIT_POINTS_PER_CENTROID = 256


def lego(block: int | tuple[int, int], clusters: int, **extra: Any) -> dict[str, Any]:
    """A legonet setting (LegoConfig keys) in the canonical form used as cache key."""
    b = [block, block] if isinstance(block, int) else list(block)
    return {"block": b, "clusters": clusters, **extra}


def sweep_setting(block: int, clusters: int) -> dict[str, Any]:
    """The paper's setting at (b, K) as the sweeps run it (capped k-means from :data:`LARGE_K` on)."""
    if clusters < LARGE_K:
        return lego(block, clusters)
    return lego(block, clusters, kmeans={**LARGE_K_KMEANS, "max_fit_points": FIT_POINTS_PER_CENTROID * clusters})


def is_sweep_setting(setting: dict[str, Any]) -> bool:
    """True for a plain (b, K) point of the paper's method (Figs. 3 and 4, the headline)."""
    b = setting.get("block")
    return (set(setting) <= {"block", "clusters", "kmeans"} and b is not None and b[0] == b[1]
            and setting == sweep_setting(b[0], setting["clusters"]))


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
    """Claim 1: model-wide codebook, 4x4 blocks, K=32 and K=16, data-free; all test images.

    Evaluated on every image with per-image hits kept, so the same points on a sweep subset (Fig. 4)
    are read off these evaluations instead of being recomputed.
    """
    base = bench.measure("fp32", {}, n_images)
    rows = [_row(base, label="uncompressed (fp32 baseline)", drop_points=0.0)]
    for k in clusters:
        try:
            rec = bench.measure("legonet", sweep_setting(block, k), n_images)
        except NotMeasured:
            continue
        rows.append(_row(rec, label=f"legonet {block}x{block} K={k}", drop_points=drop(bench, rec),
                         paper_ratio=rec["info"]["paper_ratio"]))
    return rows


def k_range(block: int, ks: Sequence[int] = POW2_K, max_bits_per_weight: float = 8.0) -> list[int]:
    """Powers of two worth trying for ``block``: index bits per weight at most ``max_bits_per_weight``."""
    return [k for k in ks if (k - 1).bit_length() / (block * block) <= max_bits_per_weight]


def sweep_until(candidates: Sequence[Any], measure: Callable[[Any], dict | None],
                within: Callable[[dict], bool]) -> list[dict]:
    """Measure candidates in order (cheapest storage first) and stop after the first one ``within``.

    Every later candidate stores more bits, so its ratio is lower: it cannot give a higher ratio
    within any tolerance at least as loose as the stopping one. Returns the measured records.
    """
    out = []
    for c in candidates:
        rec = measure(c)
        if rec is None:  # the candidate could not be measured (see :func:`peers`)
            continue
        out.append(rec)
        if within(rec):
            break
    return out


def block_sweep(bench: Bench, n_images: int, block: int, ks: Sequence[int] = POW2_K,
                tolerances: Sequence[float] = TOLERANCES, every_k: bool = True) -> list[dict]:
    """The paper's method at one block size for K ascending, stopping once top-1 is within the
    tightest tolerance. Candidates: the powers of two allowed by :func:`k_range`, at most the number
    of blocks, and whose codebook alone is smaller than the fp32 weights (a ratio below 1).

    ``every_k=False`` measures every other candidate (K = 4, 16, 64, ...) and then, for each
    tolerance, the one candidate skipped just below the first coarse point within it: under the
    assumption the early stop already makes (accuracy does not fall as K grows) this finds the
    same smallest K within each tolerance with about half the points.
    """
    nblocks = sum(make_tiling(t.shape, (block, block)).num_blocks for t in bench.sd.values()
                  if t.ndim >= 2 and t.is_floating_point())
    cand = [k for k in k_range(block, ks) if k <= nblocks and 4 * k * block * block < bench.fp32_bytes]

    def measure(k: int) -> dict:
        return bench.measure("legonet", sweep_setting(block, k), n_images)

    def within(tol: float) -> Callable[[dict], bool]:
        return lambda r: drop(bench, r) <= tol

    if every_k or len(cand) < 3:
        return sweep_until(cand, measure, within(min(tolerances)))
    coarse = cand[1::2] + ([cand[-1]] if len(cand) % 2 else [])
    recs = sweep_until(coarse, measure, within(min(tolerances)))
    done = {r["setting"]["clusters"] for r in recs}
    for tol in sorted(tolerances, reverse=True):
        first = next((r["setting"]["clusters"] for r in recs if within(tol)(r)), None)
        if first is None:
            continue
        below = cand[cand.index(first) - 1] if cand.index(first) > 0 else None
        if below is not None and below not in done:
            recs.append(measure(below))
            done.add(below)
    return sorted(recs, key=lambda r: r["setting"]["clusters"])


def fig4(bench: Bench, n_images: int, ks: Sequence[int] = POW2_K, block: int = 4,
         stop_within: float = min(TOLERANCES)) -> list[dict]:
    """Claim 2: top-1 versus K at b=4: Fig. 3's b=4 sweep (same points, same early stop)."""
    bench.measure("fp32", {}, n_images)
    rows = []
    try:
        recs = block_sweep(bench, n_images, block, ks, (stop_within,))
    except NotMeasured:  # --cached-only: whatever the cache holds
        n = len(bench.images(n_images))
        recs = sorted(_measured(bench, n, block), key=lambda r: r["setting"]["clusters"])
    for rec in recs:
        rows.append(_row(rec, K=rec["setting"]["clusters"], b=block, drop_points=drop(bench, rec)))
    return rows


def _measured(bench: Bench, n: int, b: int) -> list[dict]:
    return [r for r in bench.cache.values()
            if r["method"] == "legonet" and r.get("n") == n and r.get("on", "test") == "test"
            and is_sweep_setting(r["setting"]) and r["setting"]["block"] == [b, b]]


def fig3(bench: Bench, n_images: int, blocks: Sequence[int] = FIG3_BLOCKS,
         tolerances: Sequence[float] = TOLERANCES, ks: Sequence[int] = POW2_K,
         every_k: Sequence[int] = (4,)) -> tuple[list[dict], list[dict]]:
    """Claim 3: for each block size, the highest ratio whose accuracy drop is within each tolerance.

    For a fixed b the ratio falls as K grows, so each block size is swept over K ascending until
    top-1 is within the tightest tolerance (:func:`block_sweep`; every power of two for the block
    sizes in ``every_k``, which Fig. 4 plots, coarse then refined for the others); the reported point per tolerance
    is the highest-ratio measured point within it (noise can make a smaller K pass where a larger
    one failed). Returns (rows per (b, tolerance), every measured point of these block sizes).
    """
    bench.measure("fp32", {}, n_images)
    rows = []
    n = len(bench.images(n_images))
    for b in blocks:
        try:
            swept = block_sweep(bench, n_images, b, ks, tolerances, every_k=b in every_k)
        except NotMeasured:  # a partial run (--cached-only): this block size was not finished
            rows += [{"model": bench.name, "b": b, "tolerance": tol, "K": None, "ratio": None, "n": n,
                      "note": "not measured"} for tol in tolerances]
            continue
        for tol in tolerances:
            row = {"model": bench.name, "b": b, "tolerance": tol, "K": None, "ratio": None, "n": n}
            ok = [r for r in _measured(bench, n, b) if drop(bench, r) <= tol]
            if not ok:
                top = max(r["setting"]["clusters"] for r in swept) if swept else None
                rows.append({**row, "note": f"no K up to {top} within tolerance"})
                continue
            rec = max(ok, key=lambda r: r["ratio"])
            rows.append({**row, "K": rec["setting"]["clusters"], "ratio": rec["ratio"],
                         "paper_ratio": rec["info"]["paper_ratio"], "bits_per_weight": rec["bits_per_weight"],
                         "top1": rec["top1"], "drop_points": drop(bench, rec)})
    points = [_row(r, b=b, K=r["setting"]["clusters"], drop_points=drop(bench, r))
              for b in blocks for r in sorted(_measured(bench, n, b), key=lambda r: r["setting"]["clusters"])]
    return rows, points


def peer_grid(bench: Bench, bits: Sequence[int] = (1, 2, 3, 4, 6, 8), coreml: bool = True,
              group_size: int = 8, cluster_dim: int = 4, vector_bits: Sequence[int] | None = None) -> list[tuple[str, dict]]:
    """The peers' settings: (method, setting) pairs, each family in ascending bit width."""
    grid: list[tuple[str, dict]] = [("rtn", {"bits": 4}), ("rtn", {"bits": 8})]
    grid += [("kmeans-layer", {"bits": b}) for b in bits]
    if coreml:
        grid += [("coreml", {"bits": b, "granularity": "per_tensor"}) for b in bits]
        grid += [("coreml", {"bits": b, "granularity": "per_grouped_channel", "group_size": group_size}) for b in bits]
        grid += [("coreml", {"bits": b, "granularity": "per_tensor", "cluster_dim": cluster_dim})
                 for b in (vector_bits if vector_bits is not None else bits)]
    return grid


def peers(bench: Bench, n_images: int, grid: Sequence[tuple[str, dict]],
          stop_within: float | None = min(TOLERANCES)) -> list[dict]:
    """Peer settings measured on the sweep subset, each family (the setting without ``bits``) in
    the grid's order and, like the legonet sweeps, stopped once within ``stop_within`` points
    (``None``: every setting)."""
    bench.measure("fp32", {}, n_images)
    families: dict[str, list[tuple[str, dict]]] = {}
    for method, setting in grid:
        fam = repr((method, sorted((k, v) for k, v in setting.items() if k != "bits")))
        families.setdefault(fam, []).append((method, setting))
    rows: list[dict] = []

    def attempt(ms: tuple[str, dict]) -> dict | None:
        # A peer library may reject a setting (coremltools' vector k-means asks for more clusters
        # than a small layer has vectors): recorded as a failed row, the family goes on.
        try:
            return bench.measure(ms[0], ms[1], n_images)
        except NotMeasured:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the peer's own code is a result
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            bench.log(f"{bench.name} {ms[0]} {ms[1]}: failed ({msg})")
            rows.append({"model": bench.name, "method": ms[0], "setting": ms[1], "error": msg})
            return None

    for members in families.values():
        try:
            recs = sweep_until(members, attempt, lambda r: stop_within is not None and drop(bench, r) <= stop_within)
        except NotMeasured:
            n = len(bench.images(n_images))
            keys = [bench.key(m, s, None if n >= len(bench.test) else n) for m, s in members]
            recs = [bench.cache[k] for k in keys if k in bench.cache]
        rows += [_row(rec, drop_points=drop(bench, rec)) for rec in recs]
    return rows


def target(bench: Bench, n_images: int, grid: Sequence[tuple[str, dict]]) -> list[dict]:
    """legonet beyond the paper (target-ratio mode, data-free and calibrated) on the sweep subset."""
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
        extra = "" if is_sweep_setting(s) else " (arrangement)"
        return f"legonet b={b[0]}" + ("" if b[0] == b[1] else f"x{b[1]}") + extra
    if m == "coreml":
        kind = "vector" if s.get("cluster_dim", 1) > 1 else "scalar"
        gran = "grouped-channel" if s.get("granularity") == "per_grouped_channel" else "per-tensor"
        return f"coremltools {kind} {gran}"
    if m == "kmeans-layer":
        return "per-layer k-means (Deep Compression)"
    if m == "rtn":
        return "RTN per-channel"
    if m == "legonet-target":
        return "legonet target mode, data-free (beyond the paper)"
    if m == "legonet-target-calib":
        return "legonet target mode, calibrated (beyond the paper)"
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
