"""Claim 4: search the arrangement choices legonet exposes, at a fixed ratio, by a data-free criterion.

The paper says it "shows how to find an arrangement of 16 4x4 blocks" reaching 128x with < 3 %
loss, without saying how. Here an arrangement is everything a :class:`legonet.LegoConfig` lets one
choose besides the bit budget:

* block shape with the same number of elements (4x4, 2x8, 8x2, 1x16, 16x1): the orientation of
  a block against the (output channel, input x kernel) matrix;
* which tensors are clustered (the first convolution and/or the classifier kept dense), paying for
  the dense bytes with a smaller K if needed;
* codebook scope (model-wide or per layer);
* k-means initialisation (k-means++ or random) and seed.

The reference is the paper's setting (4x4, K, model-wide, seed 0). A candidate is feasible when its
file ratio is at least ``(1 - slack)`` times the reference's. The search is greedy, one choice at a
time (shape, then tensors/scope, then initialisation and seed), each stage keeping the feasible
candidate with the highest layer-averaged weight SQNR (``sqnr_layer_db``, data-free). Optionally, a clearly separate
data-driven pick: among the ``top`` feasible candidates by SQNR, the one with the best top-1 on
calibration images (training split, never test images).
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Bench
from benchmarks.experiments import drop, lego


def block_shapes(elements: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with ``rows * cols == elements``: 16 gives 1x16, 2x8, 4x4, 8x2, 16x1."""
    return [(r, elements // r) for r in range(1, elements + 1) if elements % r == 0]


def _weight_names(bench: Bench) -> list[str]:
    return [n for n, t in bench.sd.items() if t.ndim >= 2 and t.is_floating_point()]


def candidates_stage2(bench: Bench, best: dict[str, Any], clusters: int) -> list[dict[str, Any]]:
    """Tensor selection and scope around ``best``: keep first/last weight dense, per-layer codebooks."""
    names = _weight_names(bench)
    first, last = names[0], names[-1]
    out = []
    for excl in ([first], [last], [first, last]):
        for k in (clusters, clusters // 2):
            if k >= 2:
                out.append({**best, "clusters": k, "exclude": excl})
    out.append({**best, "scope": "layer"})
    return out


def candidates_stage3(best: dict[str, Any], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for init in ("k-means++", "random"):
        for seed in seeds:
            s = {k: v for k, v in best.items() if k not in ("seed", "kmeans")}
            if seed:
                s["seed"] = seed
            if init != "k-means++":
                s["kmeans"] = {"init": init}
            if s != best:
                out.append(s)
    return out


def search(bench: Bench, n_images: int | None, *, block: int = 4, clusters: int = 16, slack: float = 0.01,
           seeds: tuple[int, ...] = (0, 1, 2), calib_images: int = 0, top: int = 4) -> dict[str, Any]:
    """Run the search; evaluate the reference and the picks on ``n_images`` test images.

    Returns ``{"target_ratio", "candidates": [...], "reference", "sqnr_pick", "calib_pick"}`` where
    each candidate row has its setting, ratio, SQNRs and whether it is feasible.
    """
    ref_setting = lego(block, clusters)
    ref = bench.measure("legonet", ref_setting, 0)
    floor = ref["ratio"] * (1 - slack)
    seen: dict[str, dict] = {}

    def consider(settings: list[dict[str, Any]], stage: str) -> None:
        for s in settings:
            key = repr(sorted(s.items()))
            if key in seen:
                continue
            try:
                rec = bench.measure("legonet", s, 0)
            except Exception as exc:  # noqa: BLE001 - an infeasible config (e.g. K > blocks) is a result
                seen[key] = {"stage": stage, "setting": s, "error": str(exc), "feasible": False}
                continue
            seen[key] = {"stage": stage, "setting": s, "ratio": rec["ratio"], "sqnr_layer_db": rec["sqnr_layer_db"],
                         "sqnr_mean_db": rec["sqnr_mean_db"], "sqnr_global_db": rec["sqnr_global_db"],
                         "feasible": rec["ratio"] >= floor}

    def best_so_far() -> dict[str, Any]:
        ok = [c for c in seen.values() if c["feasible"]]
        return max(ok, key=lambda c: c["sqnr_layer_db"])["setting"]

    consider([ref_setting], "reference")
    consider([lego(sh, clusters) for sh in block_shapes(block * block)], "1: block shape")
    consider(candidates_stage2(bench, best_so_far(), clusters), "2: tensors and scope")
    consider(candidates_stage3(best_so_far(), seeds), "3: init and seed")
    pick = best_so_far()

    def seen_db(s: dict[str, Any]) -> float:
        return seen[repr(sorted(s.items()))]["sqnr_layer_db"]

    def evaluate(s: dict[str, Any]) -> dict[str, Any]:
        rec = bench.measure("legonet", s, n_images)
        return {"setting": s, "ratio": rec["ratio"], "paper_ratio": rec["info"]["paper_ratio"],
                "bits_per_weight": rec["bits_per_weight"], "sqnr_layer_db": seen_db(s),
                "top1": rec["top1"], "n": rec["n"], "ci95": rec["ci95"], "drop_points": drop(bench, rec)}

    result: dict[str, Any] = {"model": bench.name, "target_ratio": ref["ratio"], "slack": slack,
                              "candidates": list(seen.values()), "reference": evaluate(ref_setting),
                              "sqnr_pick": evaluate(pick), "calib_pick": None}
    if calib_images and bench.calib is not None:
        ranked = sorted((c for c in seen.values() if c["feasible"]), key=lambda c: -c["sqnr_layer_db"])[:top]
        scored = [(bench.measure("legonet", c["setting"], calib_images, on="calib")["top1"], i, c["setting"])
                  for i, c in enumerate(ranked)]
        best_calib = max(scored, key=lambda t: (t[0], -t[1]))  # ties: the higher SQNR
        result["calib_pick"] = {**evaluate(best_calib[2]), "calib_top1": best_calib[0], "calib_n": calib_images}
    return result
