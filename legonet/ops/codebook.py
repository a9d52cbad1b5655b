"""Codebook post-processing shared by every clustering path."""

from __future__ import annotations

import torch


def snap_uniform_clusters(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Set each centroid whose members are all identical to exactly that member.

    Means computed in floating point can differ from the value they average in the last bit; this
    makes reconstruction exact wherever the data allows it (e.g. K >= number of distinct blocks).

    Args:
        x: ``(n, d)`` vectors.
        labels: ``(n,)`` int64 cluster of each vector.
        centroids: ``(k, d)``.
    Returns:
        ``(k, d)`` centroids (a new tensor).
    """
    k, d = centroids.shape
    idx = labels[:, None].expand(-1, d)
    xf = x.to(centroids.dtype)
    lo = torch.full((k, d), float("inf"), dtype=centroids.dtype).scatter_reduce(0, idx, xf, "amin")
    hi = torch.full((k, d), float("-inf"), dtype=centroids.dtype).scatter_reduce(0, idx, xf, "amax")
    uniform = (lo == hi).all(1)
    out = centroids.clone()
    out[uniform] = lo[uniform]
    return out
