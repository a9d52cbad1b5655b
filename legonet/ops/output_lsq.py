"""Least-squares fit of a clustered tensor to its layer's outputs, indices fixed.

A weight ``W`` viewed as ``(rows, cols)`` (see :mod:`legonet.ops.tiling`) multiplies inputs ``x``
whose second-moment matrix is ``H = E[x x^T]`` ``(cols, cols)``. The output error of an
approximation ``W_hat`` is ``E|(W - W_hat) x|^2 = sum_r (w_r - w_hat_r) H (w_r - w_hat_r)^T``:
unlike the weight error, it does not care about errors along directions the inputs never take.

With ``w_hat_r = g_r * q_r(C)`` (codebook ``C``, block indices fixed, row gains ``g``) that error is
quadratic in ``C`` for fixed gains (solved here by conjugate gradients) and in each ``g_r`` for a
fixed codebook (solved in closed form). Each step is an exact or a checked minimisation, so
alternating them never increases the error.

Rows are weighted by ``rho_r = 1 / (w_r H w_r^T)``: every output channel's *relative* error counts
alike, as for a layer followed by a normalisation that rescales channels (and as in target mode's
distortion estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from legonet.ops.tiling import Tiling, tile, untile


@dataclass(frozen=True)
class Member:
    """One tensor that indexes a codebook, with what its output error needs.

    Attributes:
        weight: ``(rows, cols)`` float32, the original weight's 2-D view.
        cov: ``(cols, cols)`` float32 input second-moment matrix ``H`` (damped by the caller).
        indices: ``(num_blocks,)`` int64 block indices in tiling order.
        tiling: the tensor's tiling.
        gains: ``(rows,)`` float32 row gains (all ones for tensors without gains).
    """

    weight: torch.Tensor
    cov: torch.Tensor
    indices: torch.Tensor
    tiling: Tiling
    gains: torch.Tensor


def shapes(codebook: torch.Tensor, member: Member) -> torch.Tensor:
    """``(rows, cols)`` reconstruction of ``member`` with unit gains: ``q_r(C)`` for every row."""
    t = member.tiling
    return untile(codebook[member.indices], t).reshape(t.rows, t.cols)


def row_weights(weight: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` float32 ``1 / (w_r H w_r^T)``; rows with no output energy get weight 0."""
    energy = ((weight @ cov) * weight).sum(1)
    return torch.where(energy > 0, 1.0 / energy.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(energy))


def output_error(member: Member, codebook: torch.Tensor) -> tuple[float, float]:
    """``(sum_r rho_r e_r H e_r^T, number of rows with weight > 0)`` for the reconstruction of ``member``.

    Divided by the count it is the mean relative output error of the rows (0 = exact, 1 = as bad as
    outputting zero).
    """
    w = member.weight
    rho = row_weights(w, member.cov)
    err = w - member.gains[:, None] * shapes(codebook, member)
    per_row = ((err @ member.cov) * err).sum(1)
    return float((rho.double() * per_row.double()).sum()), float((rho > 0).sum())


def optimal_gains(member: Member, codebook: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows,)`` gains minimising each row's output error for ``codebook``: ``<w, q>_H / <q, q>_H``.

    A row whose best gain is not positive (or whose shape is zero) keeps its current gain: gains
    are stored as positive numbers. ``floor`` (optional ``(rows,)``) is a lower bound per row.
    """
    q = shapes(codebook, member)
    qh = q @ member.cov
    num = (qh * member.weight).sum(1)
    den = (qh * q).sum(1)
    ok = (den > 0) & (num > 0)
    g = torch.where(ok, num / den.clamp(min=torch.finfo(torch.float32).tiny), member.gains)
    return g if floor is None else torch.maximum(g, floor)


def fit_codebook(codebook: torch.Tensor, members: Sequence[Member], iters: int = 20) -> torch.Tensor:
    """``(K, d)`` codebook minimising ``sum over members and rows of rho_r e_r H e_r^T``, indices
    and gains fixed, by ``iters`` conjugate-gradient steps from ``codebook``.

    The normal equations are never formed: each step costs one ``(rows, cols) @ (cols, cols)``
    product per member. Returns ``codebook`` itself if the steps did not lower the error (a
    guard against round-off on ill-conditioned ``H``).
    """
    k, d = codebook.shape
    rhos = [row_weights(m.weight, m.cov) for m in members]

    def scatter(grad: torch.Tensor, m: Member) -> torch.Tensor:
        out = torch.zeros(k, d, dtype=torch.float64)
        out.index_add_(0, m.indices, tile(grad.reshape(m.tiling.shape), m.tiling.block).double())
        return out

    def normal(c: torch.Tensor) -> torch.Tensor:  # A c, A = the quadratic form's matrix
        c32 = c.float()
        return sum(scatter((rho * m.gains)[:, None] * ((m.gains[:, None] * shapes(c32, m)) @ m.cov), m)
                   for m, rho in zip(members, rhos))

    rhs = sum(scatter((rho * m.gains)[:, None] * (m.weight @ m.cov), m) for m, rho in zip(members, rhos))
    x = codebook.double().clone()
    r = rhs - normal(x)
    p = r.clone()
    rs = float((r * r).sum())
    for _ in range(iters):
        if rs <= 1e-30:
            break
        ap = normal(p)
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rs / pap
        x += alpha * p
        r -= alpha * ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    fitted = x.float()
    before = sum(output_error(m, codebook)[0] for m in members)
    after = sum(output_error(m, fitted)[0] for m in members)
    return fitted if after < before else codebook


def gain_fitted_errors(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` relative output error of each row of ``approx`` after its best positive gain.

    ``1 - <w, q>_H^2 / (<q, q>_H <w, w>_H)`` for ``<w, q>_H > 0``, else 1 (the best positive gain is
    then 0); rows of ``weight`` with no output energy get 0. Scale-free in both arguments.

    Args:
        weight: ``(rows, cols)`` original rows.
        approx: ``(rows, cols)`` reconstructed rows, any gains.
        cov: ``(cols, cols)`` input second moments.
    """
    qh = approx @ cov
    wq = (qh * weight).sum(1)
    qq = (qh * approx).sum(1)
    ww = ((weight @ cov) * weight).sum(1)
    tiny = torch.finfo(torch.float32).tiny
    explained = torch.where((wq > 0) & (qq > 0), wq.square() / (qq * ww).clamp(min=tiny), torch.zeros_like(wq))
    return torch.where(ww > 0, (1 - explained).clamp(0, 1), torch.zeros_like(ww))
