import math

import pytest
import torch

from legonet.ops.scalar_codes import (
    COMPACT_MIN_DISTORTION,
    choose_codebook_scale,
    choose_gain_code,
    codebook_levels,
    decode_codebook,
    decode_gains,
    encode_codebook,
    encode_gains,
    gain_levels,
    valid_codebook_scale,
    valid_gain_code,
)


def gains(n=1000, log_range=11.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * log_range)
    sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).double()
    return (mags * sign).float()


def test_gain_code_keeps_signs_and_zeros_and_is_stable():
    g = gains()
    g[::97] = 0.0
    lo, step = choose_gain_code(g)
    assert valid_gain_code(lo, step)
    codes = encode_gains(g, lo, step)
    assert codes.dtype == torch.uint8 and codes.shape == g.shape
    dec = decode_gains(codes, lo, step)
    assert dec.dtype == torch.float32
    assert torch.equal(dec == 0, g == 0) and torch.equal(torch.sign(dec), torch.sign(g))
    # what was decoded encodes to the same bytes: the writer's check that values are on their code
    assert torch.equal(encode_gains(dec, lo, step), codes) and torch.equal(gain_levels(dec, lo, step), codes)
    nz = g != 0
    rel = (dec[nz].double() / g[nz].double()).log().abs()
    assert float(rel.max()) <= step / 2 + 1e-6  # nearest level in log space
    # both ends of the range are levels
    assert math.isclose(float(dec[nz].abs().min()), float(g[nz].abs().min()), rel_tol=1e-6)
    assert math.isclose(float(dec[nz].abs().max()), float(g[nz].abs().max()), rel_tol=1e-5)


@pytest.mark.parametrize("log_range", [2.0, 11.0])
def test_gain_code_error_is_the_one_the_threshold_assumes(log_range):
    # COMPACT_MIN_DISTORTION rests on an added relative gain error of R^2 / 190512 in energy
    g = gains(20000, log_range)
    lo, step = choose_gain_code(g)
    dec = decode_gains(encode_gains(g, lo, step), lo, step)
    added = float(((dec.double() - g.double()) ** 2).sum() / (g.double() ** 2).sum())
    predicted = log_range**2 / 190512
    assert 0.7 * predicted < added < 1.3 * predicted
    if log_range == 11.0:
        assert added < 0.011 * COMPACT_MIN_DISTORTION  # about 1 % of the smallest error it is used at


def test_gain_code_of_constant_and_zero_gains():
    g = torch.full((7,), -0.37)
    lo, step = choose_gain_code(g)
    assert step == 0.0
    assert torch.allclose(decode_gains(encode_gains(g, lo, step), lo, step), g, rtol=1e-6, atol=0)
    z = torch.zeros(5)
    assert choose_gain_code(z) == (0.0, 0.0)
    assert torch.equal(decode_gains(encode_gains(z, 0.0, 0.0), 0.0, 0.0), z)


def test_values_off_the_code_are_detected():
    g = gains(50)
    lo, step = choose_gain_code(g)
    dec = decode_gains(encode_gains(g, lo, step), lo, step)
    assert gain_levels(dec * 1.001, lo, step) is None


@pytest.mark.parametrize("lo, step, ok", [
    (0.0, 0.0, True), (-3.5, 0.0625, True), (float("nan"), 0.1, False), (0.0, float("inf"), False),
    (0.0, -0.0625, False), (0.1, 0.0, False),  # 0.1 is not a float32 value
    (80.0, 0.5, False), (-110.0, 0.0, False), ("0", 0.0, False), (True, 0.0, False),
])
def test_valid_gain_code(lo, step, ok):
    assert valid_gain_code(lo, step) is ok


def test_int8_codebook_round_trip_and_error():
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(64, 16, generator=g).half().float()
    scale = choose_codebook_scale(cb)
    assert valid_codebook_scale(scale)
    q = encode_codebook(cb, scale)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    dec = decode_codebook(q, scale)
    assert float((dec - cb).abs().max()) <= scale / 2 * (1 + 1e-5)
    assert torch.equal(codebook_levels(dec, scale), q)
    assert codebook_levels(dec + scale / 3, scale) is None
    # relative added error is (max|c| / 254)^2 / 3 over the mean square
    added = float(((dec - cb) ** 2).mean() / (cb**2).mean())
    predicted = (float(cb.abs().max()) / 254) ** 2 / 3 / float((cb**2).mean())
    assert 0.7 * predicted < added < 1.3 * predicted


def test_zero_codebook():
    cb = torch.zeros(4, 2)
    assert choose_codebook_scale(cb) == 1.0
    assert torch.equal(decode_codebook(encode_codebook(cb, 1.0), 1.0), cb)


@pytest.mark.parametrize("scale, ok", [(0.5, True), (0.0, False), (-0.5, False), (float("inf"), False),
                                       (0.1, False), ("1", False), (None, False)])
def test_valid_codebook_scale(scale, ok):
    assert valid_codebook_scale(scale) is ok
