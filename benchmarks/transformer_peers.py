"""Peer compressions of transformers, at legonet's byte rules: the baselines legonet must beat.

Every peer is a function ``(model, calib_batches or None) -> (dequantized copy, file bytes)``; the
model passed in is never changed. :data:`PEERS` lists them for a benchmark to loop over. Every peer
quantizes the same tensors: each floating 2-D tensor once (every ``nn.Linear`` weight, the token
and position embedding tables; a token embedding tied to the output head is one tensor, quantized
and counted once); 1-D tensors (biases, LayerNorm) stay at float16. Bytes follow the rules of
:mod:`benchmarks.transformer_quant` (codes bit-packed, float16 scales / codebooks, integer
zero-points at the code width, kept tensors at float16, one fixed header).

* ``rtn-int8-row``: symmetric int8, one scale per row.
* ``rtn-int{4,3}-g{64,128}``: asymmetric min/max integers per group of 64 / 128 input columns.
* ``hqq-int{4,3}-g{64,128}``: HQQ (half-quadratic optimisation of each group's zero-point and scale,
  from the ``hqq`` package, run on CPU; float zero-point and scale stored as float16).
* ``kmeans-{2,3,4}bit``: one scalar codebook of 4 / 8 / 16 float16 entries per tensor.
* ``coreml-{2,3,4}bit-gc16``: coremltools' ``PostTrainingPalettizer``, per-grouped-channel lookup
  tables (16 output channels share one; 16 input channels where the output channels are not a
  multiple of 16, e.g. a 30522-word embedding) with the library's other defaults; tensors it still
  declines stay at float16 and are counted so.
* ``gptq-int{4,3}-g128``: GPTQ written here (:func:`benchmarks.transformer_quant.gptq_groups`),
  layer by layer in the order the layers run, each layer's Hessian taken from calibration inputs
  that went through the already-quantized earlier layers; 2-D tensors that no ``nn.Linear`` uses
  (embedding tables not tied to a head) get RTN on the same grid. Calibrate on training data only.

Optional packages (benchmarks only, the ``bench`` extra): ``hqq``, ``coremltools``; a peer whose
package is missing is skipped with the reason (:meth:`Peer.missing`).

``python benchmarks/transformer_peers.py --quick`` measures every peer on the byte-level language
model (held-out perplexity), the byte-level sentence encoder and, when its package is installed,
all-MiniLM-L6-v2 (embedding cosine and nearest-neighbour agreement with the original), prints a
table and writes ``benchmarks/results/transformer_peers.json``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as ``python benchmarks/transformer_peers.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.transformer_quant import (
    Stored, file_bytes, gptq_groups, group_cost, group_width, hessian_update, kmeans_scalar, quantized_names,
    rtn_groups, rtn_rows_symmetric, unique_tensors,
)

PeerResult = tuple[nn.Module, int]


def _quantize_each(model: nn.Module, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, Stored]]) -> PeerResult:
    """A copy of ``model`` with every 2-D floating tensor replaced by ``quantize(w) -> (dequantized, cost)``."""
    out = copy.deepcopy(model).eval()
    tensors, stored = unique_tensors(out), {}
    with torch.no_grad():
        for name in quantized_names(out):
            t = tensors[name]
            deq, stored[name] = quantize(t.detach().float())
            t.copy_(deq.to(t.dtype))
    return out, file_bytes(out, stored)


# -- data-free peers ---------------------------------------------------------------------------------------
def rtn_int8_rows(model: nn.Module, calib: Sequence | None = None) -> PeerResult:  # noqa: ARG001
    """Symmetric int8 with one float16 scale per row."""
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, Stored]:
        return rtn_rows_symmetric(w, 8)[0], Stored(w.numel(), 8, fp16_values=w.shape[0])
    return _quantize_each(model, quantize)


def rtn_grouped(model: nn.Module, calib: Sequence | None = None, *, bits: int, group: int) -> PeerResult:  # noqa: ARG001
    """Asymmetric min/max integers of ``bits`` bits per group of ``group`` columns."""
    return _quantize_each(model, lambda w: (rtn_groups(w, bits, group), group_cost(w, bits, group)))


def hqq_grouped(model: nn.Module, calib: Sequence | None = None, *, bits: int, group: int) -> PeerResult:  # noqa: ARG001
    """HQQ (the ``hqq`` package's quantizer, CPU): optimised float zero-point and scale per group."""
    from hqq.core.quantize import Quantizer

    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, Stored]:
        width = group_width(w, group)
        codes, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=width, optimize=True,
                                         round_zero=False, axis=1, bitpack=False, device="cpu")
        scale, zero = meta["scale"].half().float(), meta["zero"].half().float()  # (groups, 1), stored as float16
        deq = ((codes.float().reshape(-1, width) - zero) * scale).reshape(w.shape)
        groups = w.numel() // width
        return deq, Stored(w.numel(), bits, fp16_values=2 * groups)

    return _quantize_each(model, quantize)


def kmeans_per_tensor(model: nn.Module, calib: Sequence | None = None, *, bits: int) -> PeerResult:  # noqa: ARG001
    """One scalar codebook of ``2^bits`` float16 entries per tensor."""
    return _quantize_each(model, lambda w: (kmeans_scalar(w, 2**bits), Stored(w.numel(), bits, fp16_values=2**bits)))


def coreml_grouped_channel(model: nn.Module, calib: Sequence | None = None, *, bits: int,  # noqa: ARG001
                           group_size: int = 16) -> PeerResult:
    """coremltools ``PostTrainingPalettizer``, ``granularity="per_grouped_channel"``, float16 tables."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig
    work = copy.deepcopy(model).eval()
    gc = {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": group_size}
    per_module: dict[str, dict | None] = {}
    seen = set()
    for name, m in work.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            rows, cols = m.weight.shape
            if id(m.weight) in seen:  # a tied tensor is palettized through the first module holding it
                per_module[name] = None
            elif rows % group_size and not cols % group_size:  # e.g. a 30522-row vocabulary: group columns
                per_module[name] = {**gc, "channel_axis": 1}
            seen.add(id(m.weight))
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": gc, "module_name_configs": per_module})
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its k-means logs every layer at INFO
    try:
        with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            palettized = PostTrainingPalettizer(work, cfg).compress().state_dict()
    finally:
        logger.setLevel(level)
    out = copy.deepcopy(model).eval()
    tensors, stored = unique_tensors(out), {}
    with torch.no_grad():
        for name in quantized_names(out):
            prefix, leaf = name.rsplit(".", 1)
            lut = palettized.get(f"{prefix}._COREML_/{leaf}/lut")
            if lut is not None:  # declined tensors stay float16 (counted as kept)
                tensors[name].copy_(palettized[name].half().float())
                stored[name] = Stored(tensors[name].numel(), bits, fp16_values=lut.numel())
    return out, file_bytes(out, stored)


# -- GPTQ -------------------------------------------------------------------------------------------------
class _InputsCaptured(Exception):
    """Raised by a hook once the layer under calibration has seen its input: the rest of the forward is not needed."""


def _forward(model: nn.Module, batch: Any) -> None:
    model(**batch) if isinstance(batch, Mapping) else model(batch)


def linear_call_order(model: nn.Module, batch: Any) -> list[list[str]]:
    """The ``nn.Linear`` modules in the order a forward pass first calls them, grouped by shared input.

    Consecutive layers that read the very same input tensor (e.g. separate query, key and value
    projections) form one group: they share one Hessian, so one calibration pass serves them all.
    """
    order: list[tuple[str, torch.Tensor]] = []

    def record(name: str, args: tuple) -> None:
        if all(n != name for n, _ in order):
            order.append((name, args[0]))  # held, so that identity below means the same tensor

    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: record(n, args))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, (name, source) in enumerate(order):
        if i and source is order[i - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def layer_hessian(model: nn.Module, layer: nn.Linear, calib: Sequence) -> torch.Tensor:
    """``2 E[x x^T]`` of ``layer``'s inputs over ``calib`` (``(in, in)`` float64); each forward stops there."""
    state = {"h": torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64), "n": 0}

    def capture(_m: nn.Module, args: tuple) -> None:
        state["h"], state["n"] = hessian_update(state["h"], state["n"], args[0].detach())
        raise _InputsCaptured

    handle = layer.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            for batch in calib:
                with contextlib.suppress(_InputsCaptured):
                    _forward(model, batch)
    finally:
        handle.remove()
    if state["n"] == 0:
        raise ValueError("no calibration input reached the layer")
    return state["h"]


def gptq(model: nn.Module, calib: Sequence | None, *, bits: int, group: int, act_order: bool = False) -> PeerResult:
    """GPTQ on every ``nn.Linear`` (sequentially), RTN on the same grid for other 2-D tensors."""
    if not calib:
        raise ValueError("GPTQ needs calibration batches")
    out = copy.deepcopy(model).eval()
    tensors = unique_tensors(out)
    name_of = {id(t): n for n, t in tensors.items()}
    modules = dict(out.named_modules())
    stored: dict[str, Stored] = {}
    with torch.no_grad():
        for layer_names in linear_call_order(out, calib[0]):
            todo = [n for n in layer_names if name_of[id(modules[n].weight)] not in stored]
            if not todo:
                continue
            try:
                h = layer_hessian(out, modules[todo[0]], calib)
            except ValueError as e:
                raise ValueError(f"GPTQ of {todo[0]}: {e}") from None
            for layer_name in todo:
                weight = modules[layer_name].weight
                weight.copy_(gptq_groups(weight.float(), h, bits, group, act_order=act_order).to(weight.dtype))
                stored[name_of[id(weight)]] = group_cost(weight, bits, group)
        for name in quantized_names(out):
            if name not in stored:  # e.g. an untied embedding table: nothing to calibrate against
                w = tensors[name]
                w.copy_(rtn_groups(w.float(), bits, group).to(w.dtype))
                stored[name] = group_cost(w, bits, group)
    return out, file_bytes(out, stored)


# -- registry ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """A peer compression: ``run(model, calib_batches or None) -> (dequantized copy, file bytes)``."""

    name: str
    run: Callable[[nn.Module, Sequence | None], PeerResult]
    calibrated: bool = False
    package: str | None = None  # the optional package it imports

    def missing(self) -> str | None:
        """``None`` if the peer can run here, else why not."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.name} skipped: the package {self.package} is not installed"
        return None


PEERS: list[Peer] = [
    Peer("rtn-int8-row", rtn_int8_rows),
    *(Peer(f"rtn-int{b}-g{g}", functools.partial(rtn_grouped, bits=b, group=g)) for b in (4, 3) for g in (64, 128)),
    *(Peer(f"hqq-int{b}-g{g}", functools.partial(hqq_grouped, bits=b, group=g), package="hqq")
      for b in (4, 3) for g in (64, 128)),
    *(Peer(f"kmeans-{b}bit", functools.partial(kmeans_per_tensor, bits=b)) for b in (4, 3, 2)),
    *(Peer(f"coreml-{b}bit-gc16", functools.partial(coreml_grouped_channel, bits=b, group_size=16),
           package="coremltools") for b in (4, 3, 2)),
    *(Peer(f"gptq-int{b}-g128", functools.partial(gptq, bits=b, group=128), calibrated=True) for b in (4, 3)),
]


if __name__ == "__main__":
    from benchmarks.transformer_table import main

    main()
