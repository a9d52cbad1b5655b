"""The compressed model: codebooks, per-tensor indices and the tensors kept as they are.

:class:`CompressedModel` is what :func:`legonet.compress` returns and :func:`legonet.load` reads back.
It reconstructs dense weights on demand (``to_state_dict``), loads them into a module
(``load_into``), writes a .lego file (``save``) and describes itself (``report``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from legonet.aliases import with_aliases
from legonet.config import LegoConfig
from legonet.errors import ArchitectureError
from legonet.ops.quant import dequantize
from legonet.ops.rans import index_stream
from legonet.ops.tiling import Tiling, make_tiling
from legonet.runlog import RunLog

# A fill may hold at most MAX_FILL elements, MAX_FILL_TOTAL in one file: the reader allocates them
# from a few bytes of metadata, so their size must be bounded (BatchNorm statistics need far less).
MAX_FILL = 1 << 22
MAX_FILL_TOTAL = 1 << 24


def constant_fill(t: torch.Tensor) -> float | None:
    """The value of a floating tensor of 2 to :data:`MAX_FILL` elements that all equal one finite
    value, else None.

    Such kept tensors are written to a .lego file as that one value (a "fill"), not element by
    element: e.g. the running statistics of BatchNorm layers in inference form
    (:func:`legonet.datafree.fold_norms.fold_batchnorm_statistics`).
    """
    if not t.is_floating_point() or not 2 <= t.numel() <= MAX_FILL:
        return None
    flat = t.reshape(-1)
    v = flat[0]
    if not bool(torch.isfinite(v)) or not bool((flat == v).all()):
        return None
    return float(v)


def fills(tensors: Mapping[str, object]) -> dict[str, float]:
    """``{name: value}`` of the kept tensors a .lego file stores as fills, in order, until their
    elements would pass :data:`MAX_FILL_TOTAL` (later constant tensors are stored densely)."""
    out, total = {}, 0
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (v := constant_fill(t)) is not None and total + t.numel() <= MAX_FILL_TOTAL:
            out[name] = v
            total += t.numel()
    return out


@dataclass
class ClusteredTensor:
    """One tensor stored as centroid indices.

    Attributes:
        shape: original shape.
        dtype: original dtype (the reconstruction is cast back to it).
        block: (b_r, b_c) block shape.
        codebook: index into :attr:`CompressedModel.codebooks`.
        indices: ``(num_blocks,)`` int64, one centroid index per block in tiling order.
        sqnr_db: signal-to-quantization-noise ratio of the reconstruction, measured at compression.
        scale: optional ``(shape[0],)`` float32 per-row gains (gain-shape clustering): the blocks
            index the *normalised* rows and row ``r`` of the 2-D view is multiplied by ``scale[r]``.
        gain_code: ``(lo, step)`` when the gains are stored as 8-bit log codes
            (:mod:`legonet.ops.scalar_codes`; ``scale`` then holds exactly the decoded values),
            None when they are stored as float16.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    block: tuple[int, int]
    codebook: int
    indices: torch.Tensor
    sqnr_db: float | None = None
    scale: torch.Tensor | None = None
    gain_code: tuple[float, float] | None = None

    @property
    def tiling(self) -> Tiling:
        return make_tiling(self.shape, self.block)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class CompressedModel:
    """A model compressed by block weight clustering.

    Attributes:
        config: the :class:`LegoConfig` used.
        codebooks: list of ``(K, b_r*b_c)`` float32 tensors (values exactly as stored in the file).
        tensors: every tensor of the original state dict, in its original order: either a
            :class:`ClusteredTensor` or a dense ``torch.Tensor`` kept as it was.
        codebook_scales: ``{codebook index: scale}`` of the codebooks stored as int8 values times a
            float32 scale (:mod:`legonet.ops.scalar_codes`; those codebooks hold exactly the
            decoded values); the others are stored in ``config.codebook_dtype``.
        source_dtypes: ``{name: dtype}`` of the kept tensors stored in a narrower dtype than the
            input had (``config.kept_dtype="float16"``, as target mode does): the dense
            reconstruction is cast back to it, so a decompressed checkpoint has the input's dtypes.
        aliases: ``{alias: source}``: further names of a tensor the input listed under several
            (tied weights, e.g. an output head sharing the token embedding), which is in
            ``tensors`` once, under ``source`` (:mod:`legonet.aliases`). The dense reconstruction
            lists it under every name.
    """

    config: LegoConfig
    codebooks: list[torch.Tensor]
    tensors: dict[str, ClusteredTensor | torch.Tensor] = field(default_factory=dict)
    codebook_scales: dict[int, float] = field(default_factory=dict)
    source_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # what the run that made it did (not stored in the file): see legonet.runlog
    log: RunLog | None = field(default=None, repr=False, compare=False)
    # each clustered tensor's coded index stream with a digest of the indices it codes: the writer,
    # the report and target mode's budget steps ask for the same streams several times, and coding
    # them is most of serialising (ResNet-50: about 3 s a time)
    _streams: dict[str, tuple[tuple, tuple[bytes, bool]]] = field(default_factory=dict, init=False, repr=False,
                                                                  compare=False)

    # -- views -----------------------------------------------------------------------------------
    @property
    def clustered(self) -> dict[str, ClusteredTensor]:
        return {k: v for k, v in self.tensors.items() if isinstance(v, ClusteredTensor)}

    @property
    def dense(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if isinstance(v, torch.Tensor)}

    def reconstruct(self, name: str) -> torch.Tensor:
        """Dense tensor ``name`` (or an alias of it): centroids gathered by index and untiled
        (original shape and dtype)."""
        name = self.aliases.get(name, name)
        t = self.tensors[name]
        if isinstance(t, torch.Tensor):
            return t.to(self.source_dtypes.get(name, t.dtype))
        return dequantize(self.codebooks[t.codebook], t.indices, t.tiling, t.scale).to(t.dtype)

    def adopt_dtypes(self, source: Mapping[str, torch.Tensor]) -> None:
        """Record the dtypes of ``source`` (the checkpoint this model was compressed from) so that
        the reconstruction has them: pipelines that compute in float32 (calibration) or store kept
        tensors in float16 (target mode) would otherwise change them. Clustered tensors take the
        source dtype as theirs; kept tensors keep their stored bytes and are cast on reconstruction."""
        for name, t in self.tensors.items():
            src = source.get(name)
            if not isinstance(src, torch.Tensor) or not src.is_floating_point():
                continue
            if isinstance(t, ClusteredTensor):
                t.dtype = src.dtype
            elif t.is_floating_point() and t.dtype != src.dtype:
                self.source_dtypes[name] = src.dtype
            else:
                self.source_dtypes.pop(name, None)

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """Dense reconstruction of every tensor, same names, shapes and dtypes as the input: a tensor
        with aliases once, listed under its name and then (after every other tensor) each alias."""
        return with_aliases({name: self.reconstruct(name) for name in self.tensors}, self.aliases)

    def load_into(self, module: nn.Module) -> nn.Module:
        """Copy the reconstructed weights into ``module`` (in place) and return it.

        A tensor with aliases is copied under each of its names: into the one parameter they share
        where ``module`` ties them, into each where it does not.

        Raises :class:`ArchitectureError` naming missing/unexpected keys or mismatched shapes.
        """
        load_weights(module, self.to_state_dict())
        return module

    # -- file I/O and reporting --------------------------------------------------------------------
    def index_stream(self, name: str) -> tuple[bytes, bool]:
        """The bytes of clustered tensor ``name``'s index stream as the file stores it, and whether
        they are entropy-coded (:func:`legonet.ops.rans.index_stream`); coded again only when its
        indices, K or the coding setting changed."""
        t = self.tensors[name]
        idx = t.indices.cpu().numpy()
        k = int(self.codebooks[t.codebook].shape[0])
        key = (hashlib.blake2b(idx.tobytes(), digest_size=16).digest(), str(idx.dtype), k, self.config.entropy_coding)
        hit = self._streams.get(name)
        if hit is None or hit[0] != key:
            hit = (key, index_stream(idx, k, self.config.entropy_coding))
            self._streams[name] = hit
        return hit[1]

    def to_bytes(self) -> bytes:
        from legonet.format.lego_file import serialize

        return serialize(self)

    def save(self, path: str | os.PathLike) -> int:
        """Write a .lego file atomically; returns its size in bytes."""
        from legonet.format.lego_file import save

        return save(self, path)

    def report(self):
        """A :class:`legonet.report.Report` with sizes, ratios, bits per weight and per-tensor SQNR."""
        from legonet.report import build_report

        return build_report(self)


def fit_error(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], subject: str,
              arch: str | None = None) -> ArchitectureError | None:
    """The error naming every way the shapes ``given`` disagree with a model's ``own``, or None.

    ``subject`` starts the message, e.g. ``"model.pt: weights do not fit"``.

    BatchNorm's ``num_batches_tracked`` counters may be absent (many checkpoints drop them).
    """
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    bad = [k for k in given if k in own and tuple(given[k]) != tuple(own[k])]
    if not (missing or unexpected or bad):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if bad:
        parts.append(f"{len(bad)} with the wrong shape (e.g. {bad[0]}: {tuple(given[bad[0]])} "
                     f"vs {tuple(own[bad[0]])} in the model)")
    named = f" {arch!r}" if arch else ""
    return ArchitectureError(f"{subject} the architecture{named}: " + "; ".join(parts))


def load_weights(module: nn.Module, sd: dict[str, torch.Tensor], source: str = "weights",
                 arch: str | None = None) -> None:
    """``module.load_state_dict(sd)`` with one clear error for every way the two can disagree
    (naming ``source``, the file, and ``arch``, the architecture's name, where given)."""
    err = fit_error({k: tuple(v.shape) for k, v in module.state_dict().items()},
                    {k: tuple(v.shape) for k, v in sd.items()}, f"{source}: weights do not fit", arch)
    if err is not None:
        raise err
    module.load_state_dict(sd, strict=False)
