"""Peers: size accounting and the correctness of each re-implemented quantizer."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.peers import (
    coreml_palettize, count_bytes, kmeans_1d_linear, kmeans_per_layer, rtn, rtn_per_channel,
)
from conftest import TINY


def test_count_bytes_packs_indices_and_counts_tables_as_float32_and_kept_tensors_as_stored():
    sd = {"w": torch.zeros(4, 8), "b": torch.zeros(4, dtype=torch.float16), "n": torch.zeros((), dtype=torch.int64)}
    total, info = count_bytes(sd, {"w": (32, 3, 4)})  # 32 indices x 3 bits = 12 bytes; 4 floats = 16 bytes
    assert info == {"index_bytes": 12, "table_bytes": 16, "kept_bytes": 8 + 8}
    assert total == 12 + 16 + 16
    # a partial last byte is paid in full
    assert count_bytes({"w": torch.zeros(3, 1)}, {"w": (3, 3, 0)})[0] == 2


def test_rtn_per_channel_error_is_at_most_half_a_step_and_codes_fit():
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    w[2] = 0.0
    for bits in (4, 8):
        deq, scale = rtn_per_channel(w, bits)
        assert deq.shape == w.shape and scale.shape == (6,)
        err = (deq - w).abs().reshape(6, -1).amax(1)
        assert torch.all(err <= scale / 2 + 1e-6)
        codes = torch.round(deq.reshape(6, -1) / scale[:, None])
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        assert torch.all(deq[2] == 0)


def test_rtn_method_counts_bits_and_one_scale_per_output_channel(tiny_sd):
    out = rtn(tiny_sd, TINY, None, bits=4)
    quant = {n: t for n, t in tiny_sd.items() if t.ndim >= 2}
    expect = sum((t.numel() * 4 + 7) // 8 + 4 * t.shape[0] for t in quant.values())
    expect += sum(t.numel() * t.element_size() for n, t in tiny_sd.items() if n not in quant)
    assert out.file_bytes == expect
    assert set(out.state_dict) == set(tiny_sd)
    for n in quant:
        assert out.state_dict[n].dtype == tiny_sd[n].dtype and not torch.equal(out.state_dict[n], tiny_sd[n])


def test_kmeans_1d_linear_finds_separated_clusters_exactly():
    x = torch.tensor([-5.0, -5.0, -5.0, 0.0, 0.0, 7.0, 7.0, 7.0, 7.0])
    c, lab = kmeans_1d_linear(x, 3)
    assert torch.allclose(c, torch.tensor([-5.0, 0.0, 7.0]))
    assert torch.equal(c[lab], x)


def test_kmeans_per_layer_uses_at_most_2_pow_bits_values_per_tensor(tiny_sd):
    out = kmeans_per_layer(tiny_sd, TINY, None, bits=2)
    for n, t in tiny_sd.items():
        if t.ndim >= 2:
            assert out.state_dict[n].unique().numel() <= 4
        else:
            assert torch.equal(out.state_dict[n], t)
    weights = [t for t in tiny_sd.values() if t.ndim >= 2]
    kept = sum(t.numel() * t.element_size() for t in tiny_sd.values() if t.ndim < 2)
    assert out.file_bytes == sum((t.numel() * 2 + 7) // 8 + 16 for t in weights) + kept


# find_spec, not an import: importing coremltools takes seconds and only this test needs it.
@pytest.mark.skipif(importlib.util.find_spec("coremltools") is None, reason="coremltools not installed (bench extra)")
def test_coreml_palettizer_output_matches_its_byte_count(tiny_sd):
    out = coreml_palettize(tiny_sd, TINY, None, bits=2, granularity="per_tensor")
    n_pal = 0
    for n, t in tiny_sd.items():
        if t.ndim >= 2 and not torch.equal(out.state_dict[n], t):
            assert out.state_dict[n].unique().numel() <= 4
            n_pal += 1
    assert n_pal == out.info["palettized_tensors"] >= 1
    assert out.file_bytes == out.info["index_bytes"] + out.info["table_bytes"] + out.info["kept_bytes"]


def test_uniform_rows_keeps_each_rows_extremes_on_an_even_grid():
    from benchmarks.scalar_grids import uniform_rows

    w = torch.tensor([[0.0, 0.5, -2.0, 1.0], [3.0, -3.0, 0.1, 0.0]])
    q = uniform_rows(w, 16)
    assert q.shape == w.shape and torch.equal(q.abs().amax(1), w.abs().amax(1))
    step = 2 * w.abs().amax(1, keepdim=True) / 15
    assert torch.allclose((q + w.abs().amax(1, keepdim=True)) / step, ((q + w.abs().amax(1, keepdim=True)) / step).round(), atol=1e-5)
    assert not bool((q == 0).any())  # 16 levels over [-m, m]: no zero level
