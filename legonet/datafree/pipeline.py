"""The data-free target-mode pipeline for a model whose structure is known: what
``legonet.compress(model, target_ratio=R)`` (no ``calib``) and ``legonet compress IN --arch NAME
--target-ratio R`` run."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from legonet.artifact import CompressedModel
from legonet.aliases import with_aliases
from legonet.clustering import select_tensors, state_dict_and_aliases
from legonet.compact import RECODE_RESERVE
from legonet.config import TargetConfig
from legonet.datafree.bias_correction import correct_compressed
from legonet.datafree.fold_norms import (
    batchnorm_eps,
    fold_batchnorm_statistics,
    fold_planned_scales,
    restore_scales,
    scale_pairs,
    unit_scales,
)
from legonet.errors import ConfigError
from legonet.graph import PassNote
from legonet.menu_cache import MenuCache
from legonet.report import fp32_bytes
from legonet.runlog import RunLog
from legonet.target import DEFAULT_MENU, KERNEL_MENU, Choice, compress_to_ratio


def datafree_compress(
    model: nn.Module,
    target_ratio: float,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    config: TargetConfig | None = None,
    menu=DEFAULT_MENU,
    kernel_menu=KERNEL_MENU,
    log: RunLog | None = None,
    menu_cache: MenuCache | None = None,
) -> tuple[CompressedModel, dict[str, Choice]]:
    """Target mode + data-free repairs that need the architecture (no images).

    Steps: BatchNorm statistics folded into the affine parameters (``config.fold_norms``; frees
    their bytes for the clustered weights, see :mod:`legonet.datafree.fold_norms`), per-tensor
    settings chosen to meet ``target_ratio`` (:func:`legonet.target.compress_to_ratio`), then the
    mean shift each clustered layer causes cancelled from the stored BatchNorm parameters
    (``config.bias_correction``, :mod:`legonet.datafree.bias_correction`), the corrected statistics
    folded again, and each BatchNorm's scale moved into the row gains of the layer before it (the
    budget is planned for that file).

    Args:
        model: the architecture; its weights are used unless ``state_dict`` is given.
        state_dict: the trained weights (names of ``model``'s state dict).
        log: progress and timing of the steps, and a note for what each repair did or left undone.
        menu_cache: shared by runs at several ratios, so that the weights are analysed once.
    Returns:
        The compressed model and the setting chosen per clustered tensor.
    """
    cfg = config or TargetConfig()
    log = log or RunLog()
    # a tied tensor is planned, stored and counted once (its other names are ``aliases``)
    original, aliases = state_dict_and_aliases(state_dict if state_dict is not None else model)
    eps = batchnorm_eps(model) if cfg.fold_norms else {}
    sd = dict(original)
    fold_batchnorm_statistics(sd, eps)
    names = select_tensors(sd, cfg.clustering())
    notes: list[PassNote] = []
    pairs = scale_pairs(model, names, notes) if cfg.fold_norms else {}
    # the BatchNorm fold gives 8-bit gains new codes: room for them in the metadata
    cm, plan = compress_to_ratio(unit_scales(sd, pairs), target_ratio, config=cfg, menu=menu,
                                 kernel_menu=kernel_menu, log=log,
                                 reserve=RECODE_RESERVE * len(names) if pairs else 0, aliases=aliases,
                                 menu_cache=menu_cache)
    restore_scales(cm, sd, pairs)  # planned without them (they end in the row gains), needed until then
    if cfg.bias_correction:
        with log.step("bias correction"):
            # moments from the trained statistics; the model's own names, aliases included
            fixed = correct_compressed(cm, model, with_aliases(original, aliases))
        log.note(fixed.describe())
    fold_batchnorm_statistics(cm.tensors, eps)
    if pairs:
        log.note(f"BatchNorm scales moved into the row gains of {len(fold_planned_scales(cm, pairs))} layers")
    for note in notes:
        log.note(str(note))
    size, target = len(cm.to_bytes()), int(fp32_bytes(original) / target_ratio)
    if size > target:  # cannot happen with the reserve above; checked so a regression is loud
        raise ConfigError(f"compressed file has {size:,} bytes, over the target's {target:,}")
    return cm, plan
