"""k-means for many short vectors (blocks), in PyTorch so that it runs wherever the tensors live.

Pure functions, no module state. Distances are computed by blocked matrix products
(``|x|^2 - 2 x.c + |c|^2``), optionally with per-element weights ``w`` (same shape as ``x``), in
which case the objective is ``sum_i sum_d w_id (x_id - c_{a(i),d})^2``: that serves masked padding,
importance weighting and activation-aware clustering with one engine.

The engine is built for millions to billions of short vectors:

1. a seeded uniform *fit sample* of at most ``max_fit_points`` rows is drawn (:func:`sample_rows`);
2. k-means++ seeds the centroids on a smaller sample (``init_points``);
3. Lloyd iterations run on a *growing* prefix of the (shuffled) fit sample: each stage doubles the
   number of rows and starts from the previous stage's centroids, so most iterations are spent on
   small, cheap stages and only the last few touch the whole fit sample; every stage stops early
   once the relative change of inertia falls below ``tol``;
4. one full assignment pass labels every row (:func:`assign`).

Every tensor is created on ``x.device``; random choices come from a seeded CPU generator, so a seed
gives identical results on one device (and equal results up to float rounding across devices).
Assignment is row-wise: the label of a row does not depend on the other rows, so a checkpoint can be
assigned shard by shard (or machine by machine) with :func:`assign` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from legonet.errors import ConfigError
from legonet.ops.codebook import snap_uniform_clusters

# Distances are computed a chunk of rows at a time; about 4 MiB of float32 distances per chunk
# keeps memory flat whatever n and k are and keeps the chunk in cache while it is reduced.
_CHUNK_ELEMENTS = 1 << 20
# Up to this many index bits, the argmin is taken on packed keys (see _nearest).
_PACKED_MAX_BITS = 8
# Smallest stage of the growing-sample Lloyd schedule, in rows per centroid and in rows.
_STAGE_ROWS_PER_CENTROID = 64
_STAGE_MIN_ROWS = 16_384
# Intermediate stages only have to hand a good start to the next one, so they get fewer iterations.
_STAGE_ITERS = 8
# Each stage multiplies the rows by this.
_STAGE_GROWTH = 2

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: ``task`` is ``"fit"`` or ``"assign"``; ``done <= total``."""


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32.
        labels: ``(n,)`` int64, index of each vector's nearest centroid.
        inertia: weighted sum of squared distances of all n vectors to their centroid.
        iterations: Lloyd iterations run, summed over the growing-sample stages.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


def _chunk_rows(k: int) -> int:
    return max(1024, _CHUNK_ELEMENTS // max(k, 1))


def _nearest(
    x: torch.Tensor, w: torch.Tensor | None, c: torch.Tensor, c_sq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for one chunk ``x (m, d)`` against ``c (k, d)``.

    ``|c|^2 - 2 x.c`` is one fused matrix product (with weights, ``sum_d w (x - c)^2`` expands to
    ``[w, w*x] @ [c^2, -2c]^T + sum_d w x^2``: still one product).

    For ``k <= 256`` the argmin is taken on packed keys: a non-negative float32's bit pattern
    orders like the float, so replacing its ``ceil(log2 k)`` lowest mantissa bits by the column
    index and taking the integer minimum gives the minimum and its index in one plain ``amin``
    (several times faster than ``min(dim=1)``, which must track indices). Distances closer than
    ``2**-15`` relative count as ties, broken towards the lower index, and the returned distance is
    truncated by at most that much: below the rounding error of the expansion itself.
    """
    if w is None:
        part = torch.addmm(c_sq[None, :], x, c.T, alpha=-2.0)
        row = (x * x).sum(1)
    else:
        wx = w * x
        part = torch.cat([w, wx], 1) @ torch.cat([c * c, -2.0 * c], 1).T
        row = (wx * x).sum(1)
    k = c.shape[0]
    bits = max(1, (k - 1).bit_length())
    if bits > _PACKED_MAX_BITS:
        dmin, amin = part.min(dim=1)
        return amin, (dmin + row).clamp_min_(0.0)
    low = (1 << bits) - 1
    keys = part.add_(row[:, None]).clamp_min_(0.0).view(torch.int32)
    iota = torch.arange(k, dtype=torch.int32, device=x.device)
    best = keys.bitwise_and_(~low).bitwise_or_(iota).amin(dim=1)
    return (best & low).long(), (best & ~low).view(torch.float32)


def pairwise_sqdist(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Squared (weighted) distances ``(n, k)`` between ``x (n, d)`` and ``c (k, d)``."""
    if w is None:
        d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    else:
        wx = w * x
        d = (wx * x).sum(1, keepdim=True) - 2.0 * (wx @ c.T) + w @ (c * c).T
    return d.clamp_min_(0.0)


def _sweep(
    x: torch.Tensor,
    c: torch.Tensor,
    w: torch.Tensor | None,
    accumulate: bool,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over all rows: labels, distances and (optionally) per-cluster weighted sums.

    Sums are taken per chunk in float32 and added up in float64, so rounding error is bounded by
    the chunk size, not by n. Chunk boundaries never change a row's label: each row's distances
    come from its own dot products only.
    """
    n, d = x.shape
    k = c.shape[0]
    dev = x.device
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    dists = torch.empty(n, dtype=torch.float32, device=dev)
    num = torch.zeros(k, d, dtype=torch.float64, device=dev) if accumulate else None
    den = torch.zeros(k, d if w is not None else 1, dtype=torch.float64, device=dev) if accumulate else None
    c = c.to(device=dev, dtype=torch.float32).contiguous()
    c_sq = (c * c).sum(1)
    step = _chunk_rows(k)
    for s in range(0, n, step):
        xc = x[s : s + step].to(torch.float32)
        wc = None if w is None else w[s : s + step].to(torch.float32)
        lab, dist = _nearest(xc, wc, c, c_sq)
        labels[s : s + step] = lab
        dists[s : s + step] = dist
        if accumulate:
            if wc is None:
                num += torch.zeros(k, d, device=dev).index_add_(0, lab, xc).double()
                den += torch.bincount(lab, minlength=k).double()[:, None]
            else:
                num += torch.zeros(k, d, device=dev).index_add_(0, lab, wc * xc).double()
                den += torch.zeros(k, d, device=dev).index_add_(0, lab, wc).double()
        if progress is not None:
            progress("assign", min(s + step, n), n)
    return labels, dists, num, den


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every vector; a pure function of ``(x, centroids)``.

    Args:
        x: ``(n, d)`` float, any device.
        centroids: ``(k, d)`` float (moved to ``x.device``).
        weights: optional ``(n, d)`` non-negative element weights.
        progress: optional ``progress("assign", rows_done, n)`` callback.
    Returns:
        labels ``(n,)`` int64 and squared distances ``(n,)`` float32, on ``x.device``.
    """
    labels, dists, _, _ = _sweep(x, centroids, weights, accumulate=False, progress=progress)
    return labels, dists


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with 2 + ln k local trials per step).

    Args:
        x: ``(n, d)`` float32, n >= k.
        k: number of centroids.
        generator: seeded CPU generator.
        weights: optional ``(n, d)`` element weights.
    Returns:
        ``(k, d)`` float32 initial centroids, rows of ``x``.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [first]
    closest = pairwise_sqdist(x, x[first : first + 1], weights).squeeze(1).double()
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:
            # Fewer distinct vectors than k: every remaining choice is a duplicate, take any.
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            u = torch.rand(trials, generator=generator, dtype=torch.float64) * total
            cand = torch.searchsorted(torch.cumsum(closest, 0).cpu(), u).clamp_(max=n - 1)
        cand = cand.to(x.device)
        d_cand = pairwise_sqdist(x, x[cand], None if weights is None else weights).double()  # (n, trials)
        new_closest = torch.minimum(closest[:, None], d_cand)
        best = int(torch.argmin(new_closest.sum(0)))
        centers.append(int(cand[best]))
        closest = new_closest[:, best].contiguous()
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
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations on all rows of ``x`` from ``centroids``; returns (centroids, iterations)."""
    prev = math.inf
    it = 0
    for it in range(1, max_iters + 1):
        _, dists, num, den = _sweep(x, centroids, w, accumulate=True)
        inertia = float(dists.sum(dtype=torch.float64))
        empty = den.sum(1) == 0
        centroids = torch.where(den > 0, num / den.clamp_min(1e-300), centroids.double()).float()
        if bool(empty.any()):
            centroids = _reseed_empty(x, centroids, empty, dists)
        if prev < math.inf and abs(prev - inertia) <= tol * max(prev, 1e-30):
            break
        prev = inertia
    return centroids, it


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
) -> tuple[torch.Tensor, int]:
    """Fit ``k`` centroids on the rows of ``xf`` (the fit sample): seeding, then growing-sample Lloyd.

    Args:
        xf: ``(m, d)`` float32 fit sample, ``m >= k``.
        k: number of centroids.
        generator: seeded CPU generator (its state advances).
        init, max_iters, tol, init_points, weights: as in :func:`kmeans`.
        progress: optional ``progress("fit", stages_done, stages)`` callback.
    Returns:
        ``(k, d)`` float32 centroids on ``xf.device`` and the number of Lloyd iterations run.
    """
    nf = xf.shape[0]
    dev = xf.device
    sizes = stage_sizes(nf, k)
    if progress is not None:
        progress("fit", 0, len(sizes) + 1)
    m_init = init_points if init_points is not None else max(50 * k, 10_000)
    if init == "random":
        centroids = xf[torch.randperm(nf, generator=generator)[:k].to(dev)].clone()
    else:
        init_idx = sample_rows(nf, m_init, generator)
        xi = xf if init_idx is None else xf[init_idx.to(dev)]
        wi = weights if (weights is None or init_idx is None) else weights[init_idx.to(dev)]
        centroids = kmeans_plusplus(xi, k, generator, wi)
    if progress is not None:
        progress("fit", 1, len(sizes) + 1)
    # Stages are prefixes of one shuffle, so each stage holds the previous one and no row is copied
    # twice; a single stage needs no shuffle at all.
    if len(sizes) > 1:
        order = torch.randperm(nf, generator=generator).to(dev)
        xs = xf[order]
        ws = None if weights is None else weights[order]
    else:
        xs, ws = xf, weights
    total = 0
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        iters = max_iters if last else min(max_iters, _STAGE_ITERS)
        centroids, it = _lloyd(xs[:size], None if ws is None else ws[:size], centroids, iters, tol)
        total += it
        if progress is not None:
            progress("fit", i + 2, len(sizes) + 1)
    # Floating-point means can miss the value they average in the last bit: a centroid whose sample
    # members are all identical is set to exactly that value (exact reconstruction where possible).
    labels, _ = assign(xf, centroids, weights)
    return snap_uniform_clusters(xf, labels, centroids), total


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    init: str = "k-means++",
    max_iters: int = 100,
    tol: float = 1e-4,
    max_fit_points: int | None = 1 << 20,
    init_points: int | None = None,
    weights: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` centroids.

    Args:
        x: ``(n, d)`` float vectors, any device.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of every random choice; equal seeds give identical results on one device.
        init: ``"k-means++"`` (greedy) or ``"random"`` (k distinct random rows).
        max_iters: cap on Lloyd iterations of the last stage (earlier stages run at most 8).
        tol: a stage stops once the relative change in inertia falls below it.
        max_fit_points: fit on a uniform sample of at most this many rows (``None``: all rows).
        init_points: seed on a sample of at most this many rows (default ``max(50*k, 10000)``).
        weights: optional ``(n, d)`` non-negative element weights.
        progress: optional ``progress(task, done, total)`` callback (``"fit"`` then ``"assign"``).
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
    gen = torch.Generator().manual_seed(int(seed))
    x = x.to(torch.float32)
    fit_idx = sample_rows(n, max_fit_points, gen)
    xf = x if fit_idx is None else x[fit_idx.to(x.device)]
    wf = weights if (weights is None or fit_idx is None) else weights[fit_idx.to(x.device)]
    centroids, iters = fit_centroids(xf, k, gen, init=init, max_iters=max_iters, tol=tol,
                                     init_points=init_points, weights=wf, progress=progress)
    labels, dists = assign(x, centroids, weights, progress=progress)
    return KMeansResult(centroids, labels, float(dists.sum(dtype=torch.float64)), iters)
