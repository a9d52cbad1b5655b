"""Importance sampling of rows for k-means: the lightweight coreset of Bachem, Lucic & Krause
("Scalable k-Means Clustering via Lightweight Coresets", KDD 2018).

A uniform sample misses the rare far-out rows that dominate the k-means cost of heavy-tailed data
(network weights: most blocks are near zero, a few are large), so centroids fitted on it are biased
towards the bulk. Drawing row ``i`` with probability ``q_i = 1/(2n) + d_i / (2 sum d)``, where
``d_i`` is its squared distance to the mean, and giving it the weight ``1 / (m q_i)`` keeps every
weighted cost an unbiased estimate of the full one, with a variance bounded for any clustering.

Pure functions; random choices come from the caller's seeded CPU generator.
"""

from __future__ import annotations

import torch

# Rows are reduced this many at a time, so that no (n, d) temporary is ever built.
_CHUNK_ROWS = 1 << 16


def sq_dist_to_mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared (element-weighted) distance ``(n,)`` float64 of each row of ``x (n, d)`` to the
    (weighted) mean row."""
    n = x.shape[0]
    # float32 throughout: this only sets a sampling law, where rounding is harmless.
    if weights is None:
        # |x - mean|^2 = |x|^2 - 2 x.mean + |mean|^2: a norm and two matrix-vector products, much
        # faster than reductions over the short rows (cancellation only blurs the law near the mean).
        x = x.to(torch.float32)
        mean = torch.mv(x.T, torch.full((n,), 1.0 / max(n, 1), device=x.device))
        d2 = torch.linalg.vector_norm(x, dim=1).square_().sub_(torch.mv(x, 2.0 * mean)).add_(mean @ mean)
        return d2.clamp_min_(0.0).double()
    mean = (weights * x).sum(0) / weights.sum(0).clamp_min(1e-30)
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for s in range(0, n, _CHUNK_ROWS):
        diff = x[s : s + _CHUNK_ROWS].to(torch.float32) - mean
        out[s : s + _CHUNK_ROWS] = diff.mul_(diff).mul_(weights[s : s + _CHUNK_ROWS]).sum(1)
    return out


def lightweight_coreset(
    x: torch.Tensor, m: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``m`` rows of ``x (n, d)`` i.i.d. (with replacement) by the lightweight-coreset law.

    Args:
        x: ``(n, d)`` float rows.
        m: number of draws.
        generator: seeded CPU generator (its state advances).
        weights: optional ``(n, d)`` element weights (the distance to the mean is weighted by them).
    Returns:
        ``idx (m,)`` int64 row indices on ``x.device``, in draw order (so every prefix is itself an
        i.i.d. sample), and ``mass (m,)`` float32 row weights ``1 / (n q_i)`` (mean about 1).
    """
    n = x.shape[0]
    d2 = sq_dist_to_mean(x, weights).cpu()
    # q_i = 1/(2n) + d_i / (2 sum d) is proportional to d_i + a with a = mean(d): half uniform, half
    # by squared distance; the uniform half bounds every weight 1/(n q_i) = 2a / (d_i + a) by 2.
    a = float(d2.sum()) / n
    law = d2.add_(a) if a > 0.0 else torch.ones(n, dtype=torch.float64)
    # Inverse-CDF draws: unlike torch.multinomial, no limit on n and no dependence on the device.
    cdf = torch.cumsum(law, 0)
    u = torch.rand(m, generator=generator, dtype=torch.float64) * float(cdf[-1])
    idx = torch.searchsorted(cdf, u).clamp_(max=n - 1)
    mass = (2.0 * a / law[idx]).float() if a > 0.0 else torch.ones(m)
    return idx.to(x.device), mass.to(x.device)
