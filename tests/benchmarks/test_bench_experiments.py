"""The experiments' logic on a tiny model: bisection, K ranges, tables."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from benchmarks import experiments as ex


@given(st.integers(0, 12), st.integers(1, 12))
def test_smallest_passing_finds_the_threshold_of_a_monotone_predicate(threshold, n):
    cand = list(range(n))
    calls = []

    def passes(c):
        calls.append(c)
        return c >= threshold

    got = ex.smallest_passing(cand, passes)
    assert got == (threshold if threshold < n else None)
    assert len(calls) <= n.bit_length() + 1


def test_k_range_caps_index_bits_per_weight():
    assert ex.k_range(1) == [2, 4, 8, 16, 32, 64, 128, 256]
    assert ex.k_range(4) == list(ex.POW2_K)


def test_headline_and_fig4_rows(bench):
    rows = ex.headline(bench, None, clusters=(8, 2))
    assert [r["label"] for r in rows] == ["uncompressed (fp32 baseline)", "legonet 4x4 K=8", "legonet 4x4 K=2"]
    assert rows[0]["top1"] == 1.0 and rows[0]["ratio"] == 1.0
    assert rows[2]["ratio"] > rows[1]["ratio"] > 1.0
    for r in rows[1:]:
        assert r["drop_points"] == round(100.0 * (1.0 - r["top1"]), 9) and r["paper_ratio"] > r["ratio"]
    f4 = ex.fig4(bench, 64, ks=(2, 16))
    assert [r["K"] for r in f4] == [2, 16] and all(r["n"] == 64 for r in f4)


def test_fig3_reports_the_smallest_passing_k_per_block_and_tolerance(bench):
    rows, points = ex.fig3(bench, 64, blocks=(2, 4), tolerances=(3.0, 100.0), ks=(2, 4, 8, 16))
    assert {(r["b"], r["tolerance"]) for r in rows} == {(2, 3.0), (2, 100.0), (4, 3.0), (4, 100.0)}
    for r in rows:
        if r["tolerance"] == 100.0:  # everything passes: the smallest K, the highest ratio
            assert r["K"] == 2
        if r["K"] is not None:
            assert r["drop_points"] <= r["tolerance"]
            # no smaller K measured for this b passes the tolerance
            smaller = [p for p in points if p["b"] == r["b"] and p["K"] < r["K"]]
            assert all(p["drop_points"] > r["tolerance"] for p in smaller)


def test_peers_and_best_ratio_within(bench):
    grid = ex.peer_grid(bench, bits=(2, 8), coreml=False)
    assert ("rtn", {"bits": 8}) in grid and ("kmeans-layer", {"bits": 2}) in grid
    rows = ex.peers(bench, 64, grid)
    assert len(rows) == len(grid)
    best = {r["method"]: r for r in ex.best_ratio_within(bench, 64, tolerances=(100.0,))}
    # with every point within tolerance the best ratio is the smallest bit width's
    assert best["per-layer k-means (Deep Compression)"]["setting_within_100"] == {"bits": 2}
