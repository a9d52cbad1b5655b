"""The data-free target-mode pipeline for a known architecture: what ``legonet compress IN --arch NAME
--target-ratio R`` (no ``--calib``) runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from legonet.artifact import CompressedModel
from legonet.compact import RECODE_RESERVE
from legonet.compress import as_state_dict, select_tensors
from legonet.config import LegoConfig
from legonet.datafree.bias_correction import CorrectionReport, correct_compressed
from legonet.datafree.fold_norms import (
    batchnorm_eps,
    fold_batchnorm_statistics,
    fold_planned_scales,
    restore_scales,
    scale_pairs,
    unit_scales,
)
from legonet.errors import ConfigError
from legonet.report import fp32_bytes
from legonet.target import DEFAULT_MENU, KERNEL_MENU, Choice, compress_to_ratio


def datafree_compress(
    model: nn.Module,
    target_ratio: float,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    config: LegoConfig | None = None,
    fold_norms: bool = True,
    menu=DEFAULT_MENU,
    kernel_menu=KERNEL_MENU,
    progress: Callable[[str], None] | None = None,
    on_correction: Callable[[CorrectionReport], None] | None = None,
) -> tuple[CompressedModel, dict[str, Choice]]:
    """Target mode + data-free repairs that need the architecture (no images).

    Steps: BatchNorm statistics folded into the affine parameters (``fold_norms``; frees their bytes
    for the clustered weights, see :mod:`legonet.datafree.fold_norms`), per-tensor settings chosen to
    meet ``target_ratio`` (:func:`legonet.target.compress_to_ratio`), then the mean shift each
    clustered layer causes cancelled from the stored BatchNorm parameters
    (:mod:`legonet.datafree.bias_correction`), the corrected statistics folded again, and each
    BatchNorm's scale moved into the row gains of the layer before it (``fold_norms``; the budget is
    planned for that file).

    Args:
        model: the architecture; its weights are used unless ``state_dict`` is given.
        state_dict: the trained weights (names of ``model``'s state dict).
        progress: called with a line per step (the last ones say what the bias correction did).
        on_correction: called with the bias correction's report (which layers it could not correct).
    Returns:
        The compressed model and the setting chosen per clustered tensor.
    """
    say = progress or (lambda _m: None)
    original = as_state_dict(state_dict if state_dict is not None else model)
    eps = batchnorm_eps(model) if fold_norms else {}
    sd = dict(original)
    fold_batchnorm_statistics(sd, eps)
    names = select_tensors(sd, config or LegoConfig())
    pairs = scale_pairs(model, names) if fold_norms else {}
    # the BatchNorm fold gives 8-bit gains new codes: room for them in the metadata
    cm, plan = compress_to_ratio(unit_scales(sd, pairs), target_ratio, config=config, menu=menu,
                                 kernel_menu=kernel_menu, progress=say,
                                 reserve=RECODE_RESERVE * len(names) if pairs else 0)
    restore_scales(cm, sd, pairs)  # planned without them (they end in the row gains), needed until then
    fixed = correct_compressed(cm, model, original)  # moments from the trained statistics, shifts added to cm's
    say(fixed.describe())
    if on_correction is not None:
        on_correction(fixed)
    fold_batchnorm_statistics(cm.tensors, eps)
    if pairs:
        say(f"BatchNorm scales moved into the row gains of {len(fold_planned_scales(cm, pairs))} layers")
    size, target = len(cm.to_bytes()), int(fp32_bytes(original) / target_ratio)
    if size > target:  # cannot happen with the reserve above; checked so a regression is loud
        raise ConfigError(f"compressed file has {size:,} bytes, over the target's {target:,}")
    return cm, plan
