"""Snapping of uniform clusters onto their exact member value."""

from __future__ import annotations

import torch

from legonet.ops.codebook import snap_uniform_clusters


def test_only_clusters_whose_members_are_all_identical_are_snapped():
    v = torch.tensor([0.1, 0.2, 0.3])
    x = torch.stack([v, v, v,                                    # cluster 0: identical members
                     torch.tensor([0.5, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0]),  # 1: same first element only
                     torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])])  # 2: differ
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    centroids = torch.tensor([[0.1000001, 0.2, 0.3], [0.5, 1.0, 1.5], [1.5, 0.0, 0.0], [9.0, 9.0, 9.0]])
    out = snap_uniform_clusters(x, labels, centroids)
    assert torch.equal(out[0], v)
    assert torch.equal(out[1:], centroids[1:])  # mixed clusters and the empty cluster 3 unchanged
    assert torch.equal(centroids[0], torch.tensor([0.1000001, 0.2, 0.3]))  # input not modified
