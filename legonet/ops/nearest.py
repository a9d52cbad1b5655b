"""Nearest-centroid search for many short vectors: the inner loop of every k-means pass.

Pure functions. A pass goes through the rows a chunk at a time; each chunk is one GEMM that yields
the squared distances directly (the norms ride along as extra columns) and one reduction down the
centroid axis. Sums for the Lloyd update are gathered in the same pass. Assignment is row-wise,
bit for bit: a row's label and distance do not depend on the other rows (chunks have a width
fixed by ``(k, d)``), so a checkpoint can be assigned shard by shard with :func:`assign` alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Distances are computed a chunk of rows at a time; about 4 MiB of float32 distances per chunk
# keeps memory flat whatever n and k are and keeps the chunk in cache while it is reduced.
_CHUNK_ELEMENTS = 1 << 20
# ... and at most this many rows, which bounds the scratch buffers of small-K sweeps.
_MAX_CHUNK_ROWS = 1 << 14
# Up to this many index bits, the argmin is taken on packed keys (see _nearest).
_PACKED_MAX_BITS = 8

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: ``task`` is ``"fit"`` or ``"assign"``; ``done <= total``."""


def _chunk_rows(k: int, d: int) -> int:
    """Rows per chunk: a function of ``(k, d)`` only, never of n (see _nearest)."""
    # A multiple of 64 rows, so that no row lands in a partial (edge) tile of the GEMM kernel, whose
    # rounding may differ from the full tiles'.
    return max(64, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(k, d + 2)) // 64 * 64)


def _centroid_side(c: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Centroid half of the one matrix product that gives every squared distance (see _nearest)."""
    k = c.shape[0]
    ones = torch.ones(k, 1, dtype=c.dtype, device=c.device)
    if weighted:
        return torch.cat([c * c, -2.0 * c, ones], 1)
    return torch.cat([-2.0 * c, ones, (c * c).sum(1, keepdim=True)], 1)


def _row_side(x: torch.Tensor, w: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Row half ``(m, d + 2)`` (or ``(m, 2d + 1)`` with weights) of that product, written into ``out``."""
    m, d = x.shape
    out = out[:m]
    if w is None:
        out[:, :d] = x
        # vector_norm is several times faster than (x * x).sum(1) on short rows.
        out[:, d] = torch.linalg.vector_norm(x, dim=1).square_()
        out[:, d + 1] = 1.0
    else:
        wx = torch.mul(w, x, out=out[:, d : 2 * d])
        out[:, :d] = w
        torch.sum(wx * x, 1, out=out[:, 2 * d])
    return out


def prepare_rows(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Row side ``(n, d + 2)`` (``(n, 2d + 1)`` with weights) of every row of ``x (n, d)``."""
    d = x.shape[1]
    out = torch.empty(x.shape[0], 2 * d + 1 if w is not None else d + 2, dtype=torch.float32, device=x.device)
    step = _CHUNK_ELEMENTS // out.shape[1] + 1
    for s in range(0, x.shape[0], step):
        _row_side(x[s : s + step].to(torch.float32), None if w is None else w[s : s + step].to(torch.float32),
                  out[s : s + step])
    return out


def _nearest(
    rows: torch.Tensor, cside: torch.Tensor, buf: torch.Tensor, pad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance for one chunk of rows.

    ``cside (k, D) @ rows (m, D)^T`` is the distance matrix itself, laid out ``(k, m)``:
    ``[-2c, 1, |c|^2] . [x, |x|^2, 1] = |x - c|^2`` (with element weights,
    ``[c^2, -2c, 1] . [w, w x, sum w x^2] = sum_d w (x - c)^2``). One GEMM writes it, and the
    reduction over centroids runs down the columns, element-wise across rows, which vectorises
    better than a short reduction along each row (for ``k > 256``, where the argmin must track
    indices, the transposed layout ``(m, k)`` is used instead: ``min`` along rows is faster there).

    For ``k <= 256`` the argmin is taken on packed keys: a float32's bit pattern read as int32
    orders like the float (negatives, i.e. rounding below zero, sort first), so replacing its
    ``ceil(log2 k)`` lowest mantissa bits by the centroid index and taking the integer minimum
    gives the minimum and its index in one plain ``amin`` (several times faster than
    ``min(dim)``, which must track indices). Distances closer than ``2**-15`` relative count as
    ties, broken towards the lower index, and the returned distance is truncated by at most that
    much: below the rounding error of the expansion itself.

    Args:
        rows: ``(m, D)`` from :func:`_row_side`.
        cside: ``(k, D)`` from :func:`_centroid_side`.
        buf: ``(k, w)`` float32 scratch space, ``w >= m``.
        pad: ``(w, D)`` float32 scratch rows (the tail of a short chunk is left as it is: finite).
    Returns:
        labels ``(m,)`` int64 and squared distances ``(m,)`` float32.
    """
    k, m = cside.shape[0], rows.shape[0]
    # Every chunk runs one GEMM of the same shape (the scratch rows are padded to full width): a row's
    # distances must not depend on how many rows share its chunk (BLAS picks other kernels, with
    # other rounding, for other shapes, e.g. a matrix-vector product for a single row), so that
    # rows assigned alone, shard by shard, get exactly the labels they get together.
    if rows.shape[0] < pad.shape[0]:
        pad[:m] = rows
        rows = pad
    bits = max(1, (k - 1).bit_length())
    if bits > _PACKED_MAX_BITS:
        # Large K: the distances laid out (rows, k) instead, so that min() reduces along contiguous
        # memory (4.4x faster than min(dim=0) on a (2048, 8192) matrix here); same scratch memory.
        part_t = torch.mm(rows, cside.T, out=buf.view(-1)[: rows.shape[0] * k].view(rows.shape[0], k))[:m]
        dmin, amin = part_t.min(dim=1)
        return amin, dmin.clamp_min_(0.0)
    part = torch.mm(cside, rows.T, out=buf)[:, :m]
    low = (1 << bits) - 1
    iota = torch.arange(k, dtype=torch.int32, device=rows.device)[:, None]
    best = part.view(torch.int32).bitwise_and_(~low).bitwise_or_(iota).amin(dim=0)
    return (best & low).long(), (best & ~low).view(torch.float32).clamp_min_(0.0)


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
    mass: torch.Tensor | None = None,
    prepared: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over all rows: labels, distances and (optionally) per-cluster weighted sums.

    ``mass (n,)`` optional row weights: they scale a row's share of the sums (not its distances,
    whose argmin they cannot change). ``prepared``: the row side of every row
    (:func:`prepare_rows`), for callers that sweep the same rows many times.

    Sums are taken per chunk in float32 and added up in float64, so rounding error is bounded by
    the chunk size, not by n. Chunk boundaries never change a row's label or distance: each comes
    from the row's own dot products, computed by a GEMM of one fixed shape (see _nearest).
    """
    n, d = x.shape
    k = c.shape[0]
    dev = x.device
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    dists = torch.empty(n, dtype=torch.float32, device=dev)
    num = torch.zeros(k, d, dtype=torch.float64, device=dev) if accumulate else None
    den = torch.zeros(k, d if w is not None else 1, dtype=torch.float64, device=dev) if accumulate else None
    cside = _centroid_side(c.to(device=dev, dtype=torch.float32).contiguous(), w is not None)
    step = _chunk_rows(k, d)
    # Scratch buffers are reused by every chunk: no allocation per chunk but the outputs.
    rows = torch.zeros(step, cside.shape[1], dtype=torch.float32, device=dev)
    buf = torch.empty(k, step, dtype=torch.float32, device=dev)
    for s in range(0, n, step):
        xc = x[s : s + step].to(torch.float32)
        wc = None if w is None else w[s : s + step].to(torch.float32)
        rc = _row_side(xc, wc, rows) if prepared is None else prepared[s : s + step]
        lab, dist = _nearest(rc, cside, buf, rows)
        labels[s : s + step] = lab
        dists[s : s + step] = dist
        if accumulate:
            mc = None if mass is None else mass[s : s + step].to(torch.float32)
            if wc is None:
                num += torch.zeros(k, d, device=dev).index_add_(0, lab, xc if mc is None else xc * mc[:, None]).double()
                den += torch.bincount(lab, weights=mc, minlength=k).double()[:, None]
            else:
                wm = wc if mc is None else wc * mc[:, None]
                num += torch.zeros(k, d, device=dev).index_add_(0, lab, wm * xc).double()
                den += torch.zeros(k, d, device=dev).index_add_(0, lab, wm).double()
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
    if x.shape[1] == 1 and centroids.shape[0] > 1:
        return _assign_scalars(x, centroids.to(x.device), weights, progress)
    labels, dists, _, _ = _sweep(x, centroids, weights, accumulate=False, progress=progress)
    return labels, dists


def _assign_scalars(x, centroids, weights, progress):
    """Scalars: the nearest centroid by bisection on the midpoints of the sorted centroids.

    ``O(n log k)`` and exact, instead of an ``n x k`` distance pass (a positive weight scales
    every distance of its row alike, so it never changes the nearest centroid). A value on a
    midpoint, or between equal centroids, goes to the lower one in sorted order.
    """
    c_sorted, rank = torch.sort(centroids[:, 0].float(), stable=True)
    mids = (c_sorted[1:] + c_sorted[:-1]) / 2
    v = x[:, 0].float()
    near = torch.bucketize(v, mids)
    labels = rank[near]
    d = (v - c_sorted[near]).square_()
    if weights is not None:
        d = d * weights[:, 0].float()
    if progress is not None:
        progress("assign", x.shape[0], x.shape[0])
    return labels, d
