"""BatchNorm re-estimation: recompute running statistics of a compressed model on calibration images.

Clustering shifts every layer's output distribution; the stored running mean/variance then no longer
match and errors compound through the network. Re-estimating them (a forward pass, no gradients,
no labels) is the cheapest calibrated repair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                         on_batch: Callable[[int], None] | None = None) -> int:
    """Reset and recompute the running statistics of every BatchNorm layer of ``model``.

    Args:
        model: the network (modified in place; left in eval mode).
        batches: iterable of input batches ``(B, C, H, W)``, already normalised.
    Returns:
        Number of BatchNorm layers updated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    model.eval()
    for m in bns:
        m.train()
    try:
        for x in batches:
            model(x)
            if on_batch:
                on_batch(x.shape[0])
    finally:
        for m in bns:
            m.momentum = saved[m]
        model.eval()
    return len(bns)
