"""The calibrated pipeline: activation-aware target-mode clustering, a least-squares fit of the
codebooks to layer outputs, BatchNorm re-estimation, then codebook refinement by distillation.

Calibration images (unlabeled) are used for (1) input second moments that weight the clustering
error of every Conv2d/Linear weight, (2) full input second-moment matrices under which each layer's
block indices are chosen again with error feedback and its codebook and row gains are fitted to
the layer's outputs (:mod:`legonet.calibrate.layer_fit`),
(3) re-estimating the running statistics of every BatchNorm layer of the compressed model (by
default relative to the original model's: only the change compression makes is applied) and
(4) tuning the codebooks, row gains and normalisation affine parameters so that the compressed
model's outputs, and the features its last Linear layer receives, match the original's (indices fixed; see :mod:`legonet.calibrate.refine`). No other
weight is trained and no label is used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from legonet.artifact import CompressedModel, constant_fill
from legonet.calibrate.bn import reestimate_batchnorm
from legonet.calibrate.distill import feature_layer
from legonet.calibrate.layer_fit import (
    LayerFitConfig,
    LayerFitResult,
    fit_layer_outputs,
)
from legonet.calibrate.refine import RefineConfig, RefineResult, refine_codebooks
from legonet.calibrate.stats import input_statistics, model_device
from legonet.calibrate.stream_budget import snapshot, spend_savings, undo_growth
from legonet.compact import RECODE_RESERVE
from legonet.compress import as_state_dict, select_tensors
from legonet.config import NORM_STATISTICS, LegoConfig
from legonet.datafree.fold_norms import (
    batchnorm_eps,
    fold_batchnorm_statistics,
    fold_planned_scales,
    restore_scales,
    scale_pairs,
    state_key,
    unit_scales,
)
from legonet.datafree.permute_channels import group_alike_channels
from legonet.errors import ConfigError
from legonet.report import fp32_bytes
from legonet.target import DEFAULT_MENU, KERNEL_MENU, Choice, compress_to_ratio

# characters of the longest SQNR field ("-123.456") the file may hold
_SQNR_CHARS = 8
# refinement is on by default (a frozen config, safe to share)
_DEFAULT_REFINE = RefineConfig()
_DEFAULT_LAYER_FIT = LayerFitConfig()


def _batches(images: torch.Tensor, batch_size: int, device: torch.device | None = None):
    for s in range(0, images.shape[0], batch_size):
        yield images[s : s + batch_size].to(device or images.device)


def _refilled_norm_bytes(model: nn.Module, planned: dict, pairs: dict, fold_norms: bool) -> int:
    """Bytes (float16) of the BatchNorm tensors that are constant in ``planned``, so counted as one-value
    fills, but that re-estimating the statistics will make dense: an untrained layer's bias, say.
    Folded statistics and scales moved into row gains end as constants again."""
    total = 0
    for prefix, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        for part in ("weight", "bias", "running_mean", "running_var"):
            key = state_key(prefix, part)
            if (fold_norms and part.startswith("running")) or (part == "weight" and prefix in pairs):
                continue
            t = planned.get(key)
            if isinstance(t, torch.Tensor) and constant_fill(t) is not None:
                total += 2 * t.numel()
    return total


def calibrated_compress_to_ratio(model: nn.Module, target_ratio: float, calib: torch.Tensor,
                                 **options) -> tuple[CompressedModel, dict[str, Choice]]:
    """:func:`calibrated_compress` without the refinement result: ``(compressed model, plan)``."""
    cm, plan, _ = calibrated_compress(model, target_ratio, calib, **options)
    return cm, plan


@dataclass(frozen=True)
class CalibratedResult:
    """What the data-driven steps did: the layer-output fit and refinement (each None if skipped)."""

    layer_fit: LayerFitResult | None
    refine: RefineResult | None
    grouped_channels: int = 0


def calibrated_compress(
    model: nn.Module,
    target_ratio: float,
    calib: torch.Tensor,
    *,
    config: LegoConfig | None = None,
    refine: RefineConfig | None = _DEFAULT_REFINE,
    layer_fit: LayerFitConfig | None = _DEFAULT_LAYER_FIT,
    batch_size: int = 64,
    fold_norms: bool = True,
    norm_statistics: str = "relative",
    group_channels: bool = True,
    menu=DEFAULT_MENU,
    kernel_menu=KERNEL_MENU,
    progress: Callable[[str], None] | None = None,
    on_refine_step: Callable[[int, int, float], None] | None = None,
) -> tuple[CompressedModel, dict[str, Choice], CalibratedResult]:
    """Compress ``model`` (with its trained weights loaded) to ``target_ratio`` using ``calib``.

    The model's passes (input statistics, BatchNorm re-estimation, refinement) run on the device
    the model is on, with ``calib`` moved there a batch at a time; the clustering, the layer fit
    and the file are computed on the CPU.

    Args:
        model: the network with its original weights, on any device; it is left holding the
            compressed weights (with ``group_channels``, some hidden channels reordered: the same
            order as in the returned model, so the two agree).
        target_ratio: whole-file compression ratio to meet.
        calib: ``(N, C, H, W)`` normalised calibration inputs (no labels), on any device.
        config: base settings (include/exclude, seed, k-means), as for target mode.
        refine: codebook refinement settings; ``None`` skips refinement.
        layer_fit: settings of the least-squares fit of codebooks and gains to layer outputs;
            ``None`` skips it.
        fold_norms: store BatchNorm layers in inference form (statistics folded into the affine
            parameters, :mod:`legonet.datafree.fold_norms`), so that their bytes go to the weights.
        norm_statistics: how BatchNorm running statistics are re-estimated on ``calib``:
            ``"relative"`` (default) moves the model's stored statistics by the change compression
            makes to them on the calibration images; ``"replace"`` replaces them by the calibration
            images' (see :func:`legonet.calibrate.bn.reestimate_batchnorm`).
        group_channels: first reorder every hidden channel dimension that can be reordered without
            changing the network's function, so that alike weight rows share blocks
            (:func:`legonet.datafree.permute_channels.group_alike_channels`).
        on_refine_step: optional ``(step, steps, loss)`` callback during refinement.
    Returns:
        The compressed model, the setting chosen per clustered tensor, and what the layer fit and
        refinement did (a :class:`CalibratedResult`).
    """
    if norm_statistics not in NORM_STATISTICS:
        raise ConfigError(f"norm_statistics must be one of {NORM_STATISTICS}, got {norm_statistics!r}")
    say = progress or (lambda _m: None)
    device = model_device(model)
    grouped = group_alike_channels(model) if group_channels else []
    if grouped:
        say(f"grouped alike channels of {len(grouped)} layers (a reordering; the function is unchanged)")
    eps = batchnorm_eps(model) if fold_norms else {}
    original = as_state_dict(model)
    sd = dict(original)
    # the budget is planned for the folded file (new tensors in ``sd``: the model keeps its own) ...
    folded = fold_batchnorm_statistics(sd, eps)
    cfg = config or LegoConfig()
    names = select_tensors(sd, cfg)
    pairs = scale_pairs(model, names) if fold_norms else {}
    say(f"input statistics on {calib.shape[0]} calibration images")
    rows = None if layer_fit is None else layer_fit.rows_per_batch
    moments, covs = input_statistics(model, _batches(calib, batch_size, device), names, covariance_rows=rows,
                                     seed=cfg.seed)
    moments = {n: t.cpu() for n, t in moments.items()}  # clustering and the layer fit run on the CPU
    covs = {n: t.cpu() for n, t in covs.items()}
    # the layer fit and refinement rewrite each tensor's SQNR in the metadata (room for the longest
    # number per tensor), and they and the BatchNorm fold may give 8-bit gains and codebooks new codes
    reserve = RECODE_RESERVE * len(names) + (_SQNR_CHARS * len(names) if refine is not None or layer_fit is not None
                                             else 0)
    planned = unit_scales(sd, pairs)
    reserve += _refilled_norm_bytes(model, planned, pairs, fold_norms)
    ranked = covs if layer_fit is not None and layer_fit.output_allocation else None
    # planned with the BatchNorm scales the file will not store (they end in the row gains) ...
    tables: dict = {}
    cm, plan = compress_to_ratio(planned, target_ratio, config=cfg, element_weights=moments,
                                 covariances=ranked, menu=menu, kernel_menu=kernel_menu, progress=say,
                                 reserve=reserve, tables_out=tables)
    restore_scales(cm, sd, pairs)  # ... which are needed until then
    fit_result = None
    if layer_fit is not None:
        before_fit = snapshot(cm)
        budget = sum(before_fit["bytes"].values())  # the clustered tensors' bytes target mode verified
        fit_result = fit_layer_outputs(cm, original, covs, layer_fit, progress=say)
        undone = undo_growth(cm, budget, before_fit)
        if undone:
            say(f"layer fit undone for {len(undone)} tensors whose new indices coded larger than the plan allows")
        # the fit's indices entropy-code smaller than planned: those bytes buy finer settings (twice:
        # the refit of the upgraded tensors saves again)
        upgraded: set[str] = set()
        for _round in range(2):
            kept = spend_savings(
                cm, planned, tables, plan, budget, element_weights=moments,
                refit=lambda names: fit_layer_outputs(cm, original, {n: covs[n] for n in names if n in covs}, layer_fit))
            plan = {**plan, **kept}
            upgraded.update(kept)
            if not kept:
                break
        if upgraded:
            say(f"bytes the layer fit saved went to {len(upgraded)} tensors, clustered again at finer settings")
        del covs
    # ... but re-estimation needs the trained affine parameters: folding absorbed the old statistics
    for prefix in folded:
        for key in (state_key(prefix, "weight"), state_key(prefix, "bias")):
            cm.tensors[key] = original[key].to(cm.tensors[key].dtype).clone()
    say(f"re-estimating BatchNorm statistics on {calib.shape[0]} calibration images")
    student = copy.deepcopy(model)  # ``model`` keeps the original weights: the teacher of refinement
    cm.load_into(student)
    reference = model if norm_statistics == "relative" else None
    if reestimate_batchnorm(student, lambda: _batches(calib, batch_size, device), reference=reference):
        new = student.state_dict()
        for name, t in list(cm.tensors.items()):
            if isinstance(t, torch.Tensor) and (name.endswith("running_mean") or name.endswith("running_var")):
                cm.tensors[name] = new[name].to("cpu", t.dtype).clone()
    fold_batchnorm_statistics(cm.tensors, eps)
    refined = None
    if refine is not None:
        tapped = feature_layer(model) if refine.feature_weight > 0 else None
        matched = "logits" if tapped is None else f"logits and the features entering '{tapped}'"
        say(f"refining codebooks on {calib.shape[0]} calibration images ({matched})")
        refined = refine_codebooks(model, cm, calib, refine, progress=on_refine_step, say=say)
    if pairs:
        say(f"BatchNorm scales moved into the row gains of {len(fold_planned_scales(cm, pairs))} layers")
    size, target = len(cm.to_bytes()), int(fp32_bytes(sd) / target_ratio)
    if size > target:  # cannot happen with the reserve above; checked so a regression is loud
        raise ConfigError(f"compressed file has {size:,} bytes, over the target's {target:,}")
    cm.load_into(model)
    return cm, plan, CalibratedResult(fit_result, refined, len(grouped))

