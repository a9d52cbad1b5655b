"""Row orders that group alike rows (legonet.ops.grouping)."""

from __future__ import annotations

import pytest
import torch

import legonet.ops.grouping as grouping
from legonet.ops.grouping import alike_row_order, pair_alike


def _clustered_rows(groups: int, size: int, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups * size`` rows, each a random sign and scale times one of ``groups`` directions plus
    a little noise, shuffled; and each row's group."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(groups, d, generator=g)
    label = torch.arange(groups).repeat_interleave(size)
    sign = torch.where(torch.rand(label.numel(), generator=g) < 0.5, -1.0, 1.0)
    scale = torch.exp(torch.randn(label.numel(), generator=g))
    rows = (base[label] + 0.05 * torch.randn(label.numel(), d, generator=g)) * (sign * scale)[:, None]
    shuffle = torch.randperm(label.numel(), generator=g)
    return rows[shuffle], label[shuffle]


@pytest.mark.parametrize("group", [2, 4])
def test_aligned_groups_hold_alike_rows_whatever_their_sign_and_scale(group):
    rows, label = _clustered_rows(groups=6, size=4)
    order = alike_row_order(rows, group=group)
    assert sorted(order.tolist()) == list(range(24))
    grouped = label[order].reshape(-1, group)
    assert bool((grouped == grouped[:, :1]).all())
    # before ordering, the shuffled rows are not grouped so
    assert not bool((label.reshape(-1, group) == label.reshape(-1, group)[:, :1]).all())


def test_pairs_are_disjoint_mutual_best_matches_and_an_odd_row_goes_last():
    rows, label = _clustered_rows(groups=3, size=2, seed=1)
    rows = torch.cat([rows, torch.randn(1, rows.shape[1], generator=torch.Generator().manual_seed(9))])
    pairs = pair_alike(rows)
    assert len(pairs) == 3 and len({r for p in pairs for r in p}) == 6
    assert all(label[i] == label[j] for i, j in pairs)
    order = alike_row_order(rows, group=4)
    assert order[-1] == 6 and sorted(order.tolist()) == list(range(7))
    assert torch.equal(order, alike_row_order(rows, group=4))  # deterministic


def test_many_rows_are_ordered_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(grouping, "_CHUNK", 8)
    rows, label = _clustered_rows(groups=5, size=4, seed=2)
    order = alike_row_order(rows)
    assert sorted(order.tolist()) == list(range(20))
    for s in range(0, 20, 8):  # each chunk's rows stay in that chunk
        assert set(order[s : s + 8].tolist()) == set(range(s, min(s + 8, 20)))


def test_bad_group_and_zero_rows():
    with pytest.raises(ValueError, match="group must be 2 or 4"):
        alike_row_order(torch.randn(8, 3), group=3)
    order = alike_row_order(torch.zeros(6, 4))  # zero rows: no direction, still a permutation
    assert sorted(order.tolist()) == list(range(6))
