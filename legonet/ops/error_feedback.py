"""Choosing block indices with error feedback (GPTQ's column sweep, for blocks instead of scalars).

Nearest-centroid assignment makes each block's *weight* error small, one block at a time. What the
next layer sees is the *output* error ``sum_r e_r H e_r^T`` (``H`` the input second-moment matrix,
see :mod:`legonet.ops.output_lsq`), and there the errors of different columns can cancel: after
the blocks of some columns are fixed, the optimal change of the columns not yet fixed is known in
closed form (Frantar et al., GPTQ, 2022; for vector codebooks van Baalen et al., GPTVQ, 2024).
This module sweeps the block-columns left to right; each block-column's blocks take the centroid
that is nearest in the metric of the columns still free, and its error is pushed onto the columns
to the right.

With ``U`` the upper Cholesky factor of ``H^-1`` and ``G`` the ``b_c`` columns of one block-column,
fixing ``W_G`` to ``Q_G`` costs ``|(W_G - Q_G) U_GG^-1|^2`` per row and moves the columns ``R`` to its
right by ``-(W_G - Q_G) U_GG^-1 U_GR``. Rows are independent, so per-row gains (the weights are
clustered as ``W / g``) change nothing but the weight of each row in a block's distance.
"""

from __future__ import annotations

import torch

from legonet.ops.tiling import Tiling

# columns updated together before the rest of the matrix is (GPTQ's lazy batch): same result,
# one large matrix product instead of many thin ones
_LAZY_COLUMNS = 128


def inverse_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` float64 upper-triangular ``U`` with ``U^T U = cov^-1``, for a positive definite ``cov``.

    Raises:
        torch.linalg.LinAlgError: ``cov`` is not positive definite (damp it first).
    """
    h = cov.double()
    h = (h + h.T) / 2  # a float32 product is symmetric only up to rounding; Cholesky reads one triangle
    lower = torch.linalg.cholesky(h)
    inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inv, upper=True)


def assign_with_error_feedback(
    weight: torch.Tensor,
    cov: torch.Tensor,
    codebook: torch.Tensor,
    tiling: Tiling,
    gains: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block indices that minimise the output error, chosen block-column by block-column.

    Args:
        weight: ``(rows, cols)`` original weight (the 2-D view of the tiled tensor).
        cov: ``(cols, cols)`` positive definite input second moments (damped).
        codebook: ``(K, b_r*b_c)`` centroids, in the scale of ``weight / gains``.
        tiling: the tensor's tiling (``tiling.rows == rows``, ``tiling.cols == cols``).
        gains: optional ``(rows,)`` positive row gains: blocks approximate ``weight / gains``.
        row_weights: optional ``(rows,)`` non-negative weight of each row's output error (e.g. the
            inverse of the row's output energy, so that relative errors count alike); with gains,
            the error of row ``r`` in the scale of the codebook counts ``gains[r]^2`` times more.
    Returns:
        ``(num_blocks,)`` int64 indices in tiling order.
    """
    rows, cols = tiling.rows, tiling.cols
    br, bc = tiling.block
    gr, gc = tiling.grid
    if weight.shape != (rows, cols) or cov.shape != (cols, cols) or codebook.shape[1] != br * bc:
        raise ValueError(f"shapes do not match: weight {tuple(weight.shape)}, cov {tuple(cov.shape)}, "
                         f"codebook {tuple(codebook.shape)}, tiling {tiling}")
    g = torch.ones(rows) if gains is None else gains.float()
    a = torch.ones(rows) if row_weights is None else row_weights.float()
    a = a * g.square()
    # padding: zero rows that count for nothing, and columns uncoupled from the real ones
    pr, pc = gr * br, gc * bc
    w = torch.zeros(pr, pc, dtype=torch.float64)
    w[:rows, :cols] = weight.double() / g.double()[:, None]
    a_pad = torch.zeros(pr, dtype=torch.float64)
    a_pad[:rows] = a.double()
    u = torch.eye(pc, dtype=torch.float64)
    u[:cols, :cols] = inverse_cholesky(cov)
    real = (torch.arange(pc) < cols).double()
    cb = codebook.double().reshape(-1, br, bc)  # (K, b_r, b_c)
    a_tiles = a_pad.reshape(gr, br)  # (gr, b_r)
    indices = torch.empty(gr, gc, dtype=torch.long)
    lazy = max(bc, _LAZY_COLUMNS // bc * bc)
    for start in range(0, pc, lazy):
        stop = min(start + lazy, pc)
        err = torch.zeros(pr, stop - start, dtype=torch.float64)  # (W - Q) U_GG^-1 of each block-column
        for c0 in range(start, stop, bc):
            c1 = c0 + bc
            # (b_c, b_c) upper triangular; padded columns are uncoupled (u is the identity there),
            # and zeroing them here keeps them out of the distance
            m = torch.linalg.inv(u[c0:c1, c0:c1]) * real[None, c0:c1]
            x = (w[:, c0:c1] @ m).reshape(gr, br, bc)  # the blocks, in the metric of the free columns
            cm = torch.einsum("krc,cd->krd", cb, m)  # (K, b_r, b_c) centroids in that metric
            cross = (a_tiles[:, :, None] * x).reshape(gr, -1) @ cm.reshape(cm.shape[0], -1).T  # (gr, K)
            norms = a_tiles @ cm.square().sum(2).T  # (gr, K)
            best = (norms - 2 * cross).argmin(1)
            indices[:, c0 // bc] = best
            e = (x - cm[best]).reshape(pr, bc)
            err[:, c0 - start : c1 - start] = e
            if c1 < stop:  # push the error onto the columns of this lazy batch to the right
                w[:, c1:stop] -= e @ u[c0:c1, c1:stop]
        if stop < pc:
            w[:, stop:] -= err @ u[start:stop, stop:]
    return indices.reshape(-1)
