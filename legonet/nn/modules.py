"""Lean compressed modules: they hold a codebook and packed indices, never a dense weight.

A lean module decodes its own weight at the start of ``forward`` and lets it go at the end, so at
most one layer's dense weight exists at a time. The codebook tensor is shared by every module using
it (one model-wide codebook is stored once).

* :class:`LegoConv2d` and :class:`LegoLinear` replace ``nn.Conv2d`` / ``nn.Linear``;
* :class:`LegoModule` wraps any other module (Embedding, ConvTranspose, attention, ...) whose
  tensors were clustered, and runs the original module with the decoded tensors substituted
  (``torch.func.functional_call``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.errors import ArchitectureError
from legonet.nn.functional import decode_prepared, decode_weight, pack_indices, prepare_codebook
from legonet.ops.bitpack import bits_for
from legonet.ops.tiling import Tiling


@dataclass(frozen=True)
class _Spec:
    """How one clustered tensor decodes: tiling, index width, stored and compute dtypes, per-row scale."""

    tiling: Tiling
    width: int
    stored_dtype: torch.dtype
    dtype: torch.dtype
    scaled: bool = False


class _LeanWeights(nn.Module):
    """Base: registers ``<attr>_codebook`` / ``<attr>_packed`` buffers per clustered tensor."""

    def _add_clustered(self, attr: str, ct: ClusteredTensor, codebook: torch.Tensor, dtype: torch.dtype,
                       books: dict | None = None) -> None:
        width = bits_for(codebook.shape[0])
        name = attr.replace(".", "_")
        # Optional per-row gains (``ClusteredTensor.scale``, w = untile(codebook[idx]) * scale[row]):
        # the rounding to the stored dtype then comes after the product, so the codebook stays raw.
        scale = getattr(ct, "scale", None)
        if scale is not None:
            self.register_buffer(f"{name}_scale", scale.detach().to(torch.float32).clone())
        # One prepared codebook per (codebook, stored dtype, compute dtype), shared through ``books``.
        key = (id(codebook), ct.dtype if scale is None else torch.float32, dtype if scale is None else torch.float32)
        if books is None or key not in books:
            prepared = codebook if scale is not None else prepare_codebook(codebook, ct.dtype, dtype)
            if books is not None:
                books[key] = prepared
        else:
            prepared = books[key]
        self.register_buffer(f"{name}_codebook", prepared)
        self.register_buffer(f"{name}_packed", pack_indices(ct.indices, width))
        if not hasattr(self, "_specs"):
            self._specs: dict[str, _Spec] = {}
        self._specs[attr] = _Spec(ct.tiling, width, ct.dtype, dtype, scale is not None)

    def decoded(self, attr: str) -> torch.Tensor:
        """The dense tensor ``attr``, decoded now (the caller drops it after use)."""
        s = self._specs[attr]
        key = attr.replace(".", "_")
        book, packed = getattr(self, f"{key}_codebook"), getattr(self, f"{key}_packed")
        if s.scaled:
            return decode_weight(book, packed, s.width, s.tiling, s.stored_dtype, s.dtype, getattr(self, f"{key}_scale"))
        return decode_prepared(book, packed, s.width, s.tiling)


def _clustered(cm: CompressedModel, name: str) -> ClusteredTensor:
    t = cm.tensors.get(name)
    if not isinstance(t, ClusteredTensor):
        raise ArchitectureError(f"tensor {name!r} is not clustered in the compressed model")
    return t


def _check_shape(name: str, ct: ClusteredTensor, like: torch.Tensor) -> None:
    if tuple(ct.shape) != tuple(like.shape):
        raise ArchitectureError(f"tensor {name!r} has shape {tuple(ct.shape)} in the compressed model "
                                f"but {tuple(like.shape)} in the module")


def _dense_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.is_meta:
        return None if t is None else t
    return t.detach().clone()


class LegoConv2d(_LeanWeights):
    """``nn.Conv2d`` computed from a codebook and packed indices (zero padding only).

    Buffers: ``weight_codebook (K, b_r*b_c)`` (shared), ``weight_packed (ceil(n*w/8),)`` uint8,
    ``bias (out,)`` if the layer has one. Input ``(N, C_in, H, W)``, output ``(N, C_out, H', W')``.
    """

    def __init__(self, conv: nn.Conv2d, ct: ClusteredTensor, codebook: torch.Tensor, books: dict | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ArchitectureError(f"LegoConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._add_clustered("weight", ct, codebook, conv.weight.dtype, books)
        self.register_buffer("bias", _dense_copy(conv.bias))

    @classmethod
    def from_module(cls, conv: nn.Conv2d, cm: CompressedModel, name: str, books: dict | None = None) -> "LegoConv2d":
        """Lean version of ``conv``, whose weight is tensor ``name`` (e.g. ``"layer1.0.conv1.weight"``) of ``cm``.

        ``books``: a dict shared across calls so that modules share one prepared codebook.
        """
        ct = _clustered(cm, name)
        _check_shape(name, ct, conv.weight)
        return cls(conv, ct, cm.codebooks[ct.codebook], books)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.decoded("weight"), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = self._specs["weight"]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, block={s.tiling.block}, bits={s.width}")


class LegoLinear(_LeanWeights):
    """``nn.Linear`` computed from a codebook and packed indices. Input ``(*, in)``, output ``(*, out)``."""

    def __init__(self, linear: nn.Linear, ct: ClusteredTensor, codebook: torch.Tensor, books: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._add_clustered("weight", ct, codebook, linear.weight.dtype, books)
        self.register_buffer("bias", _dense_copy(linear.bias))

    @classmethod
    def from_module(cls, linear: nn.Linear, cm: CompressedModel, name: str, books: dict | None = None) -> "LegoLinear":
        ct = _clustered(cm, name)
        _check_shape(name, ct, linear.weight)
        return cls(linear, ct, cm.codebooks[ct.codebook], books)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.decoded("weight"), self.bias)

    def extra_repr(self) -> str:
        s = self._specs["weight"]
        return f"{self.in_features}, {self.out_features}, block={s.tiling.block}, bits={s.width}"


class LegoModule(_LeanWeights):
    """Any module with clustered tensors: the module keeps its other tensors, the clustered ones
    are removed from it and decoded at each call.

    Args:
        module: the original module (its clustered tensors may be on the meta device).
        clustered: ``{local_name: (ClusteredTensor, codebook)}``, local names relative to ``module``.
    """

    def __init__(self, module: nn.Module, clustered: dict[str, tuple[ClusteredTensor, torch.Tensor]],
                 books: dict | None = None) -> None:
        super().__init__()
        for local, (ct, codebook) in clustered.items():
            owner_name, _, leaf = local.rpartition(".")
            owner = module.get_submodule(owner_name)
            current = getattr(owner, leaf)
            self._add_clustered(local, ct, codebook, current.dtype, books)
            # Drop the dense (or meta) tensor so that only the packed form is held.
            if leaf in owner._parameters:
                del owner._parameters[leaf]
            else:
                del owner._buffers[leaf]
        self.inner = module

    @classmethod
    def from_module(cls, module: nn.Module, cm: CompressedModel, prefix: str, books: dict | None = None) -> "LegoModule":
        """Lean wrapper of ``module`` (named ``prefix`` in the model) for its tensors clustered in ``cm``."""
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        found = {}
        for local, t in own.items():
            name = f"{prefix}.{local}" if prefix else local
            ct = cm.tensors.get(name)
            if isinstance(ct, ClusteredTensor):
                _check_shape(name, ct, t)
                found[local] = (ct, cm.codebooks[ct.codebook])
        if not found:
            raise ArchitectureError(f"module {prefix!r} has no tensor clustered in the compressed model")
        return cls(module, found, books)

    def forward(self, *args, **kwargs):
        weights = {name: self.decoded(name) for name in self._specs}
        return torch.func.functional_call(self.inner, weights, args, kwargs, strict=False)
