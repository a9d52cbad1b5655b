"""k-means for many short vectors (blocks), in PyTorch so that it runs wherever the tensors live.

Pure functions, no module state. Distances are computed by blocked matrix products
(``|x|^2 - 2 x.c + |c|^2``), optionally with per-element weights ``w`` (same shape as ``x``), in
which case the objective is ``sum_i sum_d w_id (x_id - c_{a(i),d})^2``: that serves masked padding,
importance weighting and activation-aware clustering with one engine.

Fitting runs on a seeded uniform sample of at most ``max_fit_points`` vectors; the final assignment
always covers every vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from legonet.errors import ConfigError

# Distances are computed a chunk of rows at a time; about 8 MiB of float32 per chunk keeps memory
# flat whatever n and k are, and stays cache-friendly.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32.
        labels: ``(n,)`` int64, index of each vector's nearest centroid.
        inertia: weighted sum of squared distances of all n vectors to their centroid.
        iterations: Lloyd iterations run on the fitting sample.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


def _chunk_rows(k: int) -> int:
    return max(4096, _CHUNK_ELEMENTS // max(k, 1))


def _nearest(
    x: torch.Tensor, w: torch.Tensor | None, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for one chunk ``x (m, d)`` against ``c (k, d)``.

    Only ``|c|^2 - 2 x.c`` depends on the centroid, so it is one fused matrix product and the
    row term ``|x|^2`` is added to the m minima alone. With weights, ``sum_d w (x - c)^2`` expands to
    ``[w, w*x] @ [c^2, -2c]^T + sum_d w x^2``: still one product.
    """
    if w is None:
        part = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2.0)
        row = (x * x).sum(1)
    else:
        wx = w * x
        part = torch.cat([w, wx], 1) @ torch.cat([c * c, -2.0 * c], 1).T
        row = (wx * x).sum(1)
    dmin, amin = part.min(dim=1)
    return amin, (dmin + row).clamp_min_(0.0)


def pairwise_sqdist(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Squared (weighted) distances ``(n, k)`` between ``x (n, d)`` and ``c (k, d)``."""
    if w is None:
        d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    else:
        wx = w * x
        d = (wx * x).sum(1, keepdim=True) - 2.0 * (wx @ c.T) + w @ (c * c).T
    return d.clamp_min_(0.0)


def _sweep(
    x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None, accumulate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over all rows: labels, distances and (optionally) per-cluster weighted sums.

    Sums are taken per chunk in float32 and added up in float64, so rounding error is bounded by
    the chunk size, not by n.
    """
    n, d = x.shape
    k = c.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    num = torch.zeros(k, d, dtype=torch.float64, device=x.device) if accumulate else None
    den = torch.zeros(k, d if w is not None else 1, dtype=torch.float64, device=x.device) if accumulate else None
    c = c.to(torch.float32)
    step = _chunk_rows(k)
    for s in range(0, n, step):
        xc = x[s : s + step].to(torch.float32)
        wc = None if w is None else w[s : s + step].to(torch.float32)
        lab, dist = _nearest(xc, wc, c)
        labels[s : s + step] = lab
        dists[s : s + step] = dist
        if accumulate:
            if wc is None:
                num += torch.zeros(k, d, device=x.device).index_add_(0, lab, xc).double()
                den += torch.bincount(lab, minlength=k).double()[:, None]
            else:
                num += torch.zeros(k, d, device=x.device).index_add_(0, lab, wc * xc).double()
                den += torch.zeros(k, d, device=x.device).index_add_(0, lab, wc).double()
    return labels, dists, num, den


def assign(
    x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every vector.

    Args:
        x: ``(n, d)`` float.
        centroids: ``(k, d)`` float.
        weights: optional ``(n, d)`` non-negative element weights.
    Returns:
        labels ``(n,)`` int64 and squared distances ``(n,)`` float32.
    """
    labels, dists, _, _ = _sweep(x, centroids, weights, accumulate=False)
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
        d_cand = pairwise_sqdist(x, x[cand], weights).double()  # (n, trials)
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
    far = torch.argsort(dists, descending=True, stable=True)[: idx.numel()]
    centroids = centroids.clone()
    centroids[idx] = x[far].to(torch.float32)
    return centroids


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
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` centroids.

    Args:
        x: ``(n, d)`` float vectors.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of every random choice; equal seeds give identical results on one device.
        init: ``"k-means++"`` (greedy) or ``"random"`` (k distinct random rows).
        max_iters: cap on Lloyd iterations.
        tol: stop once the relative change in inertia falls below it.
        max_fit_points: fit on a uniform sample of at most this many rows (``None``: all rows).
        init_points: seed on a sample of at most this many rows (default ``max(50*k, 10000)``).
        weights: optional ``(n, d)`` non-negative element weights.
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

    def sample(m: int | None) -> torch.Tensor | None:
        if m is None or n <= m:
            return None
        return torch.randperm(n, generator=gen)[:m].sort().values.to(x.device)

    fit_idx = sample(max_fit_points)
    xf = x if fit_idx is None else x[fit_idx]
    wf = weights if (weights is None or fit_idx is None) else weights[fit_idx]

    nf = xf.shape[0]
    m_init = init_points if init_points is not None else max(50 * k, 10_000)
    if init == "random":
        centroids = xf[torch.randperm(nf, generator=gen)[:k].to(x.device)].clone()
    else:
        init_idx = None if nf <= m_init else torch.randperm(nf, generator=gen)[:m_init].sort().values
        xi = xf if init_idx is None else xf[init_idx.to(x.device)]
        wi = wf if (wf is None or init_idx is None) else wf[init_idx.to(x.device)]
        centroids = kmeans_plusplus(xi, k, gen, wi)

    prev = math.inf
    it = 0
    for it in range(1, max_iters + 1):
        labels, dists, num, den = _sweep(xf, centroids, wf, accumulate=True)
        inertia = float(dists.double().sum())
        empty = den.sum(1) == 0
        centroids = torch.where(den > 0, num / den.clamp_min(1e-300), centroids.double()).float()
        if bool(empty.any()):
            centroids = _reseed_empty(xf, centroids, empty, dists)
        if prev < math.inf and abs(prev - inertia) <= tol * max(prev, 1e-30):
            break
        prev = inertia
    labels, dists = assign(x, centroids, weights)
    return KMeansResult(centroids, labels, float(dists.double().sum()), it)
