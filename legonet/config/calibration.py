"""Settings of the calibrated pipeline's data-driven steps: :class:`LayerFitConfig` (the fit of
codebooks and gains to layer outputs) and :class:`RefineConfig` (codebook refinement by distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from legonet.config.base import from_dict
from legonet.errors import ConfigError

# how the calibrated pipeline re-estimates BatchNorm statistics (legonet.calibrate.bn)
NORM_STATISTICS = ("relative", "replace")
# refinement's distillation loss on the outputs (legonet.calibrate.distill)
LOSSES = ("kl", "mse")
# how refinement weighs its feature term (RefineConfig.feature_gate)
FEATURE_GATES = ("explained", "none")
# what refinement's feature term does where its gate closes (RefineConfig.feature_fallback)
FEATURE_FALLBACKS = ("cosine", "none")
# precision of refinement's passes (RefineConfig.precision)
PRECISIONS = ("auto", "float32", "bfloat16")
# refinement's learning-rate schedule (RefineConfig.schedule)
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class LayerFitConfig:
    """Settings of the layer-output fit.

    Attributes:
        rounds: alternations of (index assignment, codebook fit, gain fit).
        reassign: choose the block indices again at the start of every round, with error feedback
            under ``H`` (:mod:`legonet.ops.error_feedback`), instead of keeping those clustering chose.
        cg_iters: conjugate-gradient steps per codebook fit.
        damp: ``H + damp * mean(diag H) * I``: a ridge toward the plain weight error. GPTQ damps
            by 0.01 only so that ``H`` can be inverted; here the ridge also hedges against what the
            fit cannot see: ``H`` is measured on the original network's inputs, and the compressed
            network feeds each layer other inputs, with energy in directions the original's barely
            take. ResNet-50 at 64x, no refinement, KL to the original on 1,024 held-out calibration
            images: damp 0.01 / 0.1 / 0.3 / 1.0 -> 0.53 / 0.36 / 0.27 / 0.27 (more samples per
            ``H`` did not help: the estimate is not what is wrong; docs/design-notes.md).
        rows_per_batch: input positions per calibration batch entering each ``H``.
        output_allocation: rank target mode's menu entries by relative output error under ``H``
            (:func:`legonet.target.evaluate_menu`) instead of the moment-weighted weight error.
        propagate: once BatchNorm statistics are re-estimated, fit every layer again to what it
            must output given the inputs the *compressed* network feeds it (one more pass of both
            networks over the calibration images, and one more re-estimation;
            :func:`legonet.calibrate.layer_fit.propagated_targets`), so that each layer repairs part
            of what the layers before it got wrong. Off by default: on EfficientNet-Lite it gained
            about a point at 12x, at the size of the change one tensor's fit makes, ResNet-20/56
            were level and ResNet-50 at 64x lost 0.17 point, for 30-60 % more time
            (docs/method.md 9.6).
        propagate_damp: the ridge (as ``damp``) of that second fit. All layers are fitted in one
            pass, each to inputs measured before the layers feeding it were fitted too, so a
            correction is partly made twice; a stronger pull toward the original weights than
            ``damp`` keeps that in check (EfficientNet-Lite1 at 12x, no refinement, agreement with
            the original on 450 photos: 82.22 % without the second fit, 78.44 % with ridge 0.3,
            83.11 % with 1.0).
    """

    rounds: int = 2
    reassign: bool = True
    cg_iters: int = 20
    damp: float = 0.3
    rows_per_batch: int = 512
    output_allocation: bool = True
    propagate: bool = False
    propagate_damp: float = 1.0

    def __post_init__(self) -> None:
        for key in ("rounds", "cg_iters", "rows_per_batch"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"layer fit {key} must be a positive integer, got {v!r}")
        for key in ("output_allocation", "reassign", "propagate"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"layer fit {key} must be a bool, got {getattr(self, key)!r}")
        for key in ("damp", "propagate_damp"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(f"layer fit {key} must be in [0, 1], got {v!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerFitConfig":
        """Build from a plain mapping (e.g. a parsed recipe); unknown keys are errors."""
        return from_dict(cls, data, "layer fit config")


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
        precision: ``"auto"``, ``"float32"`` or ``"bfloat16"``: the student's forward and backward
            passes under ``torch.autocast`` in bfloat16 (its matrix products and convolutions); the
            tuned parameters, their Adam state, the losses and the teacher's outputs stay float32.
            ``"auto"`` (the default) is bfloat16 where the hardware has native bfloat16 arithmetic
            (:func:`legonet.calibrate.refine.uses_bfloat16`), float32 elsewhere. On a 2-core
            AVX512-BF16 CPU it roughly halves refinement's time at the same accuracy: ResNet-50
            64x, 120 steps in 216 s instead of 413 s, 88.74 % against 88.85 % on all 10,000 test
            images; see docs/results.md for EfficientNet-Lite1 and ResNet-20.
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
        activation_mib: memory (MiB) the tensors one forward pass saves for its backward pass may
            take; a batch that would need more runs in chunks, gradients accumulated (the loss of
            each chunk, feature term and gate included, weighted by its share of the batch), and
            boundary views are made chunk by chunk. The saved bytes per sample are measured on two
            calibration samples before refinement. Saved per image: ResNet-20 2.2 MiB, ResNet-50 on
            32x32 inputs 37 MiB (64 images: 2.3 GiB, one chunk), EfficientNet-Lite1 at 240x240
            118 MiB in float32 (64 images: 7.4 GiB; three chunks of 22), half that in bfloat16 passes
            (two chunks of 32).
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
    precision: str = "auto"
    flip: bool = True
    tune_norms: bool = True
    boundary_share: float = 0.5
    activation_mib: int = 3072
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, (int, float)) or not 0 < self.epochs <= 1000:
            raise ConfigError(f"refine epochs must be in (0, 1000], got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"refine batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.activation_mib, int) or isinstance(self.activation_mib, bool) or self.activation_mib < 1:
            raise ConfigError(f"refine activation_mib must be a positive integer, got {self.activation_mib!r}")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefineConfig":
        """Build from a plain mapping (e.g. a parsed recipe); unknown keys are errors."""
        return from_dict(cls, data, "refine config")
