"""Orders of rows that put alike rows next to each other (pure tensor functions).

Block clustering cuts a tensor's 2-D view into blocks of ``b_r`` rows; when the rows sharing a block
are alike (up to sign and scale, which the per-row gains absorb), the block vectors lie closer to a
low-dimensional set and fewer centroids represent them well. :func:`alike_row_order` pairs the
rows, then pairs the pairs, so that every aligned group of 2 and of 4 rows holds alike rows.
"""

from __future__ import annotations

import torch

# rows beyond this are ordered chunk by chunk (the similarity matrix is quadratic in the rows)
_CHUNK = 4096


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    m = m.reshape(m.shape[0], -1).to(torch.float32)
    return m / m.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def pair_alike(x: torch.Tensor) -> list[tuple[int, int]]:
    """Disjoint pairs of the rows of ``x (n, d)`` by mutual best match of ``|cos|``, round by round.

    Each round matches every two free rows that are each other's most alike free row (the most
    alike pair left always is, so a round never matches nothing). Returns ``n // 2`` pairs; with
    ``n`` odd one row is left out (:func:`alike_row_order` puts it last). Deterministic.
    """
    u = _unit_rows(x)
    sim = (u @ u.T).abs()
    sim.fill_diagonal_(-1.0)
    free = torch.arange(u.shape[0])
    pairs: list[tuple[int, int]] = []
    while free.numel() > 1:
        s = sim[free][:, free]
        best = s.argmax(1)
        local = torch.arange(free.numel())
        mutual = (best[best] == local) & (local < best)
        i, j = local[mutual], best[mutual]
        pairs += list(zip(free[i].tolist(), free[j].tolist()))
        keep = torch.ones(free.numel(), dtype=torch.bool)
        keep[i], keep[j] = False, False
        free = free[keep]
    return pairs


def alike_row_order(m: torch.Tensor, group: int = 4) -> torch.Tensor:
    """A permutation of the rows of ``m (n, ...)`` (``(n,)`` int64) whose aligned groups of 2 (and,
    with ``group=4``, of 4) rows are alike up to sign and scale.

    Pairs by :func:`pair_alike` on the rows' directions; then (``group=4``) pairs of pairs on each
    pair's sign-aligned sum. Rows left over keep their relative order at the end. More than 4,096
    rows are ordered in consecutive chunks of 4,096.
    """
    if group not in (2, 4):
        raise ValueError(f"group must be 2 or 4, got {group}")
    n = m.shape[0]
    if n > _CHUNK:
        return torch.cat([s + alike_row_order(m[s : s + _CHUNK], group) for s in range(0, n, _CHUNK)])
    u = _unit_rows(m)
    pairs = pair_alike(u)
    if group == 4 and len(pairs) > 1:
        sums = torch.stack([u[i] + torch.sign((u[i] * u[j]).sum()) * u[j] for i, j in pairs])
        quads = pair_alike(sums)
        paired = {p for ab in quads for p in ab}
        order = [r for a, b in quads for r in (*pairs[a], *pairs[b])]
        order += [r for p, ij in enumerate(pairs) if p not in paired for r in ij]
    else:
        order = [r for ij in pairs for r in ij]
    placed = set(order)
    order += [r for r in range(n) if r not in placed]
    return torch.tensor(order, dtype=torch.int64)
