"""The distillation signals of refinement: what the compressed model (the student) is asked to match.

Pure functions of student and teacher outputs (the KL or MSE of the logits, the gated relative
error of the features entering the last Linear layer), the forward hooks that tap those features,
and the teacher's outputs computed once for every calibration image. :mod:`legonet.calibrate.refine`
runs the optimisation with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``|s - t|^2 / |t|^2`` over the whole batch (a scalar tensor)."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny)


def feature_term(student: torch.Tensor, teacher: torch.Tensor, weight: float, gate: str,
                 fallback: str = "none") -> tuple[torch.Tensor, bool]:
    """The feature term for ``(N, ...)`` student and teacher features, and whether it fell back.

    ``weight' * |s - t|^2 / |t|^2`` over the batch, with ``weight' = weight`` (gate ``"none"``) or
    ``weight * max(0, 1 - |s - t|^2 / |t|^2)`` (gate ``"explained"``, the factor without gradient).
    Where that gate is closed (relative error >= 1) and ``fallback="cosine"``:
    ``weight * mean_i (1 - cos(s_i, t_i))`` over the images ``i``, each flattened (then True).
    """
    rel = relative_error(student, teacher)
    if gate == "explained":
        share = float((1.0 - rel.detach()).clamp(min=0.0))
        if share == 0.0 and fallback == "cosine":
            cosine = (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
            return weight * cosine, True
        weight = weight * share
    return weight * rel, False


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``"kl"``: KL divergence of the teacher's softmax over the last axis from the student's
    (temperature 1, mean over every other position: images, or the tokens of a batch of sequences);
    ``"mse"``: mean squared error. Both ``(..., classes)``."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    classes = student.shape[-1]
    return F.kl_div(F.log_softmax(student.reshape(-1, classes), -1), F.log_softmax(teacher.reshape(-1, classes), -1),
                    log_target=True, reduction="batchmean")


# teacher outputs (and features) are cached for the whole run only up to this many elements (256 MiB of float32)
_CACHE_ELEMENTS = 1 << 26


def feature_layer(model: nn.Module) -> str | None:
    """Name of the model's last Linear module (for a classifier: its head), or None."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


class FeatureTaps:
    """Forward pre-hooks that keep the latest input of the layer ``name`` in the teacher and the
    student (``self.teacher``, ``self.student``); inert when ``name`` is None."""

    def __init__(self, teacher: nn.Module, student: nn.Module, name: str | None) -> None:
        self.teacher = self.student = None
        self._hooks = [] if name is None else [
            teacher.get_submodule(name).register_forward_pre_hook(lambda _m, i: setattr(self, "teacher", i[0])),
            student.get_submodule(name).register_forward_pre_hook(lambda _m, i: setattr(self, "student", i[0])),
        ]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, calib: torch.Tensor, batch_size: int, flips: bool,
                    taps: FeatureTaps) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(2 if flips else 1, N, ...)`` teacher outputs and (with ``taps``) features, or None if
    they would exceed the cache size."""
    views = (calib, calib.flip(-1)) if flips else (calib,)
    first = teacher(calib[:1])
    per_image = first.numel() + (0 if taps.teacher is None else taps.teacher.numel())
    if len(views) * calib.shape[0] * per_image > _CACHE_ELEMENTS:
        return None
    outs, feats = [], []
    for v in views:
        for s in range(0, v.shape[0], batch_size):
            outs.append(teacher(fast_layout(v[s : s + batch_size])))
            feats.append(taps.teacher)
    shape = (len(views), calib.shape[0])
    logits = torch.cat(outs).reshape(*shape, *first.shape[1:])
    if taps.teacher is None:
        return logits, None
    return logits, torch.cat(feats).reshape(*shape, *feats[0].shape[1:])


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout if it is a batch of images ``(N, C, H, W)``, else as it is:
    oneDNN's convolutions run faster on it (ResNet-50 forward + backward on 64 images, CPU: 4.95 ->
    3.92 s); the values are the same."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
