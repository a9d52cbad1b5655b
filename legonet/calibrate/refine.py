"""Codebook refinement by distillation: indices fixed, centroids tuned against the original model.

After clustering, every weight is ``codebook[index] * row_gain``. With the indices frozen the
reconstruction is a differentiable function of the codebooks and gains, so a few passes of Adam
over unlabeled calibration images can pull the compressed network's logits back towards the
original network's (knowledge distillation, teacher = the uncompressed model). With
``feature_weight`` the features entering the last Linear layer are matched too: a classifier's ten
logits per image leave a hundred thousand tuned numbers free to fit the calibration images alone
(ResNet-50 at 64x: KL 0.02 on them, 0.14 on held-out images); the features constrain them far more.
Where the compressed features are too far off to be matched (further from the original's than
zeros are), ``feature_gate`` switches that term off, and ``feature_fallback`` matches their
direction instead (cosine distance) until they come closer.

What is tuned, and nothing else: the codebooks (float32 during tuning, rounded to their storage
dtype at the end), the per-row gains of gain-shape clustering (signs kept: a BatchNorm scale moved
into a gain may make it negative), and the affine parameters (weight, bias) of the normalisation
layers stored densely. Indices, every other weight, biases of Conv/Linear layers and
the BatchNorm running statistics stay as they are. The file size does not change. The losses
and the teacher's signals are in :mod:`legonet.calibrate.distill`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from legonet.artifact import CompressedModel, constant_fill
from legonet.calibrate.distill import (
    FEATURE_GATES,
    LOSSES,
    FeatureTaps,
    distill_loss,
    fast_layout,
    feature_layer,
    feature_term,
    teacher_outputs,
)
from legonet.calibrate.stats import model_device
from legonet.calibrate.views import boundary_views, views_unsupported
from legonet.compact import recode_compact
from legonet.compress import as_state_dict, sqnr_db
from legonet.config import FEATURE_FALLBACKS, PRECISIONS
from legonet.errors import ConfigError
from legonet.ops.quant import clamp_magnitude, dequantize, storable_gains

SCHEDULES = ("cosine", "constant")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class RefineConfig:
    """Settings of codebook refinement.

    Attributes:
        epochs: passes over the calibration images (the number of Adam steps is
            ``ceil(epochs * N / batch_size)``; 120 for 1,024 images by default).
        batch_size: images per step.
        lr: Adam learning rate for codebooks, relative: each codebook's step is scaled by the RMS
            of its entries, so one rate suits models whose weights differ in magnitude.
        loss: ``"kl"`` (KL divergence of the softmax outputs, temperature 1) or ``"mse"`` (of logits).
        schedule: ``"constant"`` or ``"cosine"`` (learning rate decayed to 0 over the steps). Constant
            by default: with the few steps a time budget allows the loss is still falling at the
            end, and decaying the rate stops it early (ResNet-50 64x, 64 steps: final loss 0.59
            with cosine against 0.24 constant).
        feature_weight: weight of a second distillation term, the relative squared error of the
            features the model's last Linear layer receives (``|f_s - f_t|^2 / |f_t|^2`` over the
            batch). A classifier's logits give a handful of numbers per image; its features give
            hundreds, which keeps the tuned codebooks from fitting the calibration images alone.
            Models without a Linear layer are refined on the logits only (the result says so).
        feature_gate: ``"explained"`` scales the weight at every step by the share of the
            teacher's feature energy the student explains, ``max(0, 1 - relative error)`` (no
            gradient through it): where the compressed features are no closer to the teacher's
            than zeros are, the term is off and the logits alone are fitted; as they come closer
            it grows to the full weight. ``"none"``: the weight as given. Why: ResNet-50 at 64x
            starts at a relative feature error of about 0.6 and matching features helps (held-out
            KL 0.137 -> 0.075), at 128x it starts above 1.5 and a fixed weight of 10 drowned the
            logits (63.6 % with weight 0, 28.9 % with 10).
        feature_fallback: what the term does at a step where the ``"explained"`` gate is closed
            (relative error >= 1): ``"cosine"`` matches the features' direction,
            ``weight * mean_i (1 - cos(f_s_i, f_t_i))`` over the images (bounded by 2 whatever
            their scale, so it cannot drown the logits); ``"none"`` leaves the term off. Why: with
            the term off the features can drift further away and the gate never opens again
            (ResNet-50 at 128x, development run: 73.6 % with ``"none"``, 76.8 % with ``"cosine"``
            on 2,000 test images). Has no effect with gate ``"none"`` or where the gate stays
            open (the result counts the steps that fell back).
        average: decay of an exponential moving average of the tuned parameters, updated after
            every step and written back at the end instead of the last step's values (0: off); it
            averages the steps only (``sum_t d^(T-t) p_t / sum_t d^(T-t)``), not the starting point.
            Averaging smooths out the noise of the last steps' small batches, which a constant
            rate leaves in the parameters; with it, more steps help where without it they fit the
            calibration images (ResNet-50 64x, all 10,000 test images: 80 steps without 88.46 %,
            120 steps averaged with 0.97 88.85 %).
        precision: ``"float32"`` or ``"bfloat16"``: the student's forward and backward passes under
            ``torch.autocast`` in bfloat16 (its matrix products and convolutions); the tuned
            parameters, their Adam state, the losses and the teacher's outputs stay float32. Where
            the hardware has native bfloat16 it roughly halves refinement's time (ResNet-50 64x on
            a 2-core AVX512-BF16 CPU: 120 steps in 216 s instead of 413 s, 88.74 % against 88.85 %
            on all 10,000 test images, within run-to-run spread); elsewhere it may be slower.
            float32 by default: the speed depends on the machine, and the committed measurements
            were made in float32.
        flip: also show horizontally flipped images (inputs ``(N, C, H, W)`` only).
        boundary_share: with ``share > 0``, every calibration image also gets a *boundary view*
            (:func:`legonet.calibrate.views.boundary_views`): one gradient step on the original
            model's top-1 margin that removes ``share`` of it (to first order), made once before
            refinement; the steps then draw from the images and their views together (the number
            of steps still counts passes over the images). 0: off. Why: calibration images come
            from the training split, where the original is confident and its softmax says little
            about the boundaries near which test images' answers change (ResNet-50 64x, same
            pre-refinement file, all 10,000 test images, development script: KL to the original
            0.0849 without views, 0.0789 with share 0.5, 0.0884 with views moved as far in random
            directions). Views need floating-point inputs and ``(N, classes)`` outputs; for other
            models none are made and :class:`RefineResult` says why.
        tune_norms: also tune the affine parameters of normalisation layers (except those stored as
            one constant, e.g. BatchNorm scales already moved into the row gains: tuned, they
            would be stored element by element).
        seed: order of the batches and flips.
    """

    epochs: float = 7.5
    batch_size: int = 64
    lr: float = 3e-3
    loss: str = "kl"
    schedule: str = "constant"
    feature_weight: float = 10.0
    feature_gate: str = "explained"
    feature_fallback: str = "cosine"
    average: float = 0.97
    precision: str = "float32"
    flip: bool = True
    tune_norms: bool = True
    boundary_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, (int, float)) or not 0 < self.epochs <= 1000:
            raise ConfigError(f"refine epochs must be in (0, 1000], got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"refine batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ConfigError(f"refine lr must be in (0, 1), got {self.lr!r}")
        if not isinstance(self.feature_weight, (int, float)) or not 0 <= self.feature_weight < 1e6:
            raise ConfigError(f"refine feature_weight must be in [0, 1e6), got {self.feature_weight!r}")
        if not isinstance(self.average, (int, float)) or not 0 <= self.average < 1:
            raise ConfigError(f"refine average must be in [0, 1), got {self.average!r}")
        if not isinstance(self.boundary_share, (int, float)) or not 0 <= self.boundary_share <= 1:
            raise ConfigError(f"refine boundary_share must be in [0, 1], got {self.boundary_share!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"refine loss must be one of {LOSSES}, got {self.loss!r}")
        if self.feature_gate not in FEATURE_GATES:
            raise ConfigError(f"refine feature_gate must be one of {FEATURE_GATES}, got {self.feature_gate!r}")
        if self.feature_fallback not in FEATURE_FALLBACKS:
            raise ConfigError(f"refine feature_fallback must be one of {FEATURE_FALLBACKS}, "
                              f"got {self.feature_fallback!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"refine precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"refine schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass(frozen=True)
class RefineResult:
    """What refinement did: steps taken, loss at the first and the last step (the batch's loss under
    the parameters of that step; with ``average`` the values written back are their average, whose
    loss no step measured), wall time, parameters tuned, the layer whose input features were
    matched (None: logits only), the steps at which the feature term fell back to the cosine
    distance (its gate closed), the number of boundary views refined on besides the images, and
    why none were made where ``boundary_share > 0`` asked for them (else None)."""

    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    tuned_parameters: int
    feature_layer: str | None = None
    fallback_steps: int = 0
    boundary_views: int = 0
    views_skipped: str | None = None


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Fraction of the base learning rate at ``step`` (0-based) of ``steps``: 1 for ``"constant"``;
    ``0.5 * (1 + cos(pi * step / steps))`` for ``"cosine"`` (1 at the first step, near 0 at the last)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def refine_codebooks(
    model: nn.Module,
    cm: CompressedModel,
    calib: torch.Tensor,
    config: RefineConfig | None = None,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> RefineResult:
    """Tune ``cm``'s codebooks, row gains and norm affine parameters in place by distillation.

    Args:
        model: the network holding the *original* weights (the teacher; left unchanged), on any
            device: refinement's passes run there. Its state dict names must match ``cm.tensors``.
        cm: the compressed model, updated in place (codebooks, gains, norm weights/biases).
        calib: ``(N, ...)`` normalised calibration inputs, no labels, on any device (moved to the model's).
        progress: optional ``progress(step, steps, loss)`` callback.
        say: optional callback for one-line messages (the boundary views made, or why none were).
    Returns:
        A :class:`RefineResult`.
    """
    cfg = config or RefineConfig()
    if calib.shape[0] == 0:
        raise ConfigError("no calibration images to refine on")
    clustered = cm.clustered
    if not clustered:
        raise ConfigError("nothing to refine: the model has no clustered tensor")
    teacher = model
    device = model_device(model)
    calib = calib.to(device)
    student = copy.deepcopy(model)
    cm.load_into(student)  # load_state_dict casts float16 kept tensors to the module's dtype
    student.eval()  # running statistics fixed: refined against the (re-estimated) stored statistics
    teacher_was_training = teacher.training
    teacher.eval()
    for p in student.parameters():
        p.requires_grad_(False)

    codebooks = [nn.Parameter(cb.detach().to(device, torch.float32, copy=True)) for cb in cm.codebooks]
    gains = {n: nn.Parameter(ct.scale.detach().to(device, torch.float32, copy=True))
             for n, ct in clustered.items() if ct.scale is not None}
    indices = {n: ct.indices.to(device, torch.long) for n, ct in clustered.items()}
    norm_params = _norm_parameters(student, cm) if cfg.tune_norms else {}
    for p in norm_params.values():
        p.requires_grad_(True)
    groups = [{"params": [cb], "lr": cfg.lr * _rms(cb)} for cb in codebooks]
    groups += [{"params": [g], "lr": cfg.lr * _rms(g)} for g in gains.values()]
    if norm_params:
        groups.append({"params": list(norm_params.values()), "lr": cfg.lr})
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]
    tuned = [p for g in groups for p in g["params"]]
    n_tuned = sum(p.numel() for p in tuned)
    # the average starts empty and is divided by the weight it has gathered (as Adam's moments are),
    # so the starting point never counts, however few the steps
    averaged = [torch.zeros_like(p) for p in tuned] if cfg.average > 0 else None

    def weights() -> dict[str, torch.Tensor]:
        out = {}
        for name, ct in clustered.items():
            out[name] = dequantize(codebooks[ct.codebook], indices[name], ct.tiling, gains.get(name))
        return out

    n = calib.shape[0]
    steps = max(1, math.ceil(cfg.epochs * n / cfg.batch_size))
    flips = cfg.flip and calib.ndim == 4
    tapped = feature_layer(teacher) if cfg.feature_weight > 0 else None
    # without deterministic kernels two processes refined ResNet-20 to different codebooks (the
    # gradients of convolutions are not bit-reproducible otherwise); scoped, the setting restored
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    taps = FeatureTaps(teacher, student, tapped)  # removed in ``finally``: the teacher is the caller's model
    try:
        pool, skipped = calib, None  # what the steps draw from: the images, and their boundary views
        if cfg.boundary_share > 0:
            pool, skipped = _with_boundary_views(teacher, calib, cfg, say or (lambda _m: None))
        n_pool = pool.shape[0]
        # Teacher outputs computed once (for each image and its mirror) when the run sees every image
        # more than once and the outputs are small (classifier logits); otherwise per step.
        cached = None
        if steps * cfg.batch_size > (2 if flips else 1) * n_pool:
            cached = teacher_outputs(teacher, pool, cfg.batch_size, flips, taps)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n_pool, generator=gen)
        pos = 0
        first = last = float("nan")
        fallbacks = 0
        t0 = time.perf_counter()
        for step in range(steps):
            if pos >= n_pool:
                order, pos = torch.randperm(n_pool, generator=gen), 0
            # the draws stay on the CPU generator (the same sequence on every device)
            idx = order[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            flip = torch.rand(idx.shape[0], generator=gen) < 0.5 if flips else torch.zeros(idx.shape[0], dtype=torch.bool)
            idx, flip = idx.to(device), flip.to(device)
            x = pool[idx]
            if flips:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = fast_layout(x)
            if cached is not None:
                target = cached[0][flip.long(), idx]
                target_features = None if cached[1] is None else cached[1][flip.long(), idx]
            else:
                with torch.no_grad():
                    target = teacher(x)
                target_features = taps.teacher
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
                out = functional_call(student, weights(), (x,), strict=False)
            loss = distill_loss(out.float(), target, cfg.loss)
            if target_features is not None:
                term, fell_back = feature_term(taps.student.float(), target_features, cfg.feature_weight, cfg.feature_gate,
                                               cfg.feature_fallback)
                loss, fallbacks = loss + term, fallbacks + fell_back
            if not torch.isfinite(loss):
                raise ConfigError(f"refinement diverged at step {step + 1} (loss {float(loss)}); lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            f = lr_factor(step, steps, cfg.schedule)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            opt.step()
            for g in gains.values():
                # magnitudes kept off zero, not rounded: that happens once, in ``_write_back``
                g.data.copy_(clamp_magnitude(g.data, torch.finfo(torch.float16).tiny))
            if averaged is not None:
                with torch.no_grad():
                    for a, p in zip(averaged, tuned):
                        a.mul_(cfg.average).add_(p.detach(), alpha=1.0 - cfg.average)
            last = float(loss.detach())
            if step == 0:
                first = last
            if progress:
                progress(step + 1, steps, last)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        taps.remove()
        teacher.train(teacher_was_training)

    if averaged is not None:
        gathered = 1.0 - cfg.average**steps
        with torch.no_grad():
            for a, p in zip(averaged, tuned):
                p.copy_(a / gathered)
    _write_back(cm, codebooks, gains, norm_params, as_state_dict(teacher))
    return RefineResult(steps, first, last, time.perf_counter() - t0, n_tuned, tapped, fallbacks,
                        n_pool - n, skipped)


def _with_boundary_views(teacher: nn.Module, calib: torch.Tensor, cfg: RefineConfig,
                         say: Callable[[str], None]) -> tuple[torch.Tensor, str | None]:
    """``(images followed by their boundary views, None)``, or ``(images, why none were made)``."""
    with torch.no_grad():
        probe = teacher(calib[:1])
    why = views_unsupported(calib, probe)
    if why is not None:
        say(f"no boundary views: {why}")
        return calib, why
    made = boundary_views(teacher, calib, cfg.boundary_share, cfg.batch_size)
    say(f"boundary views of {calib.shape[0]} images (share {cfg.boundary_share:g}): the original's median "
        f"top-1 margin {made.margin_before:.2f} -> {made.margin_after:.2f}, median shift "
        f"{100 * made.relative_shift:.1f} % of the image")
    return torch.cat([calib, made.views]), None


def _rms(t: torch.Tensor) -> float:
    r = float(t.detach().pow(2).mean().sqrt())
    return r if r > 0 else 1.0


def _norm_parameters(student: nn.Module, cm: CompressedModel) -> dict[str, nn.Parameter]:
    """``{state-dict name: parameter}`` of the affine weights/biases of normalisation layers kept dense.

    A parameter whose stored tensor is one constant (a "fill", e.g. a BatchNorm scale moved into the
    row gains) is left out: tuned, it would be stored element by element and the file would grow.
    """
    out = {}
    for mod_name, mod in student.named_modules():
        if not isinstance(mod, _NORMS):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            stored = cm.tensors.get(full)
            if isinstance(stored, torch.Tensor) and constant_fill(stored) is None:
                out[full] = p
    return out


@torch.no_grad()
def _write_back(cm: CompressedModel, codebooks, gains, norm_params, original: dict[str, torch.Tensor]) -> None:
    store = {"float32": torch.float32, "float16": torch.float16}[cm.config.codebook_dtype]
    for i, cb in enumerate(codebooks):
        cm.codebooks[i] = cb.detach().to("cpu", store).float()
    for name, g in gains.items():
        ct = cm.tensors[name]
        ct.scale = storable_gains(g.detach().cpu(), keep_sign=True)
    for name, p in norm_params.items():
        old = cm.tensors[name]
        cm.tensors[name] = p.detach().to("cpu", old.dtype).clone()
    recode_compact(cm)  # 8-bit gains and codebooks back on their codes
    for name, ct in cm.clustered.items():  # the SQNR of the refined reconstruction
        ct.sqnr_db = sqnr_db(original[name], cm.reconstruct(name))
