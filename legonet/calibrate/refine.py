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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from legonet.artifact import CompressedModel, constant_fill
from legonet.calibrate.data import Calibration, batch_to, output_tensor, run_model
from legonet.calibrate.distill import (
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
from legonet.clustering import as_state_dict, sqnr_db
from legonet.config import RefineConfig
from legonet.errors import ConfigError
from legonet.ops.quant import clamp_magnitude, dequantize, storable_gains

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


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


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether refinement's passes run in bfloat16: ``precision`` ``"bfloat16"``, or ``"auto"`` on
    hardware with native bfloat16 arithmetic (a CUDA device that supports it; a CPU with AVX512-BF16
    or AMX), where it is faster; elsewhere emulated bfloat16 would be slower than float32."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private probes of torch.cpu; absent from a build, they count as no
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def refine_codebooks(
    model: nn.Module,
    cm: CompressedModel,
    calib: Calibration | torch.Tensor,
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
        calib: calibration inputs, no labels (:class:`~legonet.calibrate.data.Calibration`, or a
            tensor ``(N, ...)``), on any device (moved to the model's). Where they are samples of
            one tensor (images), every step draws ``batch_size`` of them at random (with flips and
            boundary views for images); other inputs (tuples, dicts: a language model's ids and
            mask) are refined on batch by batch, in a seeded random order.
        progress: optional ``progress(step, steps, loss)`` callback.
        say: optional callback for one-line messages (batches run in chunks, the boundary views made
            or why none were).
    Returns:
        A :class:`RefineResult`.
    """
    cfg = config or RefineConfig()
    say = say or (lambda _message: None)
    calib = Calibration.of(calib, cfg.batch_size)
    clustered = cm.clustered
    if not clustered:
        raise ConfigError("nothing to refine: the model has no clustered tensor")
    teacher = model
    device = model_device(model)
    samples = calib.stacked()
    samples = None if samples is None else samples.to(device)
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

    n = calib.samples
    steps = max(1, math.ceil(cfg.epochs * (n / cfg.batch_size if samples is not None else len(calib.batches))))
    flips = cfg.flip and samples is not None and samples.ndim == 4
    tapped = feature_layer(teacher) if cfg.feature_weight > 0 else None
    # without deterministic kernels two processes refined ResNet-20 to different codebooks (the
    # gradients of convolutions are not bit-reproducible otherwise); scoped, the setting restored
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    taps = FeatureTaps(teacher, student, tapped)  # removed in ``finally``: the teacher is the caller's model
    try:
        half = uses_bfloat16(cfg.precision, device)
        chunk = view_chunk = None
        if samples is not None and samples.shape[0] >= 2:
            pair = fast_layout(samples[:2])
            chunk = _chunk_size(student, weights, pair, cfg, half)
            # boundary views take the teacher's gradients in float32: twice a bfloat16 pass's bytes
            view_chunk = _chunk_size(student, weights, pair, cfg, False) if half else chunk
            if chunk < cfg.batch_size:
                say(f"batches of {cfg.batch_size} run in chunks of {chunk} (their activations would pass "
                    f"activation_mib={cfg.activation_mib:,} otherwise)")
        # what the steps draw from: the samples and their boundary views, or the batches as given
        pool, skipped = samples, None
        if samples is None and cfg.boundary_share > 0:
            skipped = "the calibration inputs are not samples of one floating-point tensor"
            say(f"no boundary views: {skipped}")
        elif samples is not None and cfg.boundary_share > 0:
            pool, skipped = _with_boundary_views(teacher, samples, cfg, say, view_chunk or cfg.batch_size)
        n_pool = pool.shape[0] if pool is not None else len(calib.batches)
        # Teacher outputs computed once (for each image and its mirror) when the run sees every image
        # more than once and the outputs are small (classifier logits); otherwise per step.
        cached = None
        if pool is not None and steps * cfg.batch_size > (2 if flips else 1) * n_pool:
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
            if pool is None:  # the user's batches, whole
                batch = batch_to(calib.batches[int(order[pos])], device)
                pos += 1
                target, target_features = None, None
            else:
                # the draws stay on the CPU generator (the same sequence on every device)
                idx = order[pos : pos + cfg.batch_size]
                pos += cfg.batch_size
                flip = torch.rand(idx.shape[0], generator=gen) < 0.5 if flips else torch.zeros(idx.shape[0], dtype=torch.bool)
                idx, flip = idx.to(device), flip.to(device)
                x = pool[idx]
                if flips:
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                batch = fast_layout(x)
                if cached is not None:
                    target = cached[0][flip.long(), idx]
                    target_features = None if cached[1] is None else cached[1][flip.long(), idx]
            if cached is None:
                with torch.no_grad():
                    target = run_model(teacher, batch)
                target_features = taps.teacher
            opt.zero_grad(set_to_none=True)
            loss, fell_back = 0.0, False
            # a batch whose activations would not fit cfg.activation_mib runs in chunks, the
            # gradients accumulated (each chunk's loss weighted by its share of the batch)
            parts = [slice(None)] if chunk is None or batch.shape[0] <= chunk else \
                [slice(s, s + chunk) for s in range(0, batch.shape[0], chunk)]
            for part in parts:
                piece = batch[part] if len(parts) > 1 else batch
                args, kwargs = (piece, {}) if isinstance(piece, tuple) else ((), piece) if isinstance(piece, Mapping) \
                    else ((piece,), {})
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                    out = output_tensor(functional_call(student, weights(), args, kwargs, strict=False))
                part_loss = distill_loss(out.float(), target[part], cfg.loss)
                if target_features is not None:
                    term, fell = feature_term(taps.student.float(), target_features[part], cfg.feature_weight,
                                              cfg.feature_gate, cfg.feature_fallback)
                    part_loss, fell_back = part_loss + term, fell_back or fell
                if not torch.isfinite(part_loss):
                    raise ConfigError(f"refinement diverged at step {step + 1} (loss {float(part_loss)}); lower the lr")
                if len(parts) > 1:
                    part_loss = part_loss * (out.shape[0] / batch.shape[0])
                part_loss.backward()
                loss = loss + part_loss.detach()
            fallbacks += fell_back
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
            last = float(loss)
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
    views = pool.shape[0] - n if pool is not None else 0
    return RefineResult(steps, first, last, time.perf_counter() - t0, n_tuned, tapped, fallbacks, views, skipped)


def _with_boundary_views(teacher: nn.Module, calib: torch.Tensor, cfg: RefineConfig,
                         say: Callable[[str], None], batch_size: int) -> tuple[torch.Tensor, str | None]:
    """``(images followed by their boundary views, None)``, or ``(images, why none were made)``."""
    with torch.no_grad():
        probe = teacher(calib[:1])
    why = views_unsupported(calib, probe)
    if why is not None:
        say(f"no boundary views: {why}")
        return calib, why
    made = boundary_views(teacher, calib, cfg.boundary_share, batch_size)
    say(f"boundary views of {calib.shape[0]} images (share {cfg.boundary_share:g}): the original's median "
        f"top-1 margin {made.margin_before:.2f} -> {made.margin_after:.2f}, median shift "
        f"{100 * made.relative_shift:.1f} % of the image")
    return torch.cat([calib, made.views]), None


def _chunk_size(student: nn.Module, weights: Callable[[], dict[str, torch.Tensor]], pair: torch.Tensor,
                cfg: RefineConfig, half: bool) -> int:
    """How many samples one forward and backward pass may take so that the tensors saved for the
    backward pass stay within ``cfg.activation_mib`` (at least 1): the bytes saved for one sample,
    measured as the difference between passes of two samples and of one (``pair``: ``(2, ...)``),
    in bfloat16 where ``half``."""
    def saved(x: torch.Tensor) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=half):
            functional_call(student, weights(), (x,), strict=False)
        return total

    per_sample = max(1, saved(pair) - saved(pair[:1]))
    fits = max(1, (cfg.activation_mib << 20) // per_sample)
    parts = -(-cfg.batch_size // fits)
    return -(-cfg.batch_size // parts)  # chunks of equal size: 64 images as 22 + 22 + 20, not 26 + 26 + 12


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
