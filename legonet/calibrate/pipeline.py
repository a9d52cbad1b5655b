"""The calibrated pipeline: activation-aware target-mode clustering, then BatchNorm re-estimation.

What is tuned: nothing is trained. Calibration images (unlabeled) are used for (1) input second
moments that weight the clustering error of every Conv2d/Linear weight and (2) re-estimating the
running statistics of every BatchNorm layer of the compressed model. Codebooks come from k-means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from legonet.artifact import CompressedModel, load_weights
from legonet.calibrate.bn import reestimate_batchnorm
from legonet.calibrate.stats import input_second_moments
from legonet.compress import as_state_dict, select_tensors
from legonet.config import LegoConfig
from legonet.target import DEFAULT_MENU, Choice, compress_to_ratio


def _batches(images: torch.Tensor, batch_size: int):
    for s in range(0, images.shape[0], batch_size):
        yield images[s : s + batch_size]


def calibrated_compress_to_ratio(
    model: nn.Module,
    target_ratio: float,
    calib: torch.Tensor,
    *,
    config: LegoConfig | None = None,
    batch_size: int = 64,
    menu=DEFAULT_MENU,
    progress: Callable[[str], None] | None = None,
) -> tuple[CompressedModel, dict[str, Choice]]:
    """Compress ``model`` (with its trained weights loaded) to ``target_ratio`` using ``calib``.

    Args:
        model: the network with its original weights; it is left holding the compressed weights.
        target_ratio: whole-file compression ratio to meet.
        calib: ``(N, C, H, W)`` normalised calibration inputs (no labels).
    """
    say = progress or (lambda _m: None)
    sd = as_state_dict(model)
    cfg = config or LegoConfig()
    names = select_tensors(sd, cfg)
    say(f"input statistics on {calib.shape[0]} calibration images")
    moments = input_second_moments(model, _batches(calib, batch_size), names)
    cm, plan = compress_to_ratio(sd, target_ratio, config=cfg, element_weights=moments, menu=menu, progress=say)
    say(f"re-estimating BatchNorm statistics on {calib.shape[0]} calibration images")
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in cm.to_state_dict().items()})
    if reestimate_batchnorm(model, _batches(calib, batch_size)):
        new = model.state_dict()
        for name, t in list(cm.tensors.items()):
            if isinstance(t, torch.Tensor) and (name.endswith("running_mean") or name.endswith("running_var")):
                cm.tensors[name] = new[name].to(t.dtype).clone()
    return cm, plan
