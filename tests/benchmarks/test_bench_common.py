"""The cached harness: baseline bytes, SQNR, caching and data rules."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.common import Bench, MethodOutput, fp32_bytes, sqnr_stats
from conftest import TINY
from legonet.errors import DataError


def test_fp32_bytes_counts_floats_at_four_bytes_and_others_as_stored():
    sd = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(2, 2), "c": torch.zeros((), dtype=torch.int64)}
    assert fp32_bytes(sd) == 12 + 16 + 8


def test_sqnr_stats_exact_and_known_noise():
    w = {"w": torch.ones(10, 10), "bias": torch.ones(10)}
    assert sqnr_stats(w, w)["sqnr_mean_db"] == 100.0
    noisy = {"w": torch.ones(10, 10) * 1.1, "bias": torch.zeros(10)}  # bias (1-D) is not counted
    s = sqnr_stats(w, noisy)
    assert math.isclose(s["sqnr_mean_db"], 20.0, abs_tol=1e-4) and math.isclose(s["sqnr_global_db"], 20.0, abs_tol=1e-4)


def test_measure_caches_and_a_new_bench_reuses_the_cache_file(tiny_sd, tiny_images, tmp_path):
    calls = []

    def identity(sd, arch, calib, *, tag):
        calls.append(tag)
        return MethodOutput(sd, 1000, {"tag": tag})

    b1 = Bench("tiny", tiny_sd, TINY, tiny_images, tmp_path, {"id": identity})
    r = b1.measure("id", {"tag": 1}, 64)
    assert r["top1"] == 1.0 and r["n"] == 64 and r["ratio"] == fp32_bytes(tiny_sd) / 1000
    assert r["ci95"][0] < 1.0 <= r["ci95"][1] + 1e-12
    assert b1.measure("id", {"tag": 1}, 64) == r and calls == [1]
    b1.measure("id", {"tag": 2}, 0)  # not evaluated: sizes only
    assert "top1" not in b1.measure("id", {"tag": 2}, 0) and calls == [1, 2]
    b2 = Bench("tiny", tiny_sd, TINY, tiny_images, tmp_path, {"id": identity})
    assert b2.measure("id", {"tag": 1}, 64) == r and calls == [1, 2] and b2.computed == 0
    # asking for more images than there are is the whole set: one entry
    assert b2.measure("fp32", {}, 10_000) is b2.measure("fp32", {}, None)


def test_compressed_model_loses_accuracy_against_its_own_labels(bench):
    rec = bench.measure("legonet", {"block": [4, 4], "clusters": 2}, None)
    assert rec["top1"] < 1.0 and rec["file_bytes"] > 0 and rec["sqnr_mean_db"] < 10


def test_calibration_scoring_needs_calibration_images(tiny_sd, tiny_images):
    b = Bench("tiny", tiny_sd, TINY, tiny_images, None, {})
    with pytest.raises(DataError):
        b.measure("fp32", {}, 10, on="calib")


def test_layer_averaged_sqnr_averages_noise_to_signal_over_tensors():
    w = {"a": torch.ones(4, 4), "b": torch.ones(2, 8)}
    approx = {"a": torch.ones(4, 4), "b": torch.ones(2, 8) * 1.1}  # a exact, b at NSR 0.01
    assert math.isclose(sqnr_stats(w, approx)["sqnr_layer_db"], -10 * math.log10(0.005), abs_tol=1e-4)
    assert sqnr_stats(w, w)["sqnr_layer_db"] == 100.0


def test_subset_records_are_read_off_a_whole_set_evaluation(bench, tiny_sd, tiny_images):
    from benchmarks.common import subset_index

    sub = tiny_images.subset(40, 0)
    idx = subset_index(len(tiny_images), 40)
    assert (sub.x == tiny_images.x[idx]).all() and (sub.y == tiny_images.y[idx]).all()
    setting = {"block": [2, 2], "clusters": 4}
    full = bench.measure("legonet", setting, None)
    assert "hits" in full and bench.computed == 1
    derived = bench.measure("legonet", setting, 40)
    assert bench.computed == 1 and derived["derived_from"] == len(tiny_images)  # nothing recomputed
    # the same number as compressing again and evaluating on the subset itself
    fresh = Bench("tiny", tiny_sd, bench.arch, tiny_images, None, bench.methods)
    direct = fresh.measure("legonet", setting, 40)
    assert derived["correct"] == direct["correct"] and derived["top1"] == direct["top1"] < 1.0
    assert derived["ci95"] == direct["ci95"] and derived["file_bytes"] == direct["file_bytes"]


def test_jit_evaluation_gives_the_same_hits(bench, tiny_sd, tiny_images):
    jitted = Bench("tiny", tiny_sd, bench.arch, tiny_images, None, bench.methods, jit=True)
    assert (jitted.hits(tiny_sd, tiny_images) == bench.hits(tiny_sd, tiny_images)).all()
