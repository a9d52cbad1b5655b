"""Folding the shape arithmetic of a traced graph into constants.

PyTorch's tracer records sizes read in ``forward`` as graph operations: 'SAME' padding computed
from ``x.shape[-2:]`` becomes some 30 nodes per convolution (Shape, Gather, Sub, Div, Unsqueeze,
Concat, Constant, ...) that ONNX Runtime would evaluate on every run. Only the batch dimension is
dynamic, so most of these values are known when exporting. :func:`fold_shape_arithmetic` walks
the graph once in order, inferring each value's shape from the values known so far (a padding
folded to a constant fixes the shape after it, and so the next padding), computes the known
values with ``onnx.reference`` and puts them in as small shared initializers.

Only integer and boolean values of at most :data:`MAX_FOLDED` elements are folded (and small
``Constant`` nodes of any type, turned into initializers as they are), computed from ``Constant``
nodes and from the static dimensions of ``Shape`` (dims that stay unknown, such as the batch,
stay dynamic): the weights' decoding subgraphs start from initializers and are never folded, so
the file stays compressed, and no floating-point arithmetic is moved from the runtime to another
implementation.
"""

from __future__ import annotations

import numpy as np

from legonet.export.onnx.builder import GraphBuilder

MAX_FOLDED = 1024


def _dims(value_type) -> list[int | None] | None:
    t = value_type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _shape_of(node, dims: list[int | None]) -> list[int | None]:
    start, end = 0, len(dims)
    for a in node.attribute:
        if a.name == "start":
            start = a.i
        elif a.name == "end":
            end = a.i
    return dims[start:end]


def _small_integers(values) -> bool:
    return all(isinstance(v, np.ndarray) and v.dtype.kind in "biu" and v.size <= MAX_FOLDED for v in values)


class _Folder:
    """The values known so far (``known``, and 1-D shapes with unknown entries in ``partial``) and
    the types of all values, filled in node by node."""

    def __init__(self, onnx, model) -> None:
        from onnx.reference import ReferenceEvaluator

        self.onnx, self.evaluator = onnx, ReferenceEvaluator
        self.opsets = list(model.opset_import)
        self.opset = {o.domain: o.version for o in self.opsets}
        g = model.graph
        self.types = {v.name: v.type for v in g.input}
        for t in g.initializer:
            self.types[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
        self.known: dict[str, np.ndarray] = {}
        self.partial: dict[str, list[int | None]] = {}

    def visit(self, node, protected: set[str]) -> None:
        if not (set(node.output) & protected or any(a.type == a.GRAPH for a in node.attribute)):
            self._evaluate(node)
        for name in node.output:
            if name in self.known:
                v = self.known[name]
                elem = self.onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
                self.types[name] = self.onnx.helper.make_tensor_type_proto(elem, list(v.shape))
        if all(o in self.types for o in node.output if o):
            return
        self.types.update(self._infer(node))

    def _evaluate(self, node) -> None:
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape":
            dims = _dims(self.types[node.input[0]]) if node.input[0] in self.types else None
            if dims is not None:
                shape = _shape_of(node, dims)
                if None in shape:
                    self.partial[node.output[0]] = shape
                else:
                    self.known[node.output[0]] = np.array(shape, dtype=np.int64)
            return
        if node.op_type == "Gather" and node.input[0] in self.partial and node.input[1] in self.known:
            picked = np.asarray(np.asarray(self.partial[node.input[0]], dtype=object)[self.known[node.input[1]]])
            if not any(v is None for v in picked.reshape(-1)):
                self.known[node.output[0]] = picked.astype(np.int64)
            return
        if all(i in self.known for i in inputs):
            try:
                values = self.evaluator(node, opsets=self.opset).run(None, {i: self.known[i] for i in inputs})
            except Exception:  # an op the reference runtime lacks: leave it to the runtime
                return
            values = [np.asarray(v) for v in values]
            # a Constant node becomes an initializer whatever its type: no arithmetic moves
            if _small_integers(values) or (node.op_type == "Constant" and values[0].size <= MAX_FOLDED):
                self.known.update(zip(node.output, values))

    def _infer(self, node) -> dict:
        onnx = self.onnx
        if any(i and i not in self.types for i in node.input):
            return {}
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset.get(node.domain, 1), node.domain)
            data = {i: onnx.numpy_helper.from_array(self.known[i], i) for i in node.input if i in self.known}
            return onnx.shape_inference.infer_node_outputs(
                schema, node, {i: self.types[i] for i in node.input if i}, data, opset_imports=self.opsets)
        except Exception:  # no schema or no inference for this node: its outputs stay unknown
            return {}


def fold_shape_arithmetic(onnx, model) -> None:
    """Replace the integer values of ``model``'s graph that are known at export by initializers
    (in place). Nodes left without consumers stay in the graph; :func:`~.graph.tidy` drops them."""
    graph = model.graph
    folder = _Folder(onnx, model)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        folder.visit(node, outputs)

    names = {n for node in graph.node for n in (*node.input, *node.output)}
    gb = GraphBuilder(onnx, names | {t.name for t in graph.initializer} | {i.name for i in graph.input})
    consts: dict[str, str] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in folder.known:
                if name not in consts:
                    consts[name] = gb.const(folder.known[name])
                node.input[k] = consts[name]
    graph.initializer.extend(gb.initializers)
