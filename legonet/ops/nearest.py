"""Nearest-centroid search for many short vectors: the inner loop of every k-means pass.

Pure functions. A pass goes through the rows a block at a time and, inside a block, a chunk at a
time: each chunk is one GEMM that yields the squared distances directly (the norms ride along as
extra columns) and one integer reduction over the centroids (packed keys: nearest centroid and
distance in one int32). Per block, labels are decoded and the sums for the Lloyd update gathered.
The GEMM does most of the work (about 60 % of a K = 256 pass); the rest is three passes over its
output, kept in cache. Assignment is row-wise, bit for bit: a row's label and distance do not depend
on the other rows (chunks have a width fixed by ``(k, d)``), so a checkpoint can be assigned shard by
shard with :func:`assign` alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Distances are computed a chunk of rows at a time: about 1 MiB of float32 distances per chunk stays
# in a core's L2 cache (1-2 MiB on current x86 cores) through the three passes that reduce it, and
# keeps memory flat whatever n and k are.
_CHUNK_ELEMENTS = 1 << 18
# ... and at most this many rows, which bounds the scratch buffers of small-K sweeps.
_MAX_CHUNK_ROWS = 1 << 14
# Labels are decoded and the Lloyd sums gathered a block of this many rows at a time (a multiple of
# the chunk): a few operations per block instead of per chunk, float32 sums over at most this many rows.
_BLOCK_ROWS = 1 << 14
# Up to this many index bits, the argmin is taken on packed keys (see _chunk_keys).
_PACKED_MAX_BITS = 8
# From this many centroids on, distances are laid out (rows, k) rather than (k, rows) (see _chunk_keys).
_ROW_MAJOR_MIN_K = 64

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: ``task`` is ``"fit"`` or ``"assign"``; ``done <= total``."""


def _chunk_rows(k: int, d: int) -> int:
    """Rows per chunk: a function of ``(k, d)`` only, never of n (see _sweep)."""
    # A multiple of 64 rows, so that no row lands in a partial (edge) tile of the GEMM kernel, whose
    # rounding may differ from the full tiles'.
    return max(64, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(k, d + 2)) // 64 * 64)


def _block_rows(step: int) -> int:
    """Rows per block: a whole number of chunks, about ``_BLOCK_ROWS``."""
    return max(step, _BLOCK_ROWS // step * step)


def _centroid_side(c: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Centroid half of the one matrix product that gives every squared distance (see _chunk_keys)."""
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


def _chunk_keys(
    rows: torch.Tensor,
    cside: torch.Tensor,
    buf: torch.Tensor,
    iota: torch.Tensor,
    high: torch.Tensor,
    out: torch.Tensor,
    row_major: bool,
) -> None:
    """Packed keys (nearest centroid and squared distance in one int32) of one chunk of rows.

    One GEMM of ``[x, |x|^2, 1]`` by ``[-2c, 1, |c|^2]`` gives the distance matrix itself
    (``|x - c|^2``; with element weights, ``[w, w x, sum w x^2] . [c^2, -2c, 1] = sum_d w (x - c)^2``).
    It is laid out ``(m, k)`` (``row_major``) for large K, where the reduction along contiguous
    rows of centroids is fastest, and ``(k, m)`` for small K, where reducing element-wise across
    rows vectorises better than along short rows.

    The argmin is taken on packed keys: a float32's bit pattern read as int32 orders like the float
    (negatives, i.e. rounding below zero, sort first), so replacing its ``ceil(log2 k)`` lowest
    mantissa bits by the centroid index and taking the integer minimum gives the minimum and its
    index in one plain ``amin`` (several times faster than ``min(dim)``, which must track indices).
    Distances closer than ``2**-15`` relative count as ties, broken towards the lower index, and the
    distance decoded from the key is truncated by at most that much: below the rounding error of
    the expansion itself.

    Args:
        rows: ``(m, D)`` row sides, exactly the chunk width (every chunk runs one GEMM of the same
            shape, see _sweep).
        cside: ``(k, D)`` from :func:`_centroid_side`.
        buf: ``(m, k)`` (``row_major``) or ``(k, m)`` float32 scratch space.
        iota: centroid indices, int32, ``(1, k)`` (``row_major``) or ``(k, 1)``.
        high: 0-dim int32 mask of the distance bits, ``~(2**ceil(log2 k) - 1)`` (a tensor, not a
            Python int, which would be wrapped into a new tensor at every call).
        out: ``(m,)`` int32, receives the keys.
        row_major: the layout of ``buf``.
    """
    if row_major:
        keys = torch.mm(rows, cside.T, out=buf).view(torch.int32)
        torch.amin(keys.bitwise_and_(high).bitwise_or_(iota), 1, out=out)
    else:
        keys = torch.mm(cside, rows.T, out=buf).view(torch.int32)
        torch.amin(keys.bitwise_and_(high).bitwise_or_(iota), 0, out=out)


def _decode_keys(keys: torch.Tensor, low: int, labels: torch.Tensor, dists: torch.Tensor) -> None:
    """Split packed keys ``(m,)`` into ``labels (m,)`` int64 and (unclamped) ``dists (m,)`` float32."""
    labels.copy_(keys & low)
    torch.bitwise_and(keys, ~low, out=dists.view(torch.int32))


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

    Rows go a block at a time (row side built, labels decoded and sums gathered once per block) and,
    inside a block, a chunk at a time through one GEMM and one reduction. Sums are taken per block in
    float32 and added up in float64, so rounding error is bounded by the block size, not by n.

    Returns:
        ``labels (n,)`` int64, ``dists (n,)`` float32 squared distances, and with ``accumulate``
        ``num (k, d)`` float64 (weighted) sums of the members and ``den`` float64 member weights,
        ``(k, 1)`` (``(k, d)`` with element weights); ``None, None`` without.
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
    block = _block_rows(step)
    bits = max(1, (k - 1).bit_length())
    packed, low = bits <= _PACKED_MAX_BITS, (1 << bits) - 1
    high = torch.tensor(~low, dtype=torch.int32, device=dev)
    # Scratch buffers are reused by every block and chunk.
    rows = torch.empty(block, cside.shape[1], dtype=torch.float32, device=dev) if prepared is None else None
    # Distances (rows, k) for large K (reduced along contiguous centroids), else (k, rows).
    row_major = k >= _ROW_MAJOR_MIN_K or not packed
    buf = torch.empty((step, k) if row_major else (k, step), dtype=torch.float32, device=dev)
    keys = torch.empty(block, dtype=torch.int32, device=dev) if packed else None
    iota = torch.arange(k, dtype=torch.int32, device=dev)
    iota = iota[None, :] if row_major else iota[:, None]
    sums = torch.empty(k, d, dtype=torch.float32, device=dev) if accumulate else None
    for s in range(0, n, block):
        e = min(s + block, n)
        xb = x[s:e].to(torch.float32)
        wb = None if w is None else w[s:e].to(torch.float32)
        rb = _row_side(xb, wb, rows) if prepared is None else prepared[s:e]
        for t in range(0, e - s, step):
            rc = rb[t : t + step]
            if rc.shape[0] < step:
                # Every chunk runs one GEMM of the same shape (the last one padded with zero rows): a
                # row's distances must not depend on how many rows share its chunk (BLAS picks other
                # kernels, with other rounding, for other shapes, e.g. a matrix-vector product for a
                # single row), so that rows assigned alone, shard by shard, get exactly the labels
                # they get together.
                rc = torch.cat([rc, rc.new_zeros(step - rc.shape[0], rc.shape[1])])
            if packed:
                _chunk_keys(rc, cside, buf, iota, high, keys[t : t + step], row_major)
            else:
                hi = min(s + t + step, e)
                _chunk_nearest_wide(rc, cside, buf, labels[s + t : hi], dists[s + t : hi])
        if packed:
            _decode_keys(keys[: e - s], low, labels[s:e], dists[s:e])
        if accumulate:
            lab = labels[s:e]
            mb = None if mass is None else mass[s:e].to(torch.float32)
            if wb is None:
                num += sums.zero_().index_add_(0, lab, xb if mb is None else xb * mb[:, None])
                den += torch.bincount(lab, weights=mb, minlength=k)[:, None]
            else:
                wm = wb if mb is None else wb * mb[:, None]
                num += sums.zero_().index_add_(0, lab, wm * xb)
                den += sums.zero_().index_add_(0, lab, wm)
        if progress is not None:
            progress("assign", e, n)
    return labels, dists.clamp_min_(0.0), num, den


def _chunk_nearest_wide(
    rows: torch.Tensor, cside: torch.Tensor, buf: torch.Tensor, labels: torch.Tensor, dists: torch.Tensor
) -> None:
    """Nearest centroid of one chunk for ``k > 256`` (too many index bits to pack into a key).

    The distances are laid out ``(rows, k)`` so that ``min`` reduces along contiguous memory (4.4x
    faster than ``min(dim=0)`` on a ``(2048, 8192)`` matrix here); same scratch memory. Writes the
    first ``labels.numel()`` rows' labels and distances.
    """
    m, k = rows.shape[0], cside.shape[0]
    part = torch.mm(rows, cside.T, out=buf.view(-1)[: m * k].view(m, k))
    dmin, amin = part[: labels.numel()].min(dim=1)
    labels.copy_(amin)
    dists.copy_(dmin)


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
