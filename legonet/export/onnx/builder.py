"""A small ONNX graph builder: nodes, initializers and shared constants, with short value names.

Kept apart from the decoding logic so that :mod:`legonet.export.onnx.decode` reads as the list of
operations it emits. ``onnx`` is imported by the caller (:func:`require_onnx`) and passed in, so that
importing this module never needs it.
"""

from __future__ import annotations

import numpy as np
import torch

from legonet.errors import ConfigError

INSTALL_HINT = "pip install onnx onnxruntime (or pip install 'legonet[onnx]')"


def require_onnx():
    """The ``onnx`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(f"the ONNX export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


_DTYPES = {  # torch dtype -> name of its onnx.TensorProto element type
    torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.float64: "DOUBLE",
    torch.int64: "INT64", torch.int32: "INT32", torch.int16: "INT16", torch.int8: "INT8",
    torch.uint8: "UINT8", torch.bool: "BOOL",
}


def onnx_dtype(onnx, dtype: torch.dtype) -> int:
    """The ``onnx.TensorProto`` element type of a torch dtype."""
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype} has no ONNX counterpart")
    return getattr(onnx.TensorProto, _DTYPES[dtype])


def torch_dtype(onnx, elem_type: int) -> torch.dtype:
    """The torch dtype of an ``onnx.TensorProto`` element type."""
    for dtype, name in _DTYPES.items():
        if getattr(onnx.TensorProto, name) == elem_type:
            return dtype
    raise ConfigError(f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} has no torch counterpart")


def raw_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor (any dtype, bfloat16 included)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


class GraphBuilder:
    """Collects the nodes and initializers that define some values of a graph.

    Node outputs get short fresh names (``~0``, ``~1``, ...: a file of small weights is mostly
    names otherwise); :meth:`const` stores each distinct small constant once.
    """

    def __init__(self, onnx, taken: set[str]) -> None:
        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self._taken = set(taken)
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self) -> str:
        while True:
            name = f"~{np.base_repr(self._count, 36).lower()}"
            self._count += 1
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        """Append one node; returns its (single) output's name, ``out`` or a fresh one."""
        out = out or self.fresh()
        self._taken.add(out)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def initializer(self, name: str, data: bytes, elem_type: int, dims: tuple[int, ...]) -> str:
        """Add an initializer holding ``data`` (raw little-endian bytes); returns ``name``."""
        self._taken.add(name)
        self.initializers.append(self.onnx.helper.make_tensor(name, elem_type, list(dims), data, raw=True))
        return name

    def const(self, values) -> str:
        """A constant initializer of ``values`` (a numpy array or scalar, or a Python int/float list:
        int64 / float32),
        shared with every other request of the same dtype, shape and bytes."""
        a = np.asarray(values)
        if not isinstance(values, (np.ndarray, np.generic)):
            a = a.astype(np.int64 if a.dtype.kind in "iu" else np.float32)
        a = np.asarray(a, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            elem = self.onnx.helper.np_dtype_to_tensor_dtype(a.dtype)
            self._consts[key] = self.initializer(self.fresh(), a.tobytes(), elem, a.shape)
        return self._consts[key]
