"""Tracing a network with ``torch.fx`` and recording what every node produces at the export's shape.

Every ``nn.Conv2d`` (subclasses included) stays a leaf: subclasses that pad from the input's size
cannot be traced through, and :mod:`legonet.export.c.conv_padding` works out what they do instead.
The traced graph is then run once on an input of the export's shape (on the meta device for a zoo
skeleton, so without weight memory) to record each tensor's shape and each non-tensor's value
(``x.size(0)``, ``x.shape[1]``), which the lowering uses as constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from legonet.errors import ArchitectureError


class _ConvLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class TensorMeta:
    """What a traced tensor node produced: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by ``torch.fx`` with every ``nn.Conv2d`` kept as a leaf."""
    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; each becomes one line naming the model
        raise ArchitectureError(f"C export: torch.fx cannot trace {type(model).__name__}: {_first_line(exc)}") from None
    return fx.GraphModule(model, graph)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.results: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.results[n] = _freeze(out)
        return out


class _HoldsTensors:
    """Stands for a non-tensor result holding tensors (a tuple from ``torch.chunk``): not a constant."""


def _freeze(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        items = [_freeze(v) for v in value]
        if any(isinstance(v, (TensorMeta, _HoldsTensors)) for v in items):
            return _HoldsTensors()
        return tuple(items) if isinstance(value, tuple) else items
    return value


def record(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[fx.Node, object]:
    """Run ``gm`` (in eval mode) on an input of ``input_shape`` on the device of its weights.

    Returns ``{node: TensorMeta or constant}``; the modules' training flags are restored after.
    """
    device = next(gm.parameters(), torch.empty(0)).device
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    rec = _Recorder(gm)
    try:
        with torch.no_grad():
            rec.run(torch.zeros(input_shape, device=device))
    except Exception as exc:  # noqa: BLE001 - a user's forward may raise anything
        raise ArchitectureError(f"C export: the network fails on an input of shape {tuple(input_shape)}: "
                                f"{_first_line(exc)}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return rec.results


def holds_tensors(value: object) -> bool:
    return isinstance(value, _HoldsTensors)
