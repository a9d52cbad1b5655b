"""The network's ONNX graph: traced by PyTorch, its weights then spliced in compressed.

PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, which needs no
package beyond ``onnx``) traces the module with its parameters left as graph inputs
(``export_params=False``): every operation the module's forward performs, padding computed in
forward included ('SAME' convolutions), becomes ONNX nodes, and every tensor of the state dict
it uses becomes an input named as in the state dict. Neither constant folding nor the eval-mode
peephole (which would fuse BatchNorm into the convolution weights) runs, so each of those inputs
is one tensor of the compressed model. :func:`splice` then replaces them with the subgraphs of
:mod:`legonet.export.onnx.decode`.

The exporter's own symbolic of integer floor division rounds toward zero (its ``aten::floordiv``
is a truncating Div), which makes 'SAME' padding's ``-(-size // stride)`` wrong for odd sizes; the
trace runs with :func:`_floor_divide` in its place, which rounds as PyTorch does.

The exporter shares inputs whose values are equal (e.g. every BatchNorm's ``running_var`` of ones
in a freshly built network) through ``Identity`` nodes named after the duplicates; those are
replaced the same way.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from legonet.artifact import ClusteredTensor, CompressedModel, fills
from legonet.errors import ArchitectureError
from legonet.export.onnx.builder import GraphBuilder
from legonet.export.onnx.decode import check_index_width, clustered_value, codebook_value, kept_value

INPUT, OUTPUT = "input", "output"
_FLOATING = {"Float", "Double", "Half", "BFloat16"}
_FLOOR_DIVISIONS = ("aten::floordiv", "aten::floor_divide")


def _scalar_type(value) -> str | None:
    t = value.type()
    return t.scalarType() if hasattr(t, "scalarType") else None


def _floor_divide(g, a, b):
    """ONNX of ``a // b`` rounding toward minus infinity, as PyTorch does (a TorchScript symbolic)."""
    if not {_scalar_type(a), _scalar_type(b)} & _FLOATING:
        # Mod (fmod=0) takes the divisor's sign, so a - a mod b is a multiple of b: an exact division
        return g.op("Div", g.op("Sub", a, g.op("Mod", a, b, fmod_i=0)), b)
    a, b = (v if _scalar_type(v) in _FLOATING else g.op("Cast", v, to_i=1) for v in (a, b))  # 1: FLOAT
    return g.op("Floor", g.op("Div", a, b))


@contextlib.contextmanager
def _python_floor_division(opset: int) -> Iterator[None]:
    """Export floor divisions with :func:`_floor_divide` while the context lasts (the exporter's
    symbolic registry is process-wide: the built-in symbolics are back afterwards)."""
    for name in _FLOOR_DIVISIONS:
        torch.onnx.register_custom_op_symbolic(name, _floor_divide, opset)
    try:
        yield
    finally:
        for name in _FLOOR_DIVISIONS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def trace(onnx, module: nn.Module, input_size: tuple[int, ...], opset: int, label: str):
    """The ``onnx.ModelProto`` of ``module`` (in eval mode) on a float32 input of shape
    ``(batch, *input_size)``, batch dynamic, with its tensors as graph inputs.

    Raises:
        ArchitectureError: the module cannot be traced or has an operation ONNX lacks.
    """
    # a batch of 2: a batch of 1 lets some modules take shortcuts (squeezes) that would be traced
    x = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _python_floor_division(opset):
            # the legacy exporter warns that it is legacy; tracing warns about Python values
            # taken from tensors (e.g. padding computed from the input size, fixed here)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(
                module, (x,), buf, dynamo=False, export_params=False, do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
    except (torch.onnx.errors.OnnxExporterError, RuntimeError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArchitectureError(f"cannot export {label} to ONNX: {first}") from None
    return onnx.load_from_string(buf.getvalue())


def _elem_type(value_info) -> int:
    return value_info.type.tensor_type.elem_type


def splice(onnx, model, cm: CompressedModel) -> None:
    """Replace the tensor inputs of the traced ``model`` by their definitions from ``cm`` (in place).

    Raises:
        ArchitectureError: the graph uses a tensor ``cm`` does not hold.
        ConfigError: a tensor cannot be rebuilt in the graph (e.g. indices wider than 16 bits).
    """
    graph = model.graph
    params = {i.name: _elem_type(i) for i in graph.input if i.name != INPUT}
    wanted = dict(params)  # name -> element type the graph expects
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in params and node.output[0] in cm.tensors:
            wanted[node.output[0]] = params[node.input[0]]
        else:
            kept_nodes.append(node)
    missing = [n for n in wanted if n not in cm.tensors]
    if missing:
        raise ArchitectureError(f"the traced graph uses {len(missing)} tensor(s) the compressed model does not "
                                f"hold (e.g. {missing[0]!r})")
    used = [n for n in cm.tensors if n in wanted]  # the state dict's order: a deterministic file
    clustered = {n: cm.tensors[n] for n in used if isinstance(cm.tensors[n], ClusteredTensor)}
    for n, ct in clustered.items():  # fail before building anything
        check_index_width(n, int(cm.codebooks[ct.codebook].shape[0]))

    gb = GraphBuilder(onnx, _names(graph))
    books: dict[int, str] = {}
    filled = fills(cm.tensors)
    for n in used:
        t = cm.tensors[n]
        if isinstance(t, ClusteredTensor):
            if t.codebook not in books:
                books[t.codebook] = codebook_value(gb, cm, t.codebook)
            clustered_value(gb, n, t, books[t.codebook], int(cm.codebooks[t.codebook].shape[0]), wanted[n])
        else:
            kept_value(gb, n, t, wanted[n], filled.get(n))

    inputs = [i for i in graph.input if i.name == INPUT]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(gb.nodes + kept_nodes)  # definitions first: the list stays topologically sorted
    graph.initializer.extend(gb.initializers)


def _names(graph) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def tidy(graph, keep: set[str]) -> None:
    """Drop nodes and initializers no output depends on, node names and doc strings, and give
    every intermediate value outside ``keep`` a short name (in place): names are a large part of
    a file whose weights are small (``/layer1/layer1.0/conv1/Conv_output_0`` per value)."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(live)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    graph.doc_string = ""

    fixed = keep | {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    rename: dict[str, str] = {}
    count = 0
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in fixed:
                while (short := f"~{_base36(count)}") in fixed:
                    count += 1
                count += 1
                rename[name] = short
                node.output[i] = short


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
