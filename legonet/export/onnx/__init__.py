"""ONNX export of a compressed model that stays compressed.

``export_onnx(cm, "resnet20", "model.onnx")`` writes an ONNX file (opset :data:`OPSET`) whose input
is the float32 NCHW tensor the PyTorch module takes (batch dimension dynamic) and whose output is
the module's. Every clustered weight is rebuilt inside the graph from its codebook and its
bit-packed indices (:mod:`legonet.export.onnx.decode`), so the file holds what the .lego file
holds, bit-packed where the .lego file may entropy-code; the network's operations are traced by
PyTorch (:mod:`legonet.export.onnx.graph`). Needs the optional ``onnx`` package
(``pip install 'legonet[onnx]'``); running the file needs an ONNX runtime such as ``onnxruntime``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from legonet import __version__
from legonet.aliases import unsupported
from legonet.artifact import ClusteredTensor, CompressedModel, fit_error
from legonet.errors import ArchitectureError, ConfigError
from legonet.export.onnx.builder import require_onnx
from legonet.export.onnx.fold import fold_shape_arithmetic
from legonet.export.onnx.graph import splice, tidy, trace
from legonet.io.atomic import atomic_path, check_writable

# BitwiseAnd (the mask of the index unpacking) needs opset 18.
OPSET = 18


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the .onnx file.
        onnx_bytes: its size.
        clustered: tensors rebuilt in the graph from codebook and packed indices.
        kept: tensors stored as they are (initializers or constant fills).
        input_shape: the input's shape, ``("batch", C, H, W)``.
    """

    path: Path
    onnx_bytes: int
    clustered: int
    kept: int
    input_shape: tuple


def _architecture(arch: str | nn.Module, input_size: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...], str]:
    if isinstance(arch, str):
        from legonet.zoo import build, get_arch

        spec = get_arch(arch)
        return build(arch), tuple(input_size or spec.input_size), arch
    if isinstance(arch, nn.Module):
        if input_size is None:
            raise ConfigError("give input_size, the input's shape without the batch (e.g. (3, 32, 32)), "
                              "when the architecture is a module")
        return arch, tuple(input_size), type(arch).__name__
    raise ArchitectureError(f"expected an architecture name or an nn.Module, got {type(arch).__name__}")


def build_onnx(cm: CompressedModel, arch: str | nn.Module, input_size: tuple[int, ...] | None = None):
    """The ``onnx.ModelProto`` of ``cm`` on the architecture ``arch``.

    Args:
        cm: the compressed model.
        arch: a zoo name (:func:`legonet.zoo.get_arch`) or the module itself (its own tensor values
            are not used, only its structure; it is traced in eval mode and left in its mode).
        input_size: the input's shape without the batch, e.g. ``(3, 32, 32)``; default the zoo
            spec's (required for a module).
    Raises:
        ConfigError: onnx missing, a tensor that cannot be rebuilt in the graph (named), or tied
            tensors (``cm.aliases``: the exporter rebuilds each weight under one name only).
        ArchitectureError: ``cm`` does not fit ``arch``, or ``arch`` cannot be traced.
    """
    refusal = unsupported(cm.aliases, "ONNX export")
    if refusal:
        raise ConfigError(refusal)
    onnx = require_onnx()
    module, size, label = _architecture(arch, input_size)
    if len(size) < 1 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ConfigError(f"input_size must be positive integers (C, H, W), got {size}")
    err = fit_error({k: tuple(v.shape) for k, v in module.state_dict().items()},
                    {k: tuple(v.shape) for k, v in cm.tensors.items()},
                    f"compressed model for {label}: weights do not fit")
    if err is not None:
        raise err
    was_training = module.training
    module.eval()
    try:
        model = trace(onnx, module, size, OPSET, label)
    finally:
        module.train(was_training)
    fold_shape_arithmetic(onnx, model)
    splice(onnx, model, cm)
    tidy(model.graph, keep=set(cm.tensors))
    model.producer_name = "legonet"
    model.producer_version = __version__
    model.doc_string = ""
    return model


def export_onnx(cm: CompressedModel, arch: str | nn.Module, path: str | os.PathLike,
                input_size: tuple[int, ...] | None = None) -> OnnxExport:
    """Write the ONNX file of ``cm`` on ``arch`` to ``path`` atomically (see :func:`build_onnx`).

    Raises:
        OutputError: ``path`` cannot be written (checked before any work).
    """
    check_writable(path)
    model = build_onnx(cm, arch, input_size)
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    used = {i for node in model.graph.node for i in node.output} | {t.name for t in model.graph.initializer}
    names = [n for n in cm.tensors if n in used]
    clustered = sum(isinstance(cm.tensors[n], ClusteredTensor) for n in names)
    return OnnxExport(Path(path), len(data), clustered, len(names) - clustered,
                      tuple(d.dim_param or d.dim_value for d in dims))


__all__ = ["OPSET", "OnnxExport", "build_onnx", "export_onnx"]
