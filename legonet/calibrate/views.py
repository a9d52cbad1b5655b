"""Boundary views: calibration images moved part of the way to the original model's decision boundary.

Calibration images are usually drawn from the data the model was trained on, where it is confident:
its top logit leads the runner-up by a wide margin, and the softmax it is distilled with says little
about where the boundary between two classes runs. Test images fall near those boundaries far more
often, and that is where a compressed model's errors change its answers. One gradient step per image
on the original model's margin (top-1 logit minus runner-up, a linearised DeepFool step) makes a
view of the image whose teacher output is softer; refinement then distils on the images and their
views. Only the teacher is used: no labels, no other data.

Pure function of a model and a batch of inputs; :mod:`legonet.calibrate.refine` calls it once per
run, before the teacher's outputs are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViewsResult:
    """What :func:`boundary_views` made: ``views`` (same shape as the inputs; an input without a
    usable gradient is returned unchanged), the teacher's median margin before and after, and the
    median shift relative to the input's norm."""

    views: torch.Tensor
    margin_before: float
    margin_after: float
    relative_shift: float


def views_unsupported(inputs: torch.Tensor, outputs: torch.Tensor) -> str | None:
    """Why boundary views cannot be made for a model with these ``inputs`` and ``outputs``, or None.

    Views need inputs a gradient can move (floating point) and outputs that are scores of at least
    two classes, ``(N, classes)``."""
    if not inputs.is_floating_point():
        return f"the inputs are {inputs.dtype}, not floating point"
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return f"the outputs have shape {tuple(outputs.shape)}, not (N, classes >= 2)"
    return None


def boundary_views(model: nn.Module, inputs: torch.Tensor, share: float, batch_size: int = 64) -> ViewsResult:
    """One linearised step per input that removes ``share`` of the model's top-1 margin.

    For an input ``x`` with logits ``z`` (top-1 class ``a``, runner-up ``b``), margin
    ``m = z_a - z_b >= 0`` and its gradient ``g = d m / d x``, the view is
    ``x - share * m * g / |g|^2``: to first order its margin is ``(1 - share) * m``.

    Args:
        model: the original (teacher) network, in eval mode; its parameters are not changed and
            get no gradient.
        inputs: ``(N, ...)`` floating-point inputs, on the model's device.
        share: in ``(0, 1]``; 1 steps to the linearised boundary.
        batch_size: inputs per pass.
    Returns:
        A :class:`ViewsResult` whose ``views`` has the shape, dtype and device of ``inputs``.
    """
    views, before, after, shifts = [], [], [], []
    for s in range(0, inputs.shape[0], batch_size):
        x = inputs[s : s + batch_size].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = model(x)
            top = z.detach().topk(2, dim=1).indices
            margin = _margin(z, top)
            (grad,) = torch.autograd.grad(margin.sum(), x)
        with torch.no_grad():
            norm2 = grad.flatten(1).pow(2).sum(1)
            moved = norm2 > 0  # a flat margin (e.g. a saturated input) gives no direction: kept as is
            step = torch.where(moved, share * margin.detach() / norm2.clamp(min=torch.finfo(norm2.dtype).tiny), 0.0)
            view = x.detach() - step.view(-1, *([1] * (x.ndim - 1))) * grad
            after.append(_margin(model(view), top))
            before.append(margin.detach())
            shifts.append((view - x.detach()).flatten(1).norm(dim=1) / x.detach().flatten(1).norm(dim=1).clamp(min=1e-12))
            views.append(view)
    return ViewsResult(torch.cat(views), float(torch.cat(before).median()), float(torch.cat(after).median()),
                       float(torch.cat(shifts).median()))


def _margin(z: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``(N,)`` logit of class ``top[:, 0]`` minus that of ``top[:, 1]``, for ``(N, classes)`` logits ``z``."""
    return (z.gather(1, top[:, :1]) - z.gather(1, top[:, 1:2])).squeeze(1)
