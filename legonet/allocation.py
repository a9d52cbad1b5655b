"""Byte budgets of target mode: what one tensor's setting costs, and the allocation of a budget.

A :class:`Choice` is one ``(block, K)`` setting evaluated for one tensor: its bytes (index stream,
codebook and row gains) and its estimated distortion. :func:`allocate` picks one choice per tensor
so that the total fits a budget (a Lagrangian search); :mod:`legonet.target` evaluates the choices
and :mod:`legonet.stream_budget` re-costs them once the real streams are known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from legonet.errors import ConfigError
from legonet.ops import rans
from legonet.ops.bitpack import bits_for, packed_nbytes
from legonet.ops.tiling import make_tiling


@dataclass(frozen=True)
class Choice:
    """One menu entry evaluated for one tensor."""

    block: tuple[int, int]
    clusters: int
    nbytes: int  # index stream (estimated entropy-coded size where smaller than packed) + codebook + row gains
    distortion: float  # relative (weighted) squared error of the normalised weights, or of the outputs
    scale_stat: str = "rms"  # the row gain statistic (see LegoConfig.scale_stat)
    compact: bool = False  # codebook and row gains stored in 8 bits (legonet.compact), not float16


def entry_nbytes(shape: tuple[int, ...], block: tuple[int, int], k: int, compact: bool = False,
                 labels: torch.Tensor | None = None) -> int:
    """Bytes of a tensor's entry: its index stream, codebook and row gains. ``labels``: the
    assignment of a sample of its blocks, whose histogram estimates the entropy-coded stream (which
    the writer uses where smaller than the bit-packed one)."""
    count = make_tiling(shape, block).num_blocks
    stream = packed_nbytes(count, bits_for(k))
    if labels is not None and labels.numel():
        coded = estimated_stream_nbytes(labels, k, count)
        if count <= rans.MAX_SYMBOLS_PER_BYTE * coded:  # the writer's rule: denser streams are bit-packed
            stream = min(stream, coded)
    return stream + side_nbytes(shape, block, k, compact)


def side_nbytes(shape: tuple[int, ...], block: tuple[int, int], k: int, compact: bool) -> int:
    """Bytes of a tensor's codebook and row gains beside its index stream (8-bit where ``compact``)."""
    return (1 if compact else 2) * (k * block[0] * block[1] + shape[0])


def estimated_stream_nbytes(labels: torch.Tensor, k: int, count: int) -> int:
    """Entropy-coded bytes of ``count`` indices estimated from a sample's ``labels``: the sample's
    entropy with the Miller-Madow correction ``(m - 1) / (2 n ln 2)`` bits for ``m`` centroids seen
    in ``n`` labels (the plain estimate is biased low, by about 0.045 bit at K=256 and n=4096)."""
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=k).double()
    n, m = float(counts.sum()), int((counts > 0).sum())
    p = counts[counts > 0] / n
    bits = (-float((p * p.log2()).sum()) + (m - 1) / (2 * n * math.log(2))) * count
    return k + 4 * rans.lanes(count) + math.ceil(bits / 8)


def allocate(tables: Mapping[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """Per tensor, the entry minimising ``distortion + lambda*bytes`` for the smallest lambda that
    fits, then the bytes that lambda leaves unused spent greedily (:func:`_fill`).

    Raises :class:`ConfigError` when even the smallest entries exceed ``budget``.
    """
    smallest = sum(min(c.nbytes for c in t) for t in tables.values())
    if smallest > budget:
        raise ConfigError(f"the target is out of reach: even the smallest settings need {smallest:,} bytes "
                          f"for the clustered tensors, the budget leaves {budget:,}")

    def pick(lam: float) -> dict[str, Choice]:
        return {n: min(t, key=lambda c: (c.distortion + lam * c.nbytes, c.nbytes)) for n, t in tables.items()}

    lo, hi = 0.0, 1.0
    while sum(c.nbytes for c in pick(hi).values()) > budget:
        hi *= 4.0
    if sum(c.nbytes for c in pick(lo).values()) <= budget:
        return pick(lo)
    for _ in range(80):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if sum(c.nbytes for c in pick(mid).values()) <= budget:
            hi = mid
        else:
            lo = mid
    return _fill(tables, pick(hi), budget)


def _fill(tables: Mapping[str, list[Choice]], picked: dict[str, Choice], budget: int) -> dict[str, Choice]:
    """``picked`` with the bytes it leaves below ``budget`` spent: repeatedly, the one change of one
    tensor's entry that fits and lowers the distortion most per byte added.

    The Lagrangian search alone moves whole tensors between settings of the convex hull, so it may
    stop far below the budget when the next step of a large tensor costs more than is left
    (EfficientNet-Lite1 at 8x: 3 % of the budget)."""
    picked = dict(picked)
    free = budget - sum(c.nbytes for c in picked.values())
    while free > 0:
        best, gain = None, 0.0
        for n, entries in tables.items():
            cur = picked[n]
            for c in entries:
                extra = c.nbytes - cur.nbytes
                if c.distortion < cur.distortion and extra <= free:
                    rate = (cur.distortion - c.distortion) / max(extra, 1)
                    if rate > gain:
                        best, gain = (n, c), rate
        if best is None:
            break
        free -= best[1].nbytes - picked[best[0]].nbytes
        picked[best[0]] = best[1]
    return picked
