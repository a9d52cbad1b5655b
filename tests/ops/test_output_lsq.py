import pytest
import torch

from legonet.ops.output_lsq import Member, fit_codebook, optimal_gains, output_error, row_weights, shapes
from legonet.ops.tiling import make_tiling, tile


def _member(rows=16, cols=24, block=(2, 2), k=6, seed=0, cov=None, gains=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    til = make_tiling((rows, cols), block)
    idx = torch.randint(0, k, (til.num_blocks,), generator=g)
    if cov is None:
        a = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)  # correlated, ill-conditioned inputs
        cov = a @ a.T / cols + 1e-3 * torch.eye(cols)
    return Member(w, cov, idx, til, torch.ones(rows) if gains is None else gains), k


def test_identity_covariance_gives_the_row_weighted_centroids():
    m, k = _member(cov=torch.eye(24))
    fitted = fit_codebook(torch.zeros(k, 4), [m], iters=60)
    # with H = I each centroid element is the rho-weighted mean of the elements assigned to it
    rho = row_weights(m.weight, m.cov)
    blocks = tile(m.weight, (2, 2))
    wts = tile(rho[:, None].expand(16, 24).contiguous(), (2, 2))
    num = torch.zeros(k, 4).index_add_(0, m.indices, blocks * wts)
    den = torch.zeros(k, 4).index_add_(0, m.indices, wts)
    torch.testing.assert_close(fitted, num / den, rtol=1e-4, atol=1e-5)


def test_an_exactly_representable_weight_is_recovered_from_a_perturbed_codebook():
    m, k = _member()
    true = torch.randn(k, 4, generator=torch.Generator().manual_seed(5))
    gains = torch.rand(16, generator=torch.Generator().manual_seed(6)) + 0.5
    exact = Member(gains[:, None] * shapes(true, m), m.cov, m.indices, m.tiling, gains)
    start = true + 0.3 * torch.randn(k, 4, generator=torch.Generator().manual_seed(7))
    err0, rows = output_error(exact, start)
    err1, _ = output_error(exact, fit_codebook(start, [exact], iters=200))
    assert rows == 16
    assert err1 < 1e-6 * err0


def test_the_fit_never_raises_the_output_error_and_beats_k_means_on_correlated_inputs():
    m, k = _member(rows=32, cols=32, block=(4, 4), k=8)
    # the weight-space optimum (H = I) is not the output-space optimum when inputs are correlated
    plain = fit_codebook(torch.zeros(k, 16), [Member(m.weight, torch.eye(32), m.indices, m.tiling, m.gains)], 100)
    for iters in (1, 3, 30):
        assert output_error(m, fit_codebook(plain, [m], iters))[0] <= output_error(m, plain)[0]
    assert output_error(m, fit_codebook(plain, [m], 30))[0] < 0.8 * output_error(m, plain)[0]


def test_two_tensors_share_one_codebook_fit():
    a, k = _member(seed=1)
    b, _ = _member(seed=2)
    cb = torch.randn(k, 4, generator=torch.Generator().manual_seed(3))
    joint = fit_codebook(cb, [a, b], 100)
    alone = fit_codebook(cb, [a], 100)
    total = lambda c: output_error(a, c)[0] + output_error(b, c)[0]  # noqa: E731
    assert total(joint) < total(alone)
    assert output_error(a, alone)[0] < output_error(a, joint)[0]


def test_optimal_gains_minimise_each_row_and_stay_positive():
    m, k = _member()
    cb = torch.randn(k, 4, generator=torch.Generator().manual_seed(4))
    g = optimal_gains(m, cb)
    q = shapes(cb, m)
    for r in range(3):
        e = lambda s: float(((m.weight[r] - s * q[r]) @ m.cov @ (m.weight[r] - s * q[r])))  # noqa: E731
        if g[r] != m.gains[r]:  # the optimum: a small step either way is worse
            assert e(g[r]) <= min(e(g[r] * 1.01), e(g[r] * 0.99))
    assert bool((g > 0).all())
    flipped = Member(-m.weight, m.cov, m.indices, m.tiling, m.gains * 3)
    gf = optimal_gains(flipped, cb)
    # rows whose best gain would be negative keep their gain
    neg = (((shapes(cb, m) @ m.cov) * -m.weight).sum(1) <= 0)
    assert torch.equal(gf[neg], flipped.gains[neg])


def test_zero_rows_get_no_weight():
    w = torch.zeros(4, 6)
    w[0] = 1.0
    assert row_weights(w, torch.eye(6)).tolist() == pytest.approx([1 / 6, 0, 0, 0])
