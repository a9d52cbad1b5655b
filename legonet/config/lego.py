"""The block-clustering settings: :class:`LegoConfig` (the paper's method and its plain
extensions) and :class:`KMeansConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from legonet.config.base import from_dict as _from_dict
from legonet.errors import ConfigError

SCOPES = ("model", "layer")
SCALES = ("none", "row")
SCALE_STATS = ("rms", "absmax")
KEPT_DTYPES = ("keep", "float16")
INITS = ("k-means++", "random")
CODEBOOK_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class KMeansConfig:
    """k-means settings.

    Attributes:
        init: ``"k-means++"`` (greedy k-means++ seeding) or ``"random"``.
        max_iters: cap on Lloyd iterations.
        tol: stop when the relative change of the inertia falls below this.
        max_fit_points: fit the centroids on a seeded uniform sample of at most this many blocks
            (``None``: all); every block is assigned to its nearest centroid afterwards. Most of the
            fit runs on a smaller importance-sampled working set drawn from this sample; the sample
            itself is only swept by a few final Lloyd iterations.
    """

    init: str = "k-means++"
    max_iters: int = 100
    tol: float = 1e-4
    max_fit_points: int | None = 1 << 21

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"kmeans.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ConfigError(f"kmeans.max_iters must be an integer >= 1, got {self.max_iters!r}")
        if not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise ConfigError(f"kmeans.tol must be in [0, 1), got {self.tol!r}")
        if self.max_fit_points is not None and (not isinstance(self.max_fit_points, int) or self.max_fit_points < 1):
            raise ConfigError(f"kmeans.max_fit_points must be a positive integer or None, got {self.max_fit_points!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KMeansConfig":
        return _from_dict(cls, data, "kmeans config")


def _as_block(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"block must be an int b or a pair (rows, cols), got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ConfigError(f"block sides must be >= 1, got {tuple(value)}")
    if value[0] * value[1] > 4096:
        raise ConfigError(f"block {tuple(value)} has more than 4096 elements")
    return (int(value[0]), int(value[1]))


def _as_patterns(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{name} must be a list of non-empty glob patterns, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class LegoConfig:
    """How to compress a model by block weight clustering.

    Attributes:
        block: block shape ``(rows, cols)``; an int ``b`` means ``(b, b)``.
        clusters: K, the number of centroids per codebook (indices take ``ceil(log2 K)`` bits).
        scope: ``"model"`` (one codebook for every clustered tensor, the paper's method) or
            ``"layer"`` (one codebook per tensor).
        include: glob patterns (``fnmatch``) of tensor names eligible for clustering. Only floating
            tensors with 2 or more dimensions are clustered; the rest are stored as they are.
        exclude: glob patterns of tensor names never clustered (stored as they are). Every
            pattern in ``include``/``exclude`` other than ``"*"`` must match some tensor.
        seed: seed of every random choice.
        scales: ``"none"`` (the paper) or ``"row"``: gain-shape clustering, each row of a tensor's 2-D
            view is divided by its RMS before tiling and multiplied back after decoding; the gains are
            stored as float16 (2 bytes per output channel).
        scale_stat: what a row's gain is before clustering (with ``scales="row"``): ``"rms"`` or
            ``"absmax"`` (each row's largest magnitude, so every row spans [-1, 1] like int4's grid).
        unshrink: with ``scales="row"``, after clustering multiply each row's gain by
            ``|w|^2 / <w, w_hat>`` (weighted by the element weights when given). Centroids are
            conditional means, so the reconstruction is shorter than the row
            (``|w_hat|^2 = |w|^2 - |w - w_hat|^2``); with normalisation statistics frozen that
            shrink compounds layer after layer. The correction costs no byte (the gain is stored anyway).
        codebook_dtype: storage dtype of the codebook(s), ``"float32"`` or ``"float16"``.
        kept_dtype: ``"keep"`` stores unclustered tensors as they are; ``"float16"`` stores floating
            ones (biases, norm parameters, statistics) in float16.
        kmeans: :class:`KMeansConfig`.
        allow_nonfinite: keep tensors holding NaN or Inf as they are (uncompressed) instead of
            refusing the model; the default refuses, naming the tensor.
        compact_storage: write the file's metadata zlib-compressed and store the row gains and
            codebook of every tensor clustered with an SQNR of at most 12 dB in 8 bits (log-coded
            gains, int8 codebooks; see :mod:`legonet.compact`): format version 3, which earlier
            legonet versions cannot read. Target mode always does (choosing the tensors by their planned error).
        entropy_coding: write each tensor's indices entropy-coded by their own frequencies
            (:mod:`legonet.ops.rans`) where that is smaller than bit-packing them: format version 4,
            which earlier legonet versions cannot read. Target mode always does, and plans with it.
    """

    block: tuple[int, int] = (4, 4)
    clusters: int = 32
    scope: str = "model"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    seed: int = 0
    scales: str = "none"
    scale_stat: str = "rms"
    unshrink: bool = False
    codebook_dtype: str = "float32"
    kept_dtype: str = "keep"
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    allow_nonfinite: bool = False
    compact_storage: bool = False
    entropy_coding: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", _as_block(self.block))
        object.__setattr__(self, "include", _as_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _as_patterns(self.exclude, "exclude"))
        if isinstance(self.kmeans, dict):
            object.__setattr__(self, "kmeans", KMeansConfig.from_dict(self.kmeans))
        if not isinstance(self.kmeans, KMeansConfig):
            raise ConfigError(f"kmeans must be a KMeansConfig or a mapping, got {type(self.kmeans).__name__}")
        if not isinstance(self.clusters, int) or isinstance(self.clusters, bool) or not 1 <= self.clusters <= 1 << 16:
            raise ConfigError(f"clusters (K) must be an integer in 1..65536, got {self.clusters!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.scales not in SCALES:
            raise ConfigError(f"scales must be one of {SCALES}, got {self.scales!r}")
        if self.scale_stat not in SCALE_STATS:
            raise ConfigError(f"scale_stat must be one of {SCALE_STATS}, got {self.scale_stat!r}")
        if not isinstance(self.unshrink, bool):
            raise ConfigError(f"unshrink must be true or false, got {self.unshrink!r}")
        if self.scales != "row" and (self.scale_stat != "rms" or self.unshrink):
            raise ConfigError("scale_stat and unshrink apply to row gains only; set scales='row'")
        if not isinstance(self.allow_nonfinite, bool):
            raise ConfigError(f"allow_nonfinite must be true or false, got {self.allow_nonfinite!r}")
        if not isinstance(self.compact_storage, bool):
            raise ConfigError(f"compact_storage must be true or false, got {self.compact_storage!r}")
        if not isinstance(self.entropy_coding, bool):
            raise ConfigError(f"entropy_coding must be true or false, got {self.entropy_coding!r}")
        if self.kept_dtype not in KEPT_DTYPES:
            raise ConfigError(f"kept_dtype must be one of {KEPT_DTYPES}, got {self.kept_dtype!r}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ConfigError(f"codebook_dtype must be one of {CODEBOOK_DTYPES}, got {self.codebook_dtype!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LegoConfig":
        """Build from a plain mapping (e.g. parsed JSON); unknown keys are errors."""
        return _from_dict(cls, data, "legonet config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block"] = list(self.block)
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        return d
