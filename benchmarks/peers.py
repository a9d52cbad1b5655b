"""The peers legonet is compared with, all data-free and without fine-tuning.

* ``coreml``: coremltools' ``PostTrainingPalettizer`` (the real library, ``pip install coremltools``),
  scalar (``cluster_dim=1``) or vector (``cluster_dim>1``) palettization, per tensor or per group of
  output channels.
* ``kmeans-layer``: per-layer scalar k-means weight sharing, the clustering step of Deep Compression
  (Han et al. 2016: linear initialisation between min and max, Lloyd iterations), no retraining.
* ``rtn``: round-to-nearest symmetric integers with one scale per output channel.

Sizes are counted at matched rules with legonet (see :func:`count_bytes`): every index at its bit
width, packed per tensor to whole bytes; every lookup-table entry and scale as a float32 (legonet's
default codebook dtype); every tensor a method leaves alone at the bytes it has in the checkpoint
(what a .lego file stores for kept tensors). The .lego container's header and JSON metadata count
against legonet only; peers get no container overhead, which slightly favours them.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from typing import Any

import torch

from legonet.data import ImageSet
from legonet.zoo import ArchSpec

from benchmarks.common import MethodOutput


def count_bytes(sd: Mapping[str, torch.Tensor], quantized: Mapping[str, tuple[int, int, int]]) -> tuple[int, dict]:
    """Bytes of a model of which the tensors in ``quantized`` are stored as indices + tables.

    Args:
        sd: the original state dict (dtypes as stored).
        quantized: name -> ``(index_count, index_bits, float32_values)`` where ``float32_values``
            counts lookup-table entries plus scales.
    Returns:
        total bytes and a breakdown ``{"index_bytes", "table_bytes", "kept_bytes"}``.
    """
    idx = table = kept = 0
    for name, t in sd.items():
        if name in quantized:
            count, bits, floats = quantized[name]
            idx += (count * bits + 7) // 8
            table += 4 * floats
        else:
            kept += t.numel() * t.element_size()
    return idx + table + kept, {"index_bytes": idx, "table_bytes": table, "kept_bytes": kept}


def _weights(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors every peer compresses: floating, >= 2 dims (as legonet's default)."""
    return [n for n, t in sd.items() if t.ndim >= 2 and t.is_floating_point()]


# -- round to nearest ------------------------------------------------------------------------------
def rtn_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest with one scale per output channel (axis 0).

    Args:
        w: ``(out, ...)`` float tensor.
        bits: integer width; codes lie in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``.
    Returns:
        the dequantized tensor (float32, shape of ``w``) and the ``(out,)`` scales.
    """
    qmax = 2 ** (bits - 1) - 1
    x = w.float().reshape(w.shape[0], -1)
    scale = x.abs().amax(1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(x / scale[:, None]).clamp_(-qmax, qmax)
    return (q * scale[:, None]).reshape(w.shape), scale


def rtn(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None, *, bits: int) -> MethodOutput:  # noqa: ARG001
    """RTN int``bits`` per output channel: ``bits`` per weight plus one float32 scale per channel."""
    out, quant = dict(sd), {}
    for name in _weights(sd):
        w = sd[name]
        deq, scale = rtn_per_channel(w, bits)
        out[name] = deq.to(w.dtype)
        quant[name] = (w.numel(), bits, scale.numel())
    total, info = count_bytes(sd, quant)
    return MethodOutput(out, total, info)


# -- per-layer scalar k-means (Deep Compression's weight sharing) ---------------------------------
def kmeans_1d_linear(x: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar k-means with linear initialisation (k points evenly spaced over [min, max]).

    Args:
        x: ``(n,)`` float values.
        k: number of centroids.
    Returns:
        ``(k,)`` sorted float32 centroids and ``(n,)`` int64 labels.
    """
    x = x.float()
    c = torch.linspace(float(x.min()), float(x.max()), k)
    labels = torch.zeros_like(x, dtype=torch.int64)
    for _ in range(iters):
        # Sorted 1-D centroids: the nearest one is found by bisection on the midpoints.
        labels = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, x.double())
        new = torch.where(counts > 0, (sums / counts.clamp_min(1)).float(), c)  # empty: keep in place
        new, _ = torch.sort(new)
        if torch.equal(new, c):
            break
        c = new
    labels = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
    return c, labels


def kmeans_per_layer(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None,  # noqa: ARG001
                     *, bits: int) -> MethodOutput:
    """One scalar codebook of ``2^bits`` float32 entries per tensor, ``bits`` per weight."""
    out, quant = dict(sd), {}
    k = 2**bits
    for name in _weights(sd):
        w = sd[name]
        kk = min(k, w.numel())
        c, lab = kmeans_1d_linear(w.reshape(-1), kk)
        out[name] = c[lab].reshape(w.shape).to(w.dtype)
        quant[name] = (w.numel(), bits, kk)
    total, info = count_bytes(sd, quant)
    return MethodOutput(out, total, info)


# -- coremltools ------------------------------------------------------------------------------------
def coreml_available() -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            from coremltools.optimize.torch.palettization import PostTrainingPalettizer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def coreml_palettize(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None,  # noqa: ARG001
                     *, bits: int, granularity: str = "per_tensor", group_size: int | None = None,
                     cluster_dim: int = 1) -> MethodOutput:
    """coremltools ``PostTrainingPalettizer`` with ``n_bits=bits`` (library defaults otherwise).

    Layers coremltools declines (e.g. a channel count not divisible by ``cluster_dim`` or
    ``group_size``) stay dense and are counted as kept. A palettized tensor costs
    ``numel / cluster_dim`` indices of ``bits`` bits plus its lookup tables
    (``groups * 2^bits * cluster_dim`` float32).
    """
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        from coremltools.optimize.torch.palettization import (
            PostTrainingPalettizer, PostTrainingPalettizerConfig,
        )
    gc: dict[str, Any] = {"n_bits": bits, "granularity": granularity, "cluster_dim": cluster_dim}
    if group_size is not None:
        gc["group_size"] = group_size
    model = arch.build()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=False)
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": gc})
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its k-means logs progress at INFO for every layer
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            pm = PostTrainingPalettizer(model, cfg).compress()
    finally:
        logger.setLevel(level)
    psd = pm.state_dict()
    out, quant = {}, {}
    for name, t in sd.items():
        out[name] = psd[name].to(t.dtype)
        prefix = name.rsplit(".", 1)[0] if "." in name else ""
        lut = psd.get(f"{prefix}._COREML_/{name.rsplit('.', 1)[-1]}/lut")
        if lut is not None:
            quant[name] = (t.numel() // cluster_dim, bits, lut.numel())
    total, info = count_bytes(sd, quant)
    info["palettized_tensors"] = len(quant)
    info["dense_weight_tensors"] = len([n for n in _weights(sd) if n not in quant])
    return MethodOutput(out, total, info)


PEER_METHODS = {
    "coreml": coreml_palettize,
    "kmeans-layer": kmeans_per_layer,
    "rtn": rtn,
}
