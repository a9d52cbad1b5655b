import pytest
import torch

from legonet.errors import ConfigError
from legonet.ops.kmeans import assign, kmeans, kmeans_plusplus


def planted(n_per=200, k=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 10
    x = centers.repeat_interleave(n_per, 0) + 0.01 * torch.randn(k * n_per, d, generator=g)
    return x, centers


def test_recovers_planted_clusters():
    x, centers = planted()
    res = kmeans(x, 5, seed=3)
    # every true centre has a centroid within the noise level
    d = torch.cdist(centers, res.centroids)
    assert float(d.min(1).values.max()) < 0.05
    # all points of one planted cluster share one label
    labels = res.labels.reshape(5, -1)
    assert all(len(set(row.tolist())) == 1 for row in labels)


def test_same_seed_same_result_other_seed_differs():
    x = torch.randn(5000, 16)
    a, b = kmeans(x, 32, seed=7), kmeans(x, 32, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    c = kmeans(x, 32, seed=8)
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeanspp_spreads_seeds():
    x, centers = planted(k=8)
    init = kmeans_plusplus(x, 8, torch.Generator().manual_seed(0))
    # greedy k-means++ puts one seed in each well-separated cluster
    nearest = torch.cdist(init, centers).argmin(1)
    assert sorted(nearest.tolist()) == list(range(8))


def test_exact_when_k_covers_distinct_points():
    base = torch.randn(6, 4)
    x = base[torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(1))]
    res = kmeans(x, 8, seed=0)  # K > distinct points: duplicates allowed, no NaN
    assert torch.isfinite(res.centroids).all()
    torch.testing.assert_close(res.centroids[res.labels], x, rtol=1e-6, atol=1e-6)
    assert res.inertia < 1e-3  # float32 rounding of |x|^2 - 2xc + |c|^2 only


def test_empty_clusters_are_reseeded_not_nan():
    # random init on heavily duplicated data produces empty clusters on the first step
    x = torch.cat([torch.zeros(500, 2), torch.ones(3, 2) * 5, torch.randn(20, 2) * 0.1 + 10])
    res = kmeans(x, 6, seed=0, init="random")
    assert torch.isfinite(res.centroids).all()
    assert torch.bincount(res.labels, minlength=6).min() >= 0


def test_weighted_assignment_ignores_zero_weight_dims():
    c = torch.tensor([[0.0, 0.0], [1.0, 100.0]])
    x = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0]])
    assert assign(x, c)[0].item() == 0
    assert assign(x, c, w)[0].item() == 1


def test_errors():
    with pytest.raises(ConfigError, match="between 1 and"):
        kmeans(torch.randn(10, 4), 11)
    with pytest.raises(ConfigError):
        kmeans(torch.randn(10, 4), 0)


def test_kmeanspp_never_seeds_on_rows_of_zero_mass():
    x, _ = planted(k=8)
    mass = torch.ones(x.shape[0])
    mass[: 3 * 200] = 0.0  # the first three planted clusters weigh nothing
    init = kmeans_plusplus(x, 5, torch.Generator().manual_seed(0), mass=mass)
    rows = [int((x == r).all(1).nonzero()[0]) for r in init]
    assert all(r >= 3 * 200 for r in rows)
