"""The calibrated pipeline: activation-aware target-mode clustering, a least-squares fit of the
codebooks to layer outputs, BatchNorm re-estimation, optionally the same fit again to the outputs
each layer must give on the compressed network's own inputs, then codebook refinement by distillation.

Calibration inputs (unlabeled; images, or whatever the model takes) are used for (1) input second moments that weight the clustering
error of every Conv2d/Linear weight, (2) full input second-moment matrices under which each layer's
block indices are chosen again with error feedback and its codebook and row gains are fitted to
the layer's outputs (:mod:`legonet.calibrate.layer_fit`),
(3) re-estimating the running statistics of every BatchNorm layer of the compressed model (by
default relative to the original model's: only the change compression makes is applied),
(4) with ``layer_fit.propagate`` (off by default), pairing each layer's inputs in the compressed
network with the original's, so that the layer fit can be made again to repair what the layers
before got wrong
(:func:`legonet.calibrate.layer_fit.propagated_targets`; statistics re-estimated after it) and
(5) tuning the codebooks, row gains and normalisation affine parameters so that the compressed
model's outputs, and the features its last Linear layer receives, match the original's (indices fixed; see :mod:`legonet.calibrate.refine`). No other
weight is trained and no label is used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from legonet.artifact import CompressedModel, constant_fill
from legonet.calibrate.bn import reestimate_batchnorm
from legonet.calibrate.data import Batch, Calibration
from legonet.calibrate.distill import feature_layer
from legonet.calibrate.layer_fit import LayerFitResult, fit_layer_outputs, propagated_targets
from legonet.calibrate.refine import RefineResult, refine_codebooks
from legonet.calibrate.stats import input_statistics, model_device, paired_input_statistics
from legonet.stream_budget import entry_bytes, snapshot, spend_savings, undo_growth
from legonet.clustering import select_tensors, sqnr_db, state_dict_and_aliases
from legonet.compact import RECODE_RESERVE
from legonet.config import TargetConfig
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
from legonet.graph import PassNote
from legonet.report import fp32_bytes
from legonet.runlog import RunLog
from legonet.target import DEFAULT_MENU, KERNEL_MENU, Choice, check_reachable, compress_to_ratio

# characters of the longest SQNR field ("-123.456") the file may hold
_SQNR_CHARS = 8


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


@dataclass(frozen=True)
class CalibratedResult:
    """What the data-driven steps did: the layer-output fit and refinement (each None if skipped)."""

    layer_fit: LayerFitResult | None
    refine: RefineResult | None
    grouped_channels: int = 0


def calibrated_compress(
    model: nn.Module,
    target_ratio: float,
    calib: Calibration | torch.Tensor | Iterable[Batch],
    *,
    config: TargetConfig | None = None,
    menu=DEFAULT_MENU,
    kernel_menu=KERNEL_MENU,
    log: RunLog | None = None,
) -> tuple[CompressedModel, dict[str, Choice], CalibratedResult]:
    """Compress ``model`` (with its trained weights loaded) to ``target_ratio`` using ``calib``.

    The model's passes (input statistics, BatchNorm re-estimation, refinement) run on the device
    the model is on, with the batches moved there one at a time; the clustering, the layer fit
    and the file are computed on the CPU.

    Args:
        model: the network with its original weights, on any device; it is left holding the
            compressed weights (with ``config.group_channels``, some hidden channels reordered:
            the same order as in the returned model, so the two agree).
        target_ratio: whole-file compression ratio to meet.
        calib: calibration inputs, no labels: a tensor ``(N, ...)`` of inputs (split into
            ``config.batch_size`` batches) or batches of what the model takes (tensors, tuples of
            positional arguments, dicts of keyword arguments; see :mod:`legonet.calibrate.data`).
        config: :class:`TargetConfig`; its ``layer_fit``, ``refine``, ``fold_norms``,
            ``norm_statistics`` and ``group_channels`` choose the steps.
        log: progress and timing of the steps, and a note for what each did or left undone.
    Returns:
        The compressed model, the setting chosen per clustered tensor, and what the layer fit and
        refinement did (a :class:`CalibratedResult`).
    """
    cfg = config or TargetConfig()
    log = log or RunLog()
    calib = Calibration.of(calib, cfg.batch_size)
    device = model_device(model)
    notes: list[PassNote] = []
    grouped = []
    if cfg.group_channels:
        with log.step("grouping channels"):
            grouped = group_alike_channels(model, notes)
        if grouped:
            log.note(f"grouped alike channels of {len(grouped)} layers (a reordering; the function is unchanged)")
    eps = batchnorm_eps(model) if cfg.fold_norms else {}
    # a tied tensor is planned, fitted, refined, stored and counted once (its other names: ``aliases``)
    original, aliases = state_dict_and_aliases(model)
    sd = dict(original)
    # the budget is planned for the folded file (new tensors in ``sd``: the model keeps its own) ...
    folded = fold_batchnorm_statistics(sd, eps)
    clustering = cfg.clustering()
    names = select_tensors(sd, clustering)
    pairs = scale_pairs(model, names, notes) if cfg.fold_norms else {}
    # the layer fit and refinement rewrite each tensor's SQNR in the metadata (room for the longest
    # number per tensor), and they and the BatchNorm fold may give 8-bit gains and codebooks new codes
    reserve = RECODE_RESERVE * len(names) + (_SQNR_CHARS * len(names)
                                             if cfg.refine is not None or cfg.layer_fit is not None else 0)
    planned = unit_scales(sd, pairs)
    reserve += _refilled_norm_bytes(model, planned, pairs, cfg.fold_norms)
    check_reachable(planned, names, target_ratio, menu=menu, kernel_menu=kernel_menu, reserve=reserve)  # before any pass
    layer_fit = cfg.layer_fit
    with log.step("input statistics"):
        rows = None if layer_fit is None else layer_fit.rows_per_batch
        moments, covs = input_statistics(model, _counted(calib, device, log), names, covariance_rows=rows,
                                         seed=cfg.seed)
    moments = {n: t.cpu() for n, t in moments.items()}  # clustering and the layer fit run on the CPU
    covs = {n: t.cpu() for n, t in covs.items()}
    unweighted = [n for n in names if n not in moments]
    if unweighted:
        log.note(f"activation-aware clustering: {len(unweighted)} tensors clustered by their weight error alone "
                 f"(not the weight of a Conv2d or Linear layer): {', '.join(unweighted[:5])}"
                 + (", ..." if len(unweighted) > 5 else ""))
    ranked = covs if layer_fit is not None and layer_fit.output_allocation else None
    # planned with the BatchNorm scales the file will not store (they end in the row gains) ...
    tables: dict = {}
    cm, plan = compress_to_ratio(planned, target_ratio, config=cfg, element_weights=moments,
                                 covariances=ranked, menu=menu, kernel_menu=kernel_menu, log=log,
                                 reserve=reserve, tables_out=tables, aliases=aliases)
    restore_scales(cm, sd, pairs)  # ... which are needed until then
    fit_result = None
    if layer_fit is not None:
        with log.step("layer fit"):
            budget = sum(entry_bytes(cm).values())  # the clustered tensors' bytes target mode verified
            fit_result, plan = _fit_and_spend(cm, original, covs, planned, tables, plan, moments, layer_fit, log,
                                              budget=budget)
        del covs
    # ... but re-estimation needs the trained affine parameters: folding absorbed the old statistics
    for prefix in folded:
        for key in (state_key(prefix, "weight"), state_key(prefix, "bias")):
            cm.tensors[key] = original[key].to(cm.tensors[key].dtype).clone()
    student = copy.deepcopy(model)  # ``model`` keeps the original weights: the teacher of refinement
    cm.load_into(student)
    _reestimate_norms(model, student, cm, calib, cfg.norm_statistics, log)
    if layer_fit is not None and layer_fit.propagate:
        with log.step("propagated layer fit"):
            plan = _fit_propagated(model, student, cm, original, calib, names, layer_fit, cfg.seed, log,
                                   spend=(planned, tables, plan, moments, budget))
        _reestimate_norms(model, student, cm, calib, cfg.norm_statistics, log)  # the fit moved the outputs
    fold_batchnorm_statistics(cm.tensors, eps)
    refined = None
    if cfg.refine is not None:
        tapped = feature_layer(model) if cfg.refine.feature_weight > 0 else None
        matched = "outputs" if tapped is None else f"outputs and the features entering '{tapped}'"
        log.note(f"refined codebooks on {calib.samples} calibration samples ({matched})")
        with log.step("refinement"):
            refined = refine_codebooks(model, cm, calib, cfg.refine, progress=lambda i, n, _loss: log.advance(i, n),
                                       say=log.note)
    if pairs:
        log.note(f"BatchNorm scales moved into the row gains of {len(fold_planned_scales(cm, pairs))} layers")
    for note in notes:
        log.note(str(note))
    size, target = len(cm.to_bytes()), int(fp32_bytes(sd) / target_ratio)
    if size > target:  # cannot happen with the reserve above; checked so a regression is loud
        raise ConfigError(f"compressed file has {size:,} bytes, over the target's {target:,}")
    cm.load_into(model)
    return cm, plan, CalibratedResult(fit_result, refined, len(grouped))


def _counted(calib: Calibration, device: torch.device, log: RunLog):
    """The calibration batches on ``device``, reporting progress of the current step batch by batch."""
    total = len(calib.batches)
    for i, batch in enumerate(calib.iter(device)):
        yield batch
        log.advance(i + 1, total)


def _reestimate_norms(model, student, cm, calib, norm_statistics, log):
    """BatchNorm statistics of ``student`` (``cm`` loaded) measured again, and written into ``cm``."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    device = model_device(model)
    with log.step("BatchNorm re-estimation"):
        reference = model if norm_statistics == "relative" else None
        if reestimate_batchnorm(student, lambda: _counted(calib, device, log), reference=reference):
            new = student.state_dict()
            for name, t in list(cm.tensors.items()):
                if isinstance(t, torch.Tensor) and (name.endswith("running_mean") or name.endswith("running_var")):
                    cm.tensors[name] = new[name].to("cpu", t.dtype).clone()


def _fit_propagated(model, student, cm, original, calib, names, layer_fit, seed, log, spend):
    """The layer fit again, now to what each layer must output given the compressed network's own
    inputs (:func:`legonet.calibrate.layer_fit.propagated_targets`), its savings spent as the first
    fit's are (``spend``: what :func:`_fit_and_spend` takes besides); ``student`` is ``cm`` loaded
    into the model and is left holding the result. Returns the entry per tensor now stored."""
    device = model_device(model)
    covs, cross = paired_input_statistics(model, student, _counted(calib, device, log), names,
                                          rows_per_batch=layer_fit.rows_per_batch, seed=seed)
    covs = {n: t.cpu() for n, t in covs.items()}
    fit = replace(layer_fit, damp=layer_fit.propagate_damp)
    targets = propagated_targets(original, covs, {n: t.cpu() for n, t in cross.items()}, fit.damp)
    del cross
    planned, tables, plan, moments, budget = spend
    _, plan = _fit_and_spend(cm, {**original, **targets}, covs, planned, tables, plan, moments, fit, log,
                             budget=budget, label="propagated layer fit")
    for n in cm.clustered:
        cm.clustered[n].sqnr_db = sqnr_db(original[n], cm.reconstruct(n))
    cm.load_into(student)
    return plan


def _fit_and_spend(cm, original, covs, planned, tables, plan, moments, layer_fit, log, *, budget,
                   label="layer fit"):
    """The layer fit toward ``original`` (``{name: target weight}``), then the bytes its indices
    saved below ``budget`` (the clustered tensors' bytes target mode verified) spent on finer
    settings; ``(result, plan)``."""
    before_fit = snapshot(cm)
    fit_result = fit_layer_outputs(cm, original, covs, layer_fit, progress=log.advance)
    undone = undo_growth(cm, budget, before_fit)
    if undone:
        log.note(f"{label} undone for {len(undone)} tensors whose new indices coded larger than the plan allows")
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
        log.note(f"bytes the {label} saved went to {len(upgraded)} tensors, clustered again at finer settings")
    return fit_result, plan
