"""A lean k-means for estimates: plain (weighted) Lloyd iterations on a few thousand vectors.

Target mode estimates the distortion of dozens of (block, K) settings per tensor, each on a sample
of at most a few thousand blocks. The general engine (:mod:`legonet.ops.kmeans`: coresets,
over-relaxation, a polishing pass, chunked packed-key argmins) is built for millions of blocks; on
a small sample its fixed costs dominate. Here every iteration is two matrix products, an argmin
and two scatter-adds. Random seeding from distinct rows, as the estimates always used.
"""

from __future__ import annotations

import torch

from legonet.ops.kmeans1d import lloyd_1d


def nearest(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels (n,), squared distances (n,))`` of each row's nearest centroid under the (weighted)
    distance ``sum_j w_ij (x_ij - c_kj)^2``. The row's own term ``sum_j w_ij x_ij^2`` does not change
    which centroid is nearest: the argmin runs on ``|c|_w^2 - 2 <x, c>_w`` from one fused matrix
    product, and the term is added to the minimum only."""
    x, c = x.float(), centroids.float()
    if weights is None:
        part = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2.0)
        own = (x * x).sum(1)
    else:
        w = weights.float()
        wx = w * x
        part = torch.addmm(w @ (c * c).T, wx, c.T, alpha=-2.0)
        own = (wx * x).sum(1)
    best, labels = part.min(1)
    return labels, (best + own).clamp_min_(0.0)


def quick_kmeans(x: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, iters: int = 12,
                 tol: float = 1e-3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Centroids ``(k, d)`` of ``x (n, d)`` after at most ``iters`` Lloyd iterations from ``k``
    distinct random rows; stops once the relative change of the (weighted) inertia is below ``tol``.

    ``weights``: optional ``(n, d)`` non-negative element weights. A cluster left empty keeps its
    centroid. Scalars (``d = 1``) start from evenly spaced quantiles and go through the exact sorted
    1-D iterations of :func:`legonet.ops.kmeans1d.lloyd_1d`.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of rows ({n})")
    x = x.float()
    if x.shape[1] == 1:
        # scalars: start from the values at evenly spaced ranks, where few 1-D Lloyd iterations end
        # near the optimum (random starts leave some estimates twice others' on alike tensors)
        ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp_(max=n - 1)
        return lloyd_1d(x, weights, torch.sort(x[:, 0]).values[ranks][:, None], iters, tol)[0]
    c = x[torch.randperm(n, generator=generator)[:k]].clone()
    w = None if weights is None else weights.float()
    prev = None
    for _ in range(iters):
        labels, dist = nearest(x, c, w)
        inertia = float(dist.sum())
        idx = labels[:, None].expand_as(x)
        num = torch.zeros_like(c).scatter_add_(0, idx, x if w is None else w * x)
        den = torch.zeros_like(c).scatter_add_(0, idx, torch.ones_like(x) if w is None else w)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        if prev is not None and abs(prev - inertia) <= tol * max(prev, 1e-30):
            break
        prev = inertia
    return c

