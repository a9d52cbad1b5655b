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
    xf = x.to(centroids.dtype)
    # Only clusters whose members agree on their first element can be uniform: find them with 1-D
    # scatters, then check the few rows in them element by element (full (n, d) scatters cost as
    # much as a Lloyd iteration).
    first = xf[:, 0].contiguous()
    lo = torch.full((k,), float("inf"), dtype=xf.dtype, device=xf.device).scatter_reduce(0, labels, first, "amin")
    hi = torch.full((k,), float("-inf"), dtype=xf.dtype, device=xf.device).scatter_reduce(0, labels, first, "amax")
    out = centroids.clone()
    rows = torch.nonzero((lo == hi)[labels]).flatten()
    if rows.numel() == 0:
        return out
    sub, lab = xf[rows], labels[rows]
    idx = lab[:, None].expand(-1, d)
    lo = torch.full((k, d), float("inf"), dtype=xf.dtype, device=xf.device).scatter_reduce(0, idx, sub, "amin")
    hi = torch.full((k, d), float("-inf"), dtype=xf.dtype, device=xf.device).scatter_reduce(0, idx, sub, "amax")
    uniform = (lo == hi).all(1)
    out[uniform] = lo[uniform]
    return out
