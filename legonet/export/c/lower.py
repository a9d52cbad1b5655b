"""Lowering a ``torch.fx`` trace into the C export's :class:`~legonet.export.c.graph.Graph`.

Each fx node becomes at most one operation; the shapes are the ones PyTorch produced when the trace
was run at the export's input shape (:func:`legonet.export.c.trace.record`), so no shape rule is
re-implemented here. Weights stay tensor names of the compressed model (encoded later, by
:mod:`legonet.export.c.weights`); biases and BatchNorm statistics become per-channel arrays. Layer
handlers (convolution, linear, pooling, padding...) are in :mod:`legonet.export.c.layers`; this
module holds the dispatch, activations and elementwise arithmetic. A node with no handler is an
:class:`ArchitectureError` naming it and its target.
"""

from __future__ import annotations

import inspect
import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from legonet.artifact import CompressedModel
from legonet.errors import ArchitectureError
from legonet.export.c.graph import Graph, Op, Post
from legonet.export.c.trace import TensorMeta, holds_tensors


class Ref:
    """A tensor value of the graph being built."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


class Param:
    """A parameter or buffer read by name in ``forward`` (an fx ``get_attr`` node)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def describe(node: fx.Node, root: nn.Module) -> str:
    """The fx node's target as a person would name it."""
    if node.op == "call_module":
        return f"{node.target} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        fn = node.target
        return f"{getattr(fn, '__module__', None) or 'builtins'}.{getattr(fn, '__name__', repr(fn))}"
    return f"{node.op} {node.target}"


def signature(*required: str, **optional) -> inspect.Signature:
    """A Python signature: the ``required`` parameters, then the ``optional`` ones with their defaults."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind) for n in required]
                             + [inspect.Parameter(n, kind, default=d) for n, d in optional.items()])


# signatures of the supported functions and methods (the tensor first), to bind positional and
# keyword arguments alike
_UNARY = signature("input", inplace=False)
_HARDTANH = signature("input", min_val=-1.0, max_val=1.0, inplace=False)
_CLAMP = signature("input", min=None, max=None)
_LEAKY = signature("input", negative_slope=0.01, inplace=False)
_BINARY = signature("input", "other", alpha=1, rounding_mode=None)


def bind(sig: inspect.Signature, args: tuple, kwargs: dict, node: fx.Node, root: nn.Module) -> dict:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"C export: node {node.name!r} ({describe(node, root)}) has arguments the export "
                                f"does not understand: {exc}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


_INF = math.inf
# activation -> (kind, lo, hi) from the bound arguments
_ACTS = {
    "relu": lambda a: ("clamp", 0.0, _INF),
    "relu6": lambda a: ("clamp", 0.0, 6.0),
    "hardtanh": lambda a: ("clamp", float(a["min_val"]), float(a["max_val"])),
    "clamp": lambda a: ("clamp", -_INF if a["min"] is None else float(a["min"]),
                        _INF if a["max"] is None else float(a["max"])),
    "silu": lambda a: ("silu", 0.0, 0.0),
    "hardswish": lambda a: ("hardswish", 0.0, 0.0),
    "hardsigmoid": lambda a: ("hardsigmoid", 0.0, 0.0),
    "sigmoid": lambda a: ("sigmoid", 0.0, 0.0),
    "tanh": lambda a: ("tanh", 0.0, 0.0),
    "leaky_relu": lambda a: ("leaky_relu", float(a["negative_slope"]), 0.0),
}
_ACT_SIGNATURE = {"hardtanh": _HARDTANH, "clamp": _CLAMP, "leaky_relu": _LEAKY}
ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
    F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh", torch.clamp: "clamp", torch.clip: "clamp",
    torch.clamp_: "clamp", F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu",
}
ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "clamp": "clamp", "clip": "clamp"}
# module type -> activation, with the module's own settings as arguments (ReLU6 is a Hardtanh)
ACT_MODULES = (
    (nn.ReLU, "relu", lambda m: {}), (nn.Hardtanh, "hardtanh", lambda m: {"min_val": m.min_val, "max_val": m.max_val}),
    (nn.SiLU, "silu", lambda m: {}), (nn.Hardswish, "hardswish", lambda m: {}),
    (nn.Hardsigmoid, "hardsigmoid", lambda m: {}), (nn.Sigmoid, "sigmoid", lambda m: {}),
    (nn.Tanh, "tanh", lambda m: {}), (nn.LeakyReLU, "leaky_relu", lambda m: {"negative_slope": m.negative_slope}),
)
BINARY_FUNCTIONS = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", operator.isub: "sub",
    torch.sub: "sub", operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", operator.truediv: "div",
    operator.itruediv: "div", torch.div: "div",
}
BINARY_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
_REVERSED = {"add": "add", "mul": "mul", "sub": "rsub", "div": "rdiv"}
INPLACE_FUNCTIONS = {F.relu_, torch.relu_, F.hardtanh_, torch.clamp_, F.leaky_relu_, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv}


class Lowering:
    """Builds the graph node by node; ``env`` maps each fx node to a :class:`Ref`, a :class:`Param`
    or a constant."""

    def __init__(self, gm: fx.GraphModule, results: dict, cm: CompressedModel, tables: tuple) -> None:
        """``tables``: ``(modules, functions, methods)`` handler tables (see :mod:`legonet.export.c.layers`)."""
        self.gm, self.results, self.cm = gm, results, cm
        self.modules, self.functions, self.methods = tables
        self.graph = Graph()
        self.env: dict[fx.Node, object] = {}
        self.updates_input = False  # set by a handler whose node writes over its input (inplace=True)

    # -- helpers used by the handlers ----------------------------------------------------------
    def fail(self, node: fx.Node, why: str = "") -> ArchitectureError:
        return ArchitectureError(f"C export: node {node.name!r} ({describe(node, self.gm)}) is not supported"
                                 + (f": {why}" if why else ""))

    def shape(self, ref: Ref) -> tuple[int, ...]:
        return self.graph.shapes[ref.value]

    def tensor_arg(self, node: fx.Node, arg: object) -> Ref:
        if not isinstance(arg, Ref):
            raise self.fail(node, "expects a tensor computed from the input here")
        return arg

    def emit(self, node: fx.Node, kind: str, inputs: list[Ref], **attrs) -> Ref:
        """A new value of the node's traced shape, computed by a new operation."""
        meta = self.results[node]
        out = self.graph.new_value(meta.shape)
        self.graph.ops.append(Op(kind, [r.value for r in inputs], out, node.name, attrs))
        return Ref(out)

    def array(self, name: str | None, node: fx.Node) -> np.ndarray | None:
        """Tensor ``name`` of the compressed model as a float64 vector (None for None)."""
        if name is None:
            return None
        if name not in self.cm.tensors:
            raise self.fail(node, f"tensor {name!r} is not in the compressed model")
        return self.cm.reconstruct(name).detach().double().cpu().numpy().reshape(-1)

    def check_weight(self, name: str, node: fx.Node) -> str:
        if name not in self.cm.tensors:
            raise self.fail(node, f"weight {name!r} is not in the compressed model")
        return name

    # -- activations and arithmetic -------------------------------------------------------------
    def activation(self, node: fx.Node, act: str, args: tuple, kwargs: dict) -> Ref:
        a = bind(_ACT_SIGNATURE.get(act, _UNARY), args, kwargs, node, self.gm)
        x = self.tensor_arg(node, a["input"])
        self.updates_input = a.get("inplace") is True
        kind, lo, hi = _ACTS[act](a)
        return self.emit(node, "pointwise", [x], post=Post(act=kind, lo=lo, hi=hi))

    def arithmetic(self, node: fx.Node, op: str, args: tuple, kwargs: dict) -> Ref:
        a = bind(_BINARY, args, kwargs, node, self.gm)
        if a["alpha"] != 1 or a["rounding_mode"] is not None:
            raise self.fail(node, "alpha and rounding_mode are not supported")
        lhs, rhs = a["input"], a["other"]
        scalar = (int, float, bool)
        if isinstance(lhs, Ref) and isinstance(rhs, scalar):
            return self.emit(node, "scalar", [lhs], op=op, value=float(rhs), post=Post())
        if isinstance(rhs, Ref) and isinstance(lhs, scalar):
            return self.emit(node, "scalar", [rhs], op=_REVERSED[op], value=float(lhs), post=Post())
        if not (isinstance(lhs, Ref) and isinstance(rhs, Ref)):
            raise self.fail(node, "operands must be tensors computed from the input or numbers")
        out = self.results[node].shape
        for r in (lhs, rhs):
            s = (1,) * (len(out) - len(self.shape(r))) + self.shape(r)
            per_channel = len(out) >= 2 and s[1] == out[1] and math.prod(s) == out[1]
            if s != out and not per_channel:
                raise self.fail(node, f"broadcasting {self.shape(r)} to {out} "
                                      "(only equal shapes or one value per channel)")
        return self.emit(node, "binary", [lhs, rhs], op=op, post=Post())

    def negate(self, node: fx.Node, args: tuple, kwargs: dict) -> Ref:
        return self.emit(node, "scalar", [self.tensor_arg(node, args[0])], op="mul", value=-1.0, post=Post())

    # -- the walk ---------------------------------------------------------------------------------
    def _lower_call(self, node: fx.Node) -> Ref:
        """The value of a call node computing a float tensor, from its handler."""
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        self.updates_input = False
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            handler = next((h for types, h in self.modules if isinstance(module, types)), None)
            inplace = getattr(module, "inplace", False) is True
            if handler is None:
                raise self.fail(node)
            out = handler(self, node, module, args, kwargs)
        else:
            if node.op == "call_function":
                handler, inplace = self.functions.get(node.target), node.target in INPLACE_FUNCTIONS
            else:
                handler, inplace = self.methods.get(node.target.rstrip("_")), node.target.endswith("_")
            if handler is None:
                raise self.fail(node)
            out = handler(self, node, args, kwargs)
        if (inplace or self.updates_input) and node.args and isinstance(node.args[0], fx.Node):
            self.env[node.args[0]] = out  # later readers of the input see the updated tensor
        return out

    def run(self, input_shape: tuple[int, ...], mean, std) -> Graph:
        """Lower every node; the input has ``input_shape`` (batch 1) and is the uint8 image
        normalised by ``mean``/``std`` per channel."""
        for node in self.gm.graph.nodes:
            res = self.results.get(node)
            if node.op == "placeholder":
                if self.graph.shapes:
                    raise self.fail(node, "the network takes more than one input")
                v = self.graph.new_value(input_shape)
                self.graph.ops.append(Op("input", [], v, node.name, {"mean": tuple(mean), "std": tuple(std)}))
                self.env[node] = Ref(v)
                continue
            if node.op == "output":
                out = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if not isinstance(out, Ref):
                    raise ArchitectureError("C export: the network must return one tensor")
                self.graph.output = out.value
                continue
            if node.op == "get_attr" and isinstance(res, TensorMeta):
                self.env[node] = Param(str(node.target))
                continue
            if not isinstance(res, TensorMeta):
                if holds_tensors(res):
                    raise self.fail(node, "it returns several tensors")
                self.env[node] = res  # a constant: a size, a shape entry, an attribute
                continue
            if res.dtype != torch.float32:
                raise self.fail(node, f"it computes {res.dtype}; the C runtime computes float32")
            self.env[node] = self._lower_call(node)
        return self.graph
