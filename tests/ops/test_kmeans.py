"""The k-means engine: determinism, row-wise assignment, exactness of the argmin, quality, progress."""

from __future__ import annotations

import pytest
import torch

from legonet.errors import ConfigError
from legonet.ops.kmeans import _lloyd, assign, kmeans, kmeans_plusplus, pairwise_sqdist, sample_rows, stage_sizes
from tests.marks import needs_cuda


def _blobs(n: int, k: int, d: int = 16, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    lab = torch.randint(k, (n,), generator=g)
    return centers[lab] + spread * torch.randn(n, d, generator=g), centers


def _heavy(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.exp(0.7 * torch.randn(n, 1, generator=g))


def test_same_seed_gives_identical_results_and_another_seed_differs():
    x = _heavy(40_000)
    kw = dict(max_fit_points=20_000, max_iters=15)
    a, b = kmeans(x, 32, seed=3, **kw), kmeans(x, 32, seed=3, **kw)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    c = kmeans(x, 32, seed=4, **kw)
    assert not torch.equal(a.centroids, c.centroids)


def test_assignment_is_row_wise_so_shards_can_be_assigned_separately():
    x = _heavy(70_001)
    c = x[:200].clone()
    labels, dists = assign(x, c)
    for lo, hi in [(0, 1), (5, 70_001), (12_345, 54_321), (69_000, 70_001)]:
        l2, d2 = assign(x[lo:hi].clone(), c)
        assert torch.equal(labels[lo:hi], l2) and torch.equal(dists[lo:hi], d2)


@pytest.mark.parametrize("k", [2, 7, 32, 256, 300])
def test_assign_finds_the_nearest_centroid_up_to_float_rounding(k):
    x = _heavy(5_000, seed=k)
    c = _heavy(k, seed=100 + k)
    labels, dists = assign(x, c)
    exact = pairwise_sqdist(x.double(), c.double())
    best = exact.min(1).values
    chosen = exact.gather(1, labels[:, None]).squeeze(1)
    scale = (x.double() ** 2).sum(1) + (c.double() ** 2).sum(1).max()
    # The packed-key argmin may pick a centroid within float rounding of the best one, never worse.
    assert bool((chosen - best <= 1e-5 * scale).all())
    assert float((chosen == best).double().mean()) > 0.99
    assert torch.allclose(dists.double(), chosen, rtol=1e-4, atol=1e-4 * float(scale.max()))


def test_recovers_well_separated_clusters():
    x, centers = _blobs(30_000, 20)
    res = kmeans(x, 20, seed=0, max_fit_points=8_000)
    # Every true centre has a centroid within a few noise widths, and inertia is the noise alone.
    d = pairwise_sqdist(centers, res.centroids).min(1).values
    assert float(d.max()) < 0.05
    assert res.inertia / x.shape[0] < 16 * 0.05**2 * 1.2


def test_sampled_fit_comes_close_to_fitting_on_everything():
    x = _heavy(60_000)
    full = kmeans(x, 16, seed=0, max_fit_points=None, tol=0.0, max_iters=30)
    sampled = kmeans(x, 16, seed=0, max_fit_points=15_000)
    assert sampled.inertia < 1.03 * full.inertia
    assert sampled.labels.shape == (60_000,)


def test_weights_zero_out_dimensions():
    x = _heavy(3_000)
    w = torch.ones_like(x)
    w[:, 8:] = 0
    res = kmeans(x, 8, seed=0, weights=w, max_fit_points=None)
    res8 = kmeans(x[:, :8].contiguous(), 8, seed=0, max_fit_points=None)
    assert res.inertia == pytest.approx(res8.inertia, rel=0.05)


def test_stage_schedule_doubles_and_ends_with_every_row():
    assert stage_sizes(1000, 4) == [1000]
    s = stage_sizes(200_000, 32)
    assert s[0] == 16_384 and s[-1] == 200_000
    assert all(b == 2 * a for a, b in zip(s[:-2], s[1:-1])) and s[-2] < 200_000


def test_sample_rows_is_sorted_unique_and_seeded():
    a = sample_rows(1000, 100, torch.Generator().manual_seed(1))
    b = sample_rows(1000, 100, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.unique().numel() == 100 and bool((a[1:] > a[:-1]).all())
    assert sample_rows(100, 100, torch.Generator()) is None and sample_rows(100, None, torch.Generator()) is None


def test_progress_reports_fit_then_assign_up_to_completion():
    calls = []
    kmeans(_heavy(50_000), 8, seed=0, max_fit_points=40_000, progress=lambda *a: calls.append(a))
    tasks = [c[0] for c in calls]
    assert tasks[0] == "fit" and tasks[-1] == "assign" and "assign" not in tasks[: tasks.index("assign")]
    for task in ("fit", "assign"):
        done = [d for t, d, _ in calls if t == task]
        total = {n for t, _, n in calls if t == task}
        assert done == sorted(done) and len(total) == 1 and done[-1] == total.pop()


def test_fewer_distinct_points_than_k_still_gives_k_centroids():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(50, 1)
    res = kmeans(x, 5, seed=0)
    assert res.centroids.shape == (5, 2) and res.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=101), dict(init="nope")])
def test_bad_arguments_raise_config_errors(bad):
    kw = dict(k=4, init="k-means++") | bad
    with pytest.raises(ConfigError):
        kmeans(torch.zeros(100, 4), kw.pop("k"), **kw)


@needs_cuda
def test_gpu_matches_cpu_up_to_float_tolerance():
    x = _heavy(50_000)
    cpu = kmeans(x, 32, seed=0, max_fit_points=20_000)
    gpu = kmeans(x.cuda(), 32, seed=0, max_fit_points=20_000)
    assert gpu.labels.device.type == "cuda"
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=0.02)


@pytest.mark.parametrize("d,k", [(1, 3), (9, 2), (64, 2), (16, 63), (16, 64), (16, 256), (16, 1000), (25, 300)])
def test_assignment_is_row_wise_for_any_chunk_width(d, k):
    # The chunk width depends on (k, d); rows must get the same bits whatever chunk they share.
    g = torch.Generator().manual_seed(d * k)
    x = torch.randn(40_001, d, generator=g)
    c = x[:k] + 1e-3 * torch.randn(k, d, generator=g)
    labels, dists = assign(x, c)
    for lo, hi in [(0, 1), (7, 40_001), (12_345, 33_333), (39_990, 40_001)]:
        l2, d2 = assign(x[lo:hi].clone(), c)
        assert torch.equal(labels[lo:hi], l2) and torch.equal(dists[lo:hi], d2)


def test_working_set_fit_on_heavy_tails_beats_a_uniform_sample_of_the_same_size():
    # Rare far-out rows carry much of the cost: an importance-sampled working set of m rows (plus
    # the full-sample polish) beats fitting on a uniform sample of m rows.
    x = _heavy(200_000, seed=5)
    core = kmeans(x, 16, seed=0, max_fit_points=None, working_points=8_192)
    uniform = kmeans(x, 16, seed=0, max_fit_points=8_192)
    core_no_polish = kmeans(x, 16, seed=0, max_fit_points=None, working_points=8_192, polish_iters=0)
    assert core.inertia < uniform.inertia and core_no_polish.inertia < uniform.inertia
    assert core.inertia <= core_no_polish.inertia
    # The polish iterations are counted (the working set stops at the same point whatever follows it).
    polish2 = kmeans(x, 16, seed=0, max_fit_points=None, working_points=8_192, polish_iters=2)
    assert polish2.iterations == core.iterations + 1


def test_bad_working_set_arguments_raise_config_errors():
    with pytest.raises(ConfigError):
        kmeans(torch.zeros(100, 4), 8, working_points=4)
    with pytest.raises(ConfigError):
        kmeans(torch.zeros(100, 4), 8, polish_iters=-1)


@pytest.mark.parametrize("omega,momentum", [(1.0, 0.0), (1.8, 0.0), (1.8, 0.8)])
def test_accelerated_lloyd_returns_the_means_of_its_last_assignment(omega, momentum):
    # However far the accelerated steps overshoot, the centroids returned are plain means of the
    # labels returned, and the caller's starting centroids are left as they were.
    x = _heavy(20_000, seed=2)
    mass = torch.rand(20_000, generator=torch.Generator().manual_seed(3)) + 0.5
    start = kmeans_plusplus(x[:2_000], 24, torch.Generator().manual_seed(0))
    before = start.clone()
    c, it, labels = _lloyd(x, None, start, 12, 0.0, mass, omega, momentum)
    assert torch.equal(start, before) and it == 12
    for j in range(24):
        members = labels == j
        mean = (x[members].double() * mass[members, None].double()).sum(0) / mass[members].double().sum()
        assert torch.allclose(c[j].double(), mean, rtol=1e-4, atol=1e-5)


def test_accelerated_lloyd_is_deterministic_and_reseeds_empty_clusters_without_nan():
    # Many duplicates and more centroids than distinct rows: empty clusters at every step.
    base = _heavy(40, seed=4)
    x = base[torch.randint(40, (20_000,), generator=torch.Generator().manual_seed(5))]
    start = x[:60].clone()
    a = _lloyd(x, None, start, 10, 0.0, None, 1.8, 0.8)
    b = _lloyd(x, None, start, 10, 0.0, None, 1.8, 0.8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert bool(torch.isfinite(a[0]).all()) and a[0].shape == (60, 16)


def test_plain_lloyd_steps_are_exactly_the_means():
    # omega = 1 without momentum is plain Lloyd: no rounding from a zero-length extrapolation.
    x = _heavy(3_000, seed=6)
    start = x[:8].clone()
    one, _, labels = _lloyd(x, None, start, 1, 0.0)
    two, _, _ = _lloyd(x, None, start, 2, 0.0)
    again, _, _ = _lloyd(x, None, one, 1, 0.0)
    assert torch.equal(two, again)


def test_a_polished_working_set_stops_no_later_than_an_unpolished_one():
    # Before a full-sample polish, the working set stops at a looser tolerance.
    x = _heavy(200_000, seed=5)
    polished = kmeans(x, 16, seed=0, max_fit_points=None, working_points=8_192)
    alone = kmeans(x, 16, seed=0, max_fit_points=None, working_points=8_192, polish_iters=0)
    assert polished.iterations - 1 <= alone.iterations
