"""The experiments' logic on a tiny model: bisection, K ranges, tables."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from benchmarks import experiments as ex


@given(st.integers(0, 12), st.integers(1, 12))
def test_sweep_until_stops_at_the_first_candidate_within(threshold, n):
    seen = []

    def measure(c):
        seen.append(c)
        return {"c": c}

    got = ex.sweep_until(list(range(n)), measure, lambda r: r["c"] >= threshold)
    assert [r["c"] for r in got] == seen == list(range(min(threshold + 1, n)))


def test_large_k_sweep_settings_cap_kmeans_and_count_as_the_papers_method():
    small, large = ex.sweep_setting(4, 32), ex.sweep_setting(2, ex.LARGE_K)
    assert small == {"block": [4, 4], "clusters": 32}
    assert large["kmeans"] == {**ex.LARGE_K_KMEANS, "max_fit_points": ex.FIT_POINTS_PER_CENTROID * ex.LARGE_K}
    assert ex.is_sweep_setting(small) and ex.is_sweep_setting(large)
    assert not ex.is_sweep_setting({**small, "seed": 1})
    assert not ex.is_sweep_setting({"block": [2, 8], "clusters": 16})
    assert ex.family({"method": "legonet", "setting": large}) == "legonet b=2"


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


def test_coarse_block_sweep_finds_the_same_smallest_k_as_every_k(bench, monkeypatch):
    """With a monotone accuracy in K, the coarse-then-refined sweep answers like the full one."""
    for first_ok in (2, 8, 32, 64, 1000):
        calls: list[int] = []

        def fake(method, setting, n_images, on="test"):
            if method == "fp32":
                return {"top1": 1.0, "n": 64}
            k = setting["clusters"]
            calls.append(k)
            # 10 points lost below first_ok/2, 2 points from first_ok/2, nothing from first_ok on
            top1 = 1.0 if k >= first_ok else (0.98 if 2 * k >= first_ok else 0.9)
            return {"top1": top1, "n": 64, "setting": setting, "ratio": 1000 / k}

        monkeypatch.setattr(bench, "measure", fake)
        ks = (2, 4, 8, 16, 32, 64)
        full = ex.block_sweep(bench, 64, 2, ks, tolerances=(0.5, 3.0), every_k=True)
        n_full = len(calls)
        calls.clear()
        coarse = ex.block_sweep(bench, 64, 2, ks, tolerances=(0.5, 3.0), every_k=False)
        for tol in (0.5, 3.0):
            def best(recs):
                ok = [r["setting"]["clusters"] for r in recs if 100 * (1 - r["top1"]) <= tol]
                return min(ok) if ok else None
            assert best(coarse) == best(full)
        assert len(calls) <= n_full + 2  # at most one refinement per tolerance beyond the full sweep
        if first_ok > 64:  # nothing passes: half the points
            assert sorted(calls) == [4, 16, 64] and n_full == 6


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


def test_a_peer_setting_that_fails_is_a_row_and_the_family_goes_on(bench):
    def picky(sd, arch, calib, *, bits):
        if bits == 2:
            raise AssertionError("too many clusters 4 for 3 samples")
        return bench.methods["rtn"](sd, arch, calib, bits=bits)

    bench.methods["picky"] = picky
    rows = ex.peers(bench, 64, [("picky", {"bits": 2}), ("picky", {"bits": 8})])
    assert rows[0] == {"model": "tiny", "method": "picky", "setting": {"bits": 2},
                       "error": "AssertionError: too many clusters 4 for 3 samples"}
    assert rows[1]["setting"] == {"bits": 8} and rows[1]["ratio"] > 1
    from benchmarks.summary import points_md

    assert "failed: AssertionError" in "\n".join(points_md(rows, ex.family))


def test_peers_and_best_ratio_within(bench):
    grid = ex.peer_grid(bench, bits=(2, 8), coreml=False)
    assert ("rtn", {"bits": 8}) in grid and ("kmeans-layer", {"bits": 2}) in grid
    rows = ex.peers(bench, 64, grid, stop_within=None)
    assert len(rows) == len(grid)
    # each family stops at its first setting within 0.5 points (later ones store more bits)
    early = ex.peers(bench, 64, grid)
    for fam in ("rtn", "kmeans-layer"):
        mine = [r for r in early if r["method"] == fam]
        assert all(r["drop_points"] > 0.5 for r in mine[:-1])
        assert mine[-1]["drop_points"] <= 0.5 or mine[-1]["setting"]["bits"] == 8
    best = {r["method"]: r for r in ex.best_ratio_within(bench, 64, tolerances=(100.0,))}
    # with every point within tolerance the best ratio is the smallest bit width's
    assert best["per-layer k-means (Deep Compression)"]["setting_within_100"] == {"bits": 2}
