import torch

from legonet.ops.kmeans import _lloyd, kmeans
from legonet.ops.kmeans1d import lloyd_1d
from legonet.ops.nearest import _sweep, assign


def data(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g) ** 3, torch.rand(n, 1, generator=g)  # heavy tails


def test_same_iterations_as_the_general_engine():
    x, w = data()
    start = x[:16].clone()
    for weights in (None, w):
        c_gen, it_gen, lab_gen = _lloyd(x, weights, start.clone(), 30, 0.0)
        c_1d, it_1d, lab_1d = lloyd_1d(x, weights, start.clone(), 30, 0.0)
        assert it_gen == it_1d == 30
        assert torch.allclose(c_gen, c_1d, rtol=1e-5, atol=1e-6)
        assert (lab_gen != lab_1d).sum() <= 2  # only exact ties may differ


def test_empty_cluster_moves_onto_the_farthest_value():
    x = torch.tensor([[0.0], [1.0], [2.5], [10.0]])
    start = torch.tensor([[1.0], [20.0], [30.0]])  # the last two get nothing
    c, _, _ = lloyd_1d(x, None, start, 1, 0.0)
    # all four -> 3.375; the empty ones take the values farthest from their centroid (10, then 2.5)
    assert torch.allclose(c[:, 0], torch.tensor([3.375, 10.0, 2.5]))
    assert torch.allclose(c, _lloyd(x, None, start, 1, 0.0)[0])


def test_scalar_assign_matches_the_distance_pass():
    x, w = data(5000, 1)
    c = torch.linspace(-2, 2, 37)[:, None]
    for weights in (None, w):
        fast_l, fast_d = assign(x, c, weights)
        slow_l, slow_d, _, _ = _sweep(x, c, weights, accumulate=False)
        assert torch.equal(fast_l, slow_l)
        assert torch.allclose(fast_d, slow_d, atol=1e-4, rtol=1e-4)


def test_scalar_kmeans_is_seeded_and_reaches_lloyd_quality():
    x, _ = data(50000, 2)
    a, b = kmeans(x, 16, seed=3, tol=0.0, max_iters=1000), kmeans(x, 16, seed=3, tol=0.0, max_iters=1000)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    # a fixed point of Lloyd: every centroid is the mean of its members
    for j in range(16):
        members = x[a.labels == j]
        assert torch.allclose(a.centroids[j], members.mean(0), rtol=1e-3, atol=1e-5)
