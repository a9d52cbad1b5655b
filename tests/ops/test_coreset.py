"""Lightweight-coreset working set: unbiased weighted cost, far rows favoured, seeded."""

from __future__ import annotations

import torch

from legonet.ops.coreset import lightweight_coreset, sq_dist_to_mean
from legonet.ops.nearest import assign


def _heavy(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g))


def test_sq_dist_to_mean_matches_float64_reference():
    x = _heavy(10_000) + 3.0
    ref = ((x.double() - x.double().mean(0)) ** 2).sum(1)
    assert torch.allclose(sq_dist_to_mean(x), ref, rtol=1e-4, atol=1e-4 * float(ref.mean()))
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    mean_w = (w.double() * x.double()).sum(0) / w.double().sum(0)
    ref_w = (w.double() * (x.double() - mean_w) ** 2).sum(1)
    assert torch.allclose(sq_dist_to_mean(x, w), ref_w, rtol=1e-4, atol=1e-4 * float(ref_w.mean()))


def test_same_seed_same_draws_and_far_rows_are_drawn_more_often():
    x = _heavy(50_000)
    a = lightweight_coreset(x, 4096, torch.Generator().manual_seed(3))
    b = lightweight_coreset(x, 4096, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    idx, mass = a
    d2 = sq_dist_to_mean(x)
    # Far rows are over-represented and weighted down by exactly the inverse of their odds.
    assert float(d2[idx].mean()) > 1.5 * float(d2.mean())
    assert bool((mass > 0).all()) and bool((mass <= 2.0 + 1e-6).all())
    assert abs(float(mass.mean()) - 1.0) < 0.1


def test_weighted_cost_of_the_coreset_estimates_the_full_cost_better_than_a_uniform_sample():
    # Heavy tails: a uniform sample's estimate of the k-means cost of fixed centroids scatters
    # widely (a few far rows carry much of it); the coreset's weighted estimate stays unbiased
    # and tight.
    x = _heavy(100_000)
    c = x[:16].clone()
    full = float(assign(x, c)[1].double().sum())
    core_err, unif_err = [], []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        idx, mass = lightweight_coreset(x, 2000, g)
        core_err.append(float((assign(x[idx], c)[1].double() * mass.double()).sum()) * x.shape[0] / 2000 / full - 1)
        uidx = torch.randint(x.shape[0], (2000,), generator=g)
        unif_err.append(float(assign(x[uidx], c)[1].double().sum()) * x.shape[0] / 2000 / full - 1)
    core_rms = (sum(v * v for v in core_err) / len(core_err)) ** 0.5
    unif_rms = (sum(v * v for v in unif_err) / len(unif_err)) ** 0.5
    assert core_rms < 0.1
    assert core_rms < 0.7 * unif_rms


def test_constant_rows_give_a_uniform_draw():
    x = torch.ones(1000, 4)
    idx, mass = lightweight_coreset(x, 100, torch.Generator().manual_seed(0))
    assert idx.shape == (100,) and bool((mass == 1).all()) and int(idx.max()) < 1000
