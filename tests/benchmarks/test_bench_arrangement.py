"""The arrangement search keeps the ratio and picks by SQNR."""

from __future__ import annotations

from benchmarks.arrangement import search


def test_search_picks_the_feasible_candidate_with_the_highest_sqnr(bench):
    res = search(bench, 64, block=2, clusters=8, seeds=(0,), calib_images=32, top=2)
    cands = res["candidates"]
    assert cands[0]["stage"] == "reference" and cands[0]["feasible"]
    floor = res["target_ratio"] * (1 - res["slack"])
    feasible = [c for c in cands if c["feasible"]]
    assert all(c["ratio"] >= floor for c in feasible)
    assert all(c.get("ratio", 0) < floor or "error" in c for c in cands if not c["feasible"])
    assert res["sqnr_pick"]["sqnr_layer_db"] >= res["reference"]["sqnr_layer_db"]
    # greedy: the pick is the best of the last stage, at least as good as every candidate of it
    last = [c for c in feasible if c["stage"].startswith("3")]
    assert all(res["sqnr_pick"]["sqnr_layer_db"] >= c["sqnr_layer_db"] - 1e-9 for c in last)
    assert res["sqnr_pick"]["ratio"] >= floor and res["sqnr_pick"]["n"] == 64
    assert res["calib_pick"] is not None and res["calib_pick"]["calib_n"] == 32
    shapes = {tuple(c["setting"]["block"]) for c in cands}
    assert {(2, 2), (1, 4), (4, 1)} <= shapes
