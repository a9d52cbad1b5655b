"""From a compressed model and its architecture to the fused graph the C code runs.

The architecture is a zoo name (``"resnet20"``), ``"module:callable"`` or ``"path/file.py:callable"``
(built on the meta device, so without weight memory), or an ``nn.Module`` (any CNN that
``torch.fx`` can trace). The compressed
model must fit its state dict exactly; the weights are taken from it, never from the module.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from legonet.artifact import CompressedModel
from legonet.errors import ArchitectureError
from legonet.export.c.fuse import fuse
from legonet.export.c.graph import Graph
from legonet.export.c.layers import FUNCTIONS, METHODS, MODULES
from legonet.export.c.lower import Lowering
from legonet.export.c.trace import record, trace
from legonet.zoo import ArchSpec


@dataclass(frozen=True)
class Network:
    """A lowered network: its graph, input ``(C, H, W)``, per-channel normalisation and a label."""

    graph: Graph
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label: str


def _file_architecture(text: str) -> tuple[nn.Module, ArchSpec]:
    """``path/to/file.py:callable``: the callable's network built on the meta device, and its spec
    (normalisation from its ``legonet_mean``/``legonet_std`` attributes, as for ``module:callable``)."""
    path, _, attr = text.rpartition(":")
    if not Path(path).is_file():
        raise ArchitectureError(f"architecture file {path!r} does not exist")
    loader = importlib.util.spec_from_file_location(f"legonet_architecture_{Path(path).stem}", path)
    try:
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        fn = getattr(module, attr)
    except Exception as exc:  # noqa: BLE001 - a user's file may raise anything while importing
        raise ArchitectureError(f"cannot import architecture {text!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ArchitectureError(f"architecture {text!r} is not callable")
    spec = ArchSpec(text, fn, tuple(getattr(fn, "legonet_mean", (0.0, 0.0, 0.0))),
                    tuple(getattr(fn, "legonet_std", (1.0, 1.0, 1.0))))
    with torch.device("meta"):
        model = fn()
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture {text!r} did not return an nn.Module")
    return model, spec


def _module_and_inputs(arch_or_module, input_shape, mean, std):
    from legonet.zoo import get_arch, skeleton

    if isinstance(arch_or_module, str):
        if re.fullmatch(r".+\.py:[A-Za-z_]\w*", arch_or_module):
            model, spec = _file_architecture(arch_or_module)
        else:
            model, spec = skeleton(arch_or_module), get_arch(arch_or_module)
        return (model, tuple(input_shape or spec.input_size), tuple(mean or spec.mean), tuple(std or spec.std),
                arch_or_module)
    if not isinstance(arch_or_module, nn.Module):
        raise ArchitectureError("C export: expected an architecture name or an nn.Module, "
                                f"got {type(arch_or_module).__name__}")
    if input_shape is None:
        raise ArchitectureError(f"C export: give the input shape (C, H, W) of {type(arch_or_module).__name__}")
    channels = int(input_shape[0])
    mean = mean or getattr(arch_or_module, "legonet_mean", (0.0,) * channels)
    std = std or getattr(arch_or_module, "legonet_std", (1.0,) * channels)
    return arch_or_module, tuple(input_shape), tuple(mean), tuple(std), type(arch_or_module).__name__


def lower_network(cm: CompressedModel, arch_or_module: str | nn.Module, input_shape=None, mean=None,
                  std=None) -> Network:
    """Trace, lower and fuse ``arch_or_module`` for inputs of ``input_shape`` ``(C, H, W)``.

    ``mean``/``std`` (per input channel) default to the zoo entry's, or to the module's
    ``legonet_mean``/``legonet_std`` attributes, else 0 and 1. Raises ArchitectureError naming the
    first node the C runtime cannot run, the tensors that do not fit, or tied tensors
    (``cm.aliases``: the C code holds each weight under one name only).
    """
    from legonet.aliases import unsupported
    from legonet.nn.convert import check_fits

    refusal = unsupported(cm.aliases, "C export")
    if refusal:
        raise ArchitectureError(refusal)
    model, shape, mean, std, label = _module_and_inputs(arch_or_module, input_shape, mean, std)
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ArchitectureError(f"C export: input shape must be (C, H, W), got {shape}")
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ArchitectureError(f"C export: normalisation of {label} has {len(mean)}/{len(std)} channels, "
                                f"input has {shape[0]}")
    check_fits(model, cm)
    gm = trace(model)
    results = record(gm, (1, *shape))
    graph = Lowering(gm, results, cm, (MODULES, FUNCTIONS, METHODS)).run((1, *shape), mean, std)
    return Network(fuse(graph), tuple(int(s) for s in shape), mean, std, label)
