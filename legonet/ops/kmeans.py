"""k-means for many short vectors (blocks), in PyTorch so that it runs wherever the tensors live.

Pure functions, no module state. Distances are computed by blocked matrix products
(``|x|^2 - 2 x.c + |c|^2``), optionally with per-element weights ``w`` (same shape as ``x``), in
which case the objective is ``sum_i sum_d w_id (x_id - c_{a(i),d})^2``: that serves masked padding,
importance weighting and activation-aware clustering with one engine.

The engine is built for millions to billions of short vectors:

1. a seeded uniform *fit sample* of at most ``max_fit_points`` rows is drawn (:func:`sample_rows`);
2. if the fit sample is much larger than ``max(65536, 1024 k)`` rows, a *working set* of that many
   rows is drawn from it as a lightweight coreset (far-out rows drawn more often and weighted down:
   heavy-tailed weights are then represented without bias); otherwise the working set is the fit
   sample itself;
3. k-means++ seeds the centroids on a prefix of the working set (``init_points`` rows);
4. accelerated Lloyd iterations (over-relaxed, with heavy-ball momentum on stages of 16384 rows or
   more) run on a *growing* prefix of the working set: each stage doubles the number of rows and
   starts from the previous stage's centroids, so most iterations are spent on small, cheap stages;
   every stage stops early once the relative change of inertia falls below ``tol`` (``3 tol`` when
   a polish follows);
5. after a coreset, plain Lloyd iteration(s) on the whole fit sample (``polish_iters``, default 1)
   remove most of what is left of the sampling error;
6. one full assignment pass labels every row (:func:`assign`).

A full pass is one GEMM per chunk of rows that yields the squared distances directly (the norms
ride along as two extra columns) and one integer ``amin`` over the centroids (packed keys).

Every tensor is created on ``x.device``; random choices come from a seeded CPU generator, so a seed
gives identical results on one device (and equal results up to float rounding across devices).
Assignment is row-wise: the label of a row does not depend on the other rows, so a checkpoint can be
assigned shard by shard (or machine by machine) with :func:`assign` alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from legonet.errors import ConfigError
from legonet.ops.codebook import snap_uniform_clusters
from legonet.ops.coreset import lightweight_coreset
from legonet.ops.kmeans1d import lloyd_1d
from legonet.ops.nearest import Progress, _sweep, assign, pairwise_sqdist, prepare_rows

# Smallest stage of the growing-sample Lloyd schedule, in rows per centroid and in rows.
_STAGE_ROWS_PER_CENTROID = 64
_STAGE_MIN_ROWS = 16_384
# Intermediate stages only have to hand a good start to the next one, so they get few iterations.
_STAGE_ITERS = 4
# Each stage multiplies the rows by this.
_STAGE_GROWTH = 2
# Fit samples larger than twice this are replaced by a lightweight coreset of this many rows.
_CORE_MIN_ROWS = 1 << 16
_CORE_ROWS_PER_CENTROID = 1024
# Plain Lloyd iterations on the whole fit sample after a coreset fit.
_POLISH_ITERS = 1
# A working set followed by a polish stops at this multiple of ``tol``: near the end of its run, one
# full-sample pass lowers the inertia more than the same number of rows spent on further working-set
# iterations (whose gains shrink geometrically while their sampling error stays).
_POLISHED_TOL_FACTOR = 3.0
# Lloyd runs on at most this many rows build the row side of the distance GEMM once.
_PREPARED_MAX_ROWS = 1 << 20
# Over-relaxation of the working-set Lloyd steps (1 = plain Lloyd; steps stay safe below 2).
_OVERRELAX = 1.8
# Share of the previous step carried into the next one (heavy-ball momentum) on the working set,
# for stages of at least _MOMENTUM_MIN_ROWS rows: on a few thousand rows Lloyd converges in a few
# steps anyway, and momentum would only change which local optimum it lands in.
_MOMENTUM = 0.8
_MOMENTUM_MIN_ROWS = 1 << 14


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32.
        labels: ``(n,)`` int64, index of each vector's nearest centroid.
        inertia: weighted sum of squared distances of all n vectors to their centroid.
        iterations: Lloyd iterations run, summed over the working-set stages and the polish.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


def kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with 2 + ln k local trials per step).

    Args:
        x: ``(n, d)`` float32, n >= k.
        k: number of centroids.
        generator: seeded CPU generator.
        weights: optional ``(n, d)`` element weights.
        mass: optional ``(n,)`` row weights (a row of mass 2 counts as two copies of it): they
            scale both the D^2 sampling law and the cost that picks the best trial.
    Returns:
        ``(k, d)`` float32 initial centroids, rows of ``x``.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    mass64 = None if mass is None else mass.double()
    first = int(torch.randint(n, (1,), generator=generator)) if mass is None else \
        int(torch.multinomial(mass64.cpu(), 1, generator=generator))
    centers = [first]
    # Without element weights the row norms are computed once, not at every step (same formula and
    # values as pairwise_sqdist).
    # Distances are laid out (trials, n), so that every reduction runs along contiguous rows.
    x_sq = None if weights is not None else (x * x).sum(1)

    def dist_to(idx: torch.Tensor) -> torch.Tensor:
        if x_sq is None:
            return pairwise_sqdist(x, x[idx], weights).T.double()
        return torch.addmm(x_sq[None, :], x[idx], x.T, alpha=-2.0).add_(x_sq[idx][:, None]).clamp_min_(0.0).double()

    closest = dist_to(torch.tensor([first], device=x.device)).squeeze(0)
    for _ in range(1, k):
        law = closest if mass64 is None else closest * mass64
        total = float(law.sum())
        if total <= 0.0:
            # Fewer distinct vectors than k: every remaining choice is a duplicate, take any.
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            u = torch.rand(trials, generator=generator, dtype=torch.float64) * total
            cand = torch.searchsorted(torch.cumsum(law, 0).cpu(), u).clamp_(max=n - 1)
        cand = cand.to(x.device)
        new_closest = torch.minimum(closest[None, :], dist_to(cand))  # (trials, n)
        cost = new_closest.sum(1) if mass64 is None else new_closest @ mass64
        best = int(torch.argmin(cost))
        centers.append(int(cand[best]))
        closest = new_closest[best]
    return x[torch.tensor(centers, device=x.device)].to(torch.float32).clone()


def _reseed_empty(
    x: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor, dists: torch.Tensor
) -> torch.Tensor:
    """Move each empty centroid onto one of the points farthest from their centroid (deterministic)."""
    idx = torch.nonzero(empty).flatten()
    far = torch.topk(dists, idx.numel(), sorted=True).indices
    centroids = centroids.clone()
    centroids[idx] = x[far].to(torch.float32)
    return centroids


def sample_rows(n: int, m: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted indices of a seeded uniform sample of ``m`` of ``n`` rows (CPU int64), or ``None``
    when ``m`` is ``None`` or ``m >= n`` (take every row).

    Streaming callers draw the same indices over a concatenation they never materialise.
    """
    if m is None or n <= m:
        return None
    return torch.randperm(n, generator=generator)[:m].sort().values


def stage_sizes(n: int, k: int) -> list[int]:
    """Rows used by each Lloyd stage: doubling from ``max(64 k, 16384)`` up to ``n`` (last = n)."""
    size = max(_STAGE_ROWS_PER_CENTROID * k, _STAGE_MIN_ROWS)
    sizes = []
    while size < n:
        sizes.append(size)
        size *= _STAGE_GROWTH
    return sizes + [n]


def _lloyd(
    x: torch.Tensor,
    w: torch.Tensor | None,
    centroids: torch.Tensor,
    max_iters: int,
    tol: float,
    mass: torch.Tensor | None = None,
    omega: float = 1.0,
    momentum: float = 0.0,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Lloyd iterations on all rows of ``x`` from ``centroids``.

    With ``omega > 1`` each step is over-relaxed, and with ``momentum > 0`` it carries on part of
    the previous step (heavy ball): ``c' = c + omega (mean - c) + momentum (c - c_previous)``.
    Lloyd's steps shrink geometrically along the slow directions of heavy-tailed data; overshooting
    them, and letting steps build up while a growing sample drags the centroids along, reaches a
    lower inertia in the same work (ResNet-50's blocks, K=256, five seeds: 372.65 on average with
    momentum, 373.81 without). If an accelerated step raises the inertia, the rest of the run falls
    back to plain steps (which never raise it). The centroids returned are plain means of the last
    assignment.

    Returns:
        ``(centroids, iterations, labels of the last assignment)``.
    """
    prev = math.inf
    it = 0
    labels = torch.empty(0, dtype=torch.int64)
    previous = None
    # The row side is built once for many passes over a working set; for a few passes over a large
    # fit sample, rebuilding it chunk by chunk in cache is cheaper than faulting in a fresh buffer.
    prepared = prepare_rows(x, w) if max_iters > 4 and x.shape[0] <= _PREPARED_MAX_ROWS else None
    for it in range(1, max_iters + 1):
        labels, dists, num, den = _sweep(x, centroids, w, accumulate=True, mass=mass, prepared=prepared)
        d = dists.double() if mass is None else dists.double() * mass.double()
        inertia = float(d.sum())
        if inertia > prev:
            omega, momentum = 1.0, 0.0
        empty = den.sum(1) == 0
        means = torch.where(den > 0, num / den.clamp_min(1e-300), centroids.double()).float()
        if bool(empty.any()):
            means = _reseed_empty(x, means, empty, dists)
        if (prev < math.inf and abs(prev - inertia) <= tol * max(prev, 1e-30)) or it == max_iters:
            return means, it, labels
        if omega == 1.0 and momentum == 0.0:
            previous, centroids = centroids, means
        else:
            step = omega * (means - centroids)
            if momentum > 0.0 and previous is not None:
                step += momentum * (centroids - previous)
            previous, centroids = centroids, centroids + step
        if bool(empty.any()):
            # A reseeded centroid jumps: it starts afresh, without overshoot or momentum.
            centroids[empty] = means[empty]
            previous = torch.where(empty[:, None], means, previous)
        prev = inertia
    return centroids, it, labels


def fit_centroids(
    xf: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    init: str = "k-means++",
    max_iters: int = 100,
    tol: float = 1e-4,
    init_points: int | None = None,
    weights: torch.Tensor | None = None,
    progress: Progress | None = None,
    working_points: int | None = None,
    polish_iters: int = _POLISH_ITERS,
) -> tuple[torch.Tensor, int]:
    """Fit ``k`` centroids on the rows of ``xf`` (the fit sample).

    When the fit sample is much larger than the working set (``working_points`` rows), the
    working set is a lightweight coreset of it (:func:`legonet.ops.coreset.lightweight_coreset`:
    far-out rows drawn more often, weighted down in proportion); otherwise it is the fit sample
    itself, shuffled. Then: k-means++ seeding on a prefix of the working set, accelerated Lloyd on
    growing prefixes of it, and, after a coreset, up to ``polish_iters`` plain Lloyd iterations on
    the whole fit sample (each one full pass), which remove what is left of the sampling error.
    The working set then stops at ``3 tol``: near the end of its run, a full-sample pass lowers the
    inertia more than as many rows of further working-set iterations.

    Args:
        xf: ``(m, d)`` float32 fit sample, ``m >= k``.
        k: number of centroids.
        generator: seeded CPU generator (its state advances).
        init, max_iters, tol, init_points, weights: as in :func:`kmeans`.
        progress: optional ``progress("fit", stages_done, stages)`` callback.
        working_points: coreset size (default ``max(65536, 1024 k)``).
        polish_iters: cap on the full-sample Lloyd iterations after a coreset fit.
    Returns:
        ``(k, d)`` float32 centroids on ``xf.device`` and the number of Lloyd iterations run
        (working-set stages plus full-sample polish).
    """
    nf = xf.shape[0]
    dev = xf.device
    # scalars: exact Lloyd on the whole fit sample (legonet.ops.kmeans1d), no working set needed
    scalar = xf.shape[1] == 1
    m_core = working_points if working_points is not None else max(_CORE_MIN_ROWS, _CORE_ROWS_PER_CENTROID * k)
    coreset = not scalar and nf > 2 * m_core
    if coreset:
        idx, mass = lightweight_coreset(xf, m_core, generator, weights)
        xs = xf[idx]
        ws = None if weights is None else weights[idx]
        if ws is not None:
            # A row weight scales every element weight of the row (argmin unchanged, means weighted).
            ws, mass = ws * mass[:, None], None
    elif not scalar and nf > max(_STAGE_ROWS_PER_CENTROID * k, _STAGE_MIN_ROWS):
        # Stages are prefixes of one shuffle, so each stage holds the previous one.
        order = torch.randperm(nf, generator=generator).to(dev)
        xs, ws, mass = xf[order], None if weights is None else weights[order], None
    else:
        xs, ws, mass = xf, weights, None
    ns = xs.shape[0]
    sizes = [] if scalar else stage_sizes(ns, k)
    steps = 2 if scalar else len(sizes) + 1 + (1 if coreset and polish_iters > 0 else 0)
    if progress is not None:
        progress("fit", 0, steps)
    m_init = min(ns, init_points if init_points is not None else max(50 * k, 10_000))
    if init == "random":
        centroids = xf[torch.randperm(nf, generator=generator)[:k].to(dev)].clone()
    elif xs is not xf:
        # The working set is in random order (draw order or a shuffle): its prefix is a sample.
        centroids = kmeans_plusplus(xs[:m_init], k, generator, None if ws is None else ws[:m_init],
                                    None if mass is None else mass[:m_init])
    else:
        init_idx = sample_rows(ns, m_init, generator)
        xi = xs if init_idx is None else xs[init_idx.to(dev)]
        wi = ws if (ws is None or init_idx is None) else ws[init_idx.to(dev)]
        centroids = kmeans_plusplus(xi, k, generator, wi)
    if progress is not None:
        progress("fit", 1, steps)
    if scalar:
        centroids, total, labels = lloyd_1d(xf, weights, centroids, max_iters, tol)
        if progress is not None:
            progress("fit", steps, steps)
        return snap_uniform_clusters(xf, labels, centroids), total
    total = 0
    polish = coreset and polish_iters > 0
    stage_tol = tol * _POLISHED_TOL_FACTOR if polish else tol
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        iters = max_iters if last else min(max_iters, _STAGE_ITERS)
        centroids, it, labels = _lloyd(xs[:size], None if ws is None else ws[:size], centroids, iters, stage_tol,
                                       None if mass is None else mass[:size], _OVERRELAX,
                                       _MOMENTUM if size >= _MOMENTUM_MIN_ROWS else 0.0)
        total += it
        if progress is not None:
            progress("fit", i + 2, steps)
    rows = xs
    if polish:
        centroids, it, labels = _lloyd(xf, weights, centroids, polish_iters, tol)
        total += it
        rows = xf
        if progress is not None:
            progress("fit", steps, steps)
    # Floating-point means can miss the value they average in the last bit: a centroid whose members
    # (in the last Lloyd assignment, whose means these are) are all identical is set to exactly that
    # value, so reconstruction is exact wherever the data allows it.
    return snap_uniform_clusters(rows, labels, centroids), total


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    init: str = "k-means++",
    max_iters: int = 100,
    tol: float = 1e-4,
    max_fit_points: int | None = 1 << 21,
    init_points: int | None = None,
    weights: torch.Tensor | None = None,
    progress: Progress | None = None,
    working_points: int | None = None,
    polish_iters: int = _POLISH_ITERS,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` centroids.

    Args:
        x: ``(n, d)`` float vectors, any device.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of every random choice; equal seeds give identical results on one device.
        init: ``"k-means++"`` (greedy) or ``"random"`` (k distinct random rows).
        max_iters: cap on Lloyd iterations of the last stage (earlier stages run at most 4).
        tol: a stage stops once the relative change in inertia falls below it.
        max_fit_points: fit on a uniform sample of at most this many rows (``None``: all rows).
        init_points: seed on a sample of at most this many rows (default ``max(50*k, 10000)``).
        weights: optional ``(n, d)`` non-negative element weights.
        progress: optional ``progress(task, done, total)`` callback (``"fit"`` then ``"assign"``).
        working_points: size of the lightweight-coreset working set (default ``max(65536, 1024 k)``;
            used when the fit sample holds more than twice as many rows).
        polish_iters: cap on the plain Lloyd iterations over the whole fit sample after a coreset.
    Returns:
        :class:`KMeansResult` with labels for all ``n`` rows.
    """
    if x.ndim != 2:
        raise ConfigError(f"k-means needs a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"number of clusters K={k} must be between 1 and the number of blocks ({n})")
    if weights is not None and weights.shape != x.shape:
        raise ConfigError(f"weights shape {tuple(weights.shape)} does not match data {tuple(x.shape)}")
    if init not in ("k-means++", "random"):
        raise ConfigError(f"unknown k-means init {init!r}; use 'k-means++' or 'random'")
    if working_points is not None and working_points < k:
        raise ConfigError(f"working_points={working_points} must be at least K={k}")
    if polish_iters < 0:
        raise ConfigError(f"polish_iters must be >= 0, got {polish_iters}")
    gen = torch.Generator().manual_seed(int(seed))
    x = x.to(torch.float32)
    fit_idx = sample_rows(n, max_fit_points, gen)
    xf = x if fit_idx is None else x[fit_idx.to(x.device)]
    wf = weights if (weights is None or fit_idx is None) else weights[fit_idx.to(x.device)]
    centroids, iters = fit_centroids(xf, k, gen, init=init, max_iters=max_iters, tol=tol,
                                     init_points=init_points, weights=wf, progress=progress,
                                     working_points=working_points, polish_iters=polish_iters)
    labels, dists = assign(x, centroids, weights, progress=progress)
    return KMeansResult(centroids, labels, float(dists.sum(dtype=torch.float64)), iters)
