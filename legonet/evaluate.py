"""Top-1 accuracy of a model on an :class:`~legonet.data.ImageSet`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from legonet.data import ImageSet, to_input
from legonet.errors import ArchitectureError


@torch.no_grad()
def top1(
    model: nn.Module,
    images: ImageSet,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    batch_size: int = 200,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Fraction of images whose arg-max logit equals the label (model put in eval mode)."""
    if images.y is None:
        raise ArchitectureError("top-1 needs labels")
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        logits = model(to_input(images.x[s : s + batch_size], mean, std))
        correct += int((logits.argmax(1).numpy() == images.y[s : s + batch_size]).sum())
        if on_batch:
            on_batch(min(batch_size, len(images) - s))
    return correct / len(images)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return centre - half, centre + half
