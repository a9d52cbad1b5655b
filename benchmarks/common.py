"""Shared pieces of the benchmark: models and data, size accounting, cached evaluation.

Models and data come from the shared fixtures directory (``$LEGONET_SHARED``, default ``../shared``
beside the repository), except ``resnet20-bundled``, which uses the ResNet-20 weights and the
1,000-image test subset shipped in ``legonet/data`` so that a smoke run needs nothing else.

Every measurement goes through :meth:`Bench.measure`, which caches one JSON record per
``(method, setting, images, subset seed)`` in ``benchmarks/results/cache/<model>.json``; a rerun
only computes what is missing. Accuracies are measured on a seeded random subset of the test set
(the same subset for every method of one model, so differences between methods are paired) and
carry a 95 % Wilson interval.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from legonet.artifact import load_weights
from legonet.data import ImageSet, load_images, to_input
from legonet.errors import DataError
from legonet.evaluate import wilson_interval
from legonet.io.atomic import atomic_path
from legonet.io.checkpoints import read_state_dict
from legonet.report import fp32_bytes  # noqa: F401  (re-exported: the benchmark's byte baseline)
from legonet.zoo import ArchSpec, get_arch

REPO = Path(__file__).resolve().parents[1]
SUBSET_SEED = 0


def shared_dir() -> Path:
    """``$LEGONET_SHARED`` or ``../shared`` beside the repository."""
    return Path(os.environ.get("LEGONET_SHARED", REPO.parent / "shared"))


def bundled(name: str) -> Path:
    return Path(str(resources.files("legonet") / "data" / name))


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: where its weights and test images are, and the sweep subset size."""

    name: str
    arch: str
    weights: Callable[[], Path]
    test_data: Callable[[], Path]
    sweep_images: int
    jit: bool = False  # evaluate traced + frozen (see Bench.hits): pays off on large models only

    def available(self) -> bool:
        return self.weights().exists() and self.test_data().exists()


def _shared(rel: str) -> Callable[[], Path]:
    return lambda: shared_dir() / rel


MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("resnet20", "resnet20", _shared("models/resnet20_cifar10.safetensors"),
                          _shared("data/cifar10-test.npz"), 1000),
    "resnet56": ModelSpec("resnet56", "resnet56", _shared("models/resnet56_cifar10.safetensors"),
                          _shared("data/cifar10-test.npz"), 500),
    # ~10x ResNet-56's compute per image: its sweeps use fewer images (wider intervals, stated in every row)
    "resnet50": ModelSpec("resnet50", "resnet50_cifar", _shared("models/resnet50_cifar10.safetensors.index.json"),
                          _shared("data/cifar10-test.npz"), 200, jit=True),
    # Needs nothing outside the repository: the smoke run (--quick) and the tests use it.
    "resnet20-bundled": ModelSpec("resnet20-bundled", "resnet20", lambda: bundled("resnet20_cifar10.safetensors"),
                                  lambda: bundled("cifar10-test-1000.npz"), 1000),
}


def subset_index(total: int, n: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices of :meth:`legonet.data.ImageSet.subset` (``n`` of ``total`` images, seeded), sorted."""
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def pack_hits(hits: np.ndarray) -> str:
    """Per-image correctness (bool ``(n,)``) as base64 of its packed bits, for the JSON cache."""
    return base64.b64encode(np.packbits(hits.astype(bool)).tobytes()).decode("ascii")


def unpack_hits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def calib_path() -> Path:
    return shared_dir() / "data" / "cifar10-calib.npz"


# -- size accounting -------------------------------------------------------------------------------


def num_weights(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in sd.values())


def sqnr_stats(original: Mapping[str, torch.Tensor], approx: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Data-free weight error over the >= 2-D floating tensors, in dB (100 dB: exact).

    * ``sqnr_layer_db``: ``-10 log10(mean_i |e_i|^2 / |w_i|^2)``, the noise-to-signal ratio averaged
      over tensors, so every layer counts equally whatever its size (a layer whose weights collapse
      hurts the network whatever its size) and an exact tensor adds no noise. This is the
      criterion of the arrangement search.
    * ``sqnr_mean_db``: the mean of per-tensor SQNRs in dB, exact tensors capped at 100 dB.
    * ``sqnr_global_db``: total signal over total noise.
    """
    per, nsr, sig, noise = [], [], 0.0, 0.0
    for name, w in original.items():
        if w.ndim < 2 or not w.is_floating_point():
            continue
        x = w.double()
        e = float(((x - approx[name].double()) ** 2).sum())
        s = max(float((x * x).sum()), 1e-300)
        sig, noise = sig + s, noise + e
        nsr.append(e / s)
        per.append(100.0 if e == 0 else min(100.0, 10 * math.log10(s / e)))

    def db(r: float) -> float:
        return 100.0 if r <= 1e-10 else -10 * math.log10(r)

    return {
        "sqnr_layer_db": db(sum(nsr) / max(1, len(nsr))),
        "sqnr_mean_db": sum(per) / max(1, len(per)),
        "sqnr_global_db": db(noise / sig) if sig else 100.0,
    }


# -- methods ---------------------------------------------------------------------------------------
@dataclass
class MethodOutput:
    """What a compression method returns.

    Attributes:
        state_dict: dense weights to evaluate (same names and shapes as the input).
        file_bytes: bytes of the compressed model, counted as described in the method's docstring.
        info: JSON-able extras (e.g. the breakdown of the bytes).
    """

    state_dict: dict[str, torch.Tensor]
    file_bytes: int
    info: dict[str, Any] = field(default_factory=dict)


# (state_dict, arch, calib_images or None, **setting) -> MethodOutput
MethodFn = Callable[..., MethodOutput]


def _traced(model: torch.nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` traced on ``example``, frozen and optimised for inference; ``model`` itself if it
    cannot be traced (the evaluation must not depend on it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow
            return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    except Exception:  # noqa: BLE001 - any tracing failure: evaluate eagerly
        return model


# -- the cached harness ----------------------------------------------------------------------------
class NotMeasured(LookupError):
    """A measurement absent from the cache of a bench in ``cached_only`` mode."""


class Bench:
    """One model: its weights, test images, calibration images and the cache of measurements.

    Args:
        name: the model's name (cache file name).
        state_dict: the uncompressed weights, dtype as stored.
        arch: the architecture to evaluate with.
        test: labelled test images.
        cache_dir: where ``<name>.json`` lives (``None``: no cache).
        calib: optional calibration images (never test images).
        methods: name -> :data:`MethodFn` registry.
        log: optional callback for one-line progress messages.
        cached_only: never compute; :meth:`measure` raises :class:`NotMeasured` for what the
            cache lacks (to rebuild tables from a partial run).
        jit: evaluate the traced, frozen model (see :meth:`hits`).
    """

    def __init__(self, name: str, state_dict: dict[str, torch.Tensor], arch: ArchSpec, test: ImageSet,
                 cache_dir: Path | None, methods: Mapping[str, MethodFn], calib: ImageSet | None = None,
                 log: Callable[[str], None] | None = None, cached_only: bool = False, jit: bool = False):
        self.cached_only, self.jit = cached_only, jit
        self.name, self.sd, self.arch, self.test, self.calib = name, state_dict, arch, test, calib
        self.methods = methods
        self.log = log or (lambda _m: None)
        self.fp32_bytes = fp32_bytes(state_dict)
        self.num_weights = num_weights(state_dict)
        self.cache_path = None if cache_dir is None else Path(cache_dir) / f"{name}.json"
        self.cache: dict[str, dict] = {}
        if self.cache_path is not None and self.cache_path.exists():
            self.cache = json.loads(self.cache_path.read_text())
        self.computed = 0  # measurements computed (not read from the cache) in this process

    @classmethod
    def from_spec(cls, spec: ModelSpec, cache_dir: Path | None, methods: Mapping[str, MethodFn],
                  log: Callable[[str], None] | None = None, cached_only: bool = False) -> "Bench":
        if not spec.available():
            raise DataError(f"{spec.name}: weights or test data missing ({spec.weights()}, {spec.test_data()}); "
                            "set LEGONET_SHARED")
        calib = load_images(calib_path(), labels=True) if calib_path().exists() else None
        return cls(spec.name, read_state_dict(spec.weights()), get_arch(spec.arch), load_images(spec.test_data()),
                   cache_dir, methods, calib, log, cached_only, spec.jit)

    # -- evaluation ------------------------------------------------------------------------------
    def images(self, n: int | None) -> ImageSet:
        return self.test.subset(n, SUBSET_SEED)

    @torch.inference_mode()
    def hits(self, sd: Mapping[str, torch.Tensor], images: ImageSet, batch_size: int = 200) -> np.ndarray:
        """Per-image correctness ``(n,)`` bool of the model with weights ``sd`` (top-1 is its mean).

        With ``jit`` the model is traced, frozen and optimised for inference (BatchNorm folded into
        the convolutions): 1.5x faster than eager PyTorch for ResNet-50 on this CPU (slower for
        ResNet-20, where tracing costs more than it saves), the same arithmetic up to float
        rounding, for the baseline and every compressed model alike. Models that cannot be traced
        run eagerly.
        """
        model = self.arch.build()
        load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        model.eval()

        def batches():
            for s in range(0, len(images), batch_size):
                yield to_input(images.x[s : s + batch_size], self.arch.mean, self.arch.std)

        fast = _traced(model, next(batches())[:2]) if self.jit else model
        out = [fast(x).argmax(1).numpy() for x in batches()]
        return np.concatenate(out) == images.y

    def top1(self, sd: Mapping[str, torch.Tensor], images: ImageSet) -> float:
        return float(self.hits(sd, images).mean())

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_path) as tmp:
            Path(tmp).write_text(json.dumps(self.cache, indent=1, sort_keys=True))

    @staticmethod
    def key(method: str, setting: Mapping[str, Any], n_images: int | None) -> str:
        return json.dumps([method, dict(setting), n_images, SUBSET_SEED], sort_keys=True)

    def measure(self, method: str, setting: Mapping[str, Any] | None = None, n_images: int | None = 0,
                on: str = "test") -> dict:
        """Compress with ``method(**setting)`` and evaluate on ``n_images`` test images (cached).

        ``n_images=None`` evaluates on every test image, ``0`` does not evaluate (sizes and SQNR
        only). Method ``"fp32"`` is the uncompressed model. Returns the record: ``file_bytes``,
        ``ratio`` (fp32 bytes / file bytes), ``bits_per_weight`` (file bits / every element of the
        model), SQNRs, ``top1``, ``n``, ``ci95`` and the method's ``info``. ``on="calib"`` evaluates on
        the calibration images instead (for data-driven selection; never test images).
        """
        if on not in ("test", "calib"):
            raise ValueError(f"on must be 'test' or 'calib', got {on!r}")
        if on == "calib" and self.calib is None:
            raise DataError("no calibration images (cifar10-calib.npz) for a data-driven criterion")
        pool = self.test if on == "test" else self.calib
        setting = dict(setting or {})
        if n_images is not None and n_images >= len(pool):
            n_images = None  # the whole set: one cache entry however it was asked for
        k = self.key(method, setting, n_images) + ("" if on == "test" else "@calib")
        if k in self.cache:
            return self.cache[k]
        derived = self._derive(method, setting, n_images) if on == "test" else None
        if derived is not None:
            self.cache[k] = derived
            self._save()
            return derived
        if self.cached_only:
            raise NotMeasured(f"{self.name}: {method} {setting} on {n_images} {on} images is not in the cache")
        t0 = time.perf_counter()
        if method == "fp32":
            out = MethodOutput(self.sd, self.fp32_bytes, {})
        else:
            out = self.methods[method](self.sd, self.arch, self.calib, **setting)
        t1 = time.perf_counter()
        rec: dict[str, Any] = {
            "model": self.name, "method": method, "setting": setting, "file_bytes": int(out.file_bytes),
            "fp32_bytes": self.fp32_bytes, "ratio": self.fp32_bytes / out.file_bytes,
            "bits_per_weight": 8.0 * out.file_bytes / self.num_weights, "info": out.info,
            "compress_s": round(t1 - t0, 2), **sqnr_stats(self.sd, out.state_dict),
        }
        if n_images != 0:
            images = pool.subset(n_images, SUBSET_SEED)
            hits = self.hits(out.state_dict, images)
            acc = float(hits.mean())
            lo, hi = wilson_interval(acc, len(images))
            rec.update(on=on, top1=acc, n=len(images), correct=int(hits.sum()), ci95=[lo, hi],
                       eval_s=round(time.perf_counter() - t1, 2))
            if on == "test" and n_images is None:
                # Kept so that any seeded subset's accuracy is read off this evaluation (see _derive).
                rec["hits"] = pack_hits(hits)
        self.cache[k] = rec
        self.computed += 1
        self._save()
        acc_s = f"top1 {rec['top1'] * 100:.2f} % on {rec['n']}" if "top1" in rec else "not evaluated"
        self.log(f"{self.name} {method} {setting}: {rec['ratio']:.1f}x, {rec['bits_per_weight']:.3f} bpw, "
                 f"SQNR {rec['sqnr_mean_db']:.2f} dB, {acc_s} ({rec['compress_s']:.0f} s + {rec.get('eval_s', 0):.0f} s)")
        return rec

    def _derive(self, method: str, setting: Mapping[str, Any], n_images: int | None) -> dict | None:
        """A subset (or size-only) record read off a cached whole-test-set evaluation, if there is one.

        The subset is a fixed set of test images, so its accuracy under a given compressed model is
        exactly the mean of that model's per-image hits over those images: no second compression
        or evaluation is needed (the headline's points are also Fig. 4's points this way).
        """
        full = self.cache.get(self.key(method, setting, None))
        if full is None or "hits" not in full or n_images is None:
            return None
        rec = {k: v for k, v in full.items() if k not in ("hits", "top1", "n", "correct", "ci95", "eval_s", "on")}
        rec.update(compress_s=0.0, derived_from=full["n"])
        if n_images == 0:
            return rec
        hits = unpack_hits(full["hits"], full["n"])[subset_index(full["n"], n_images)]
        acc = float(hits.mean())
        lo, hi = wilson_interval(acc, len(hits))
        rec.update(on="test", top1=acc, n=len(hits), correct=int(hits.sum()), ci95=[lo, hi], eval_s=0.0)
        return rec
