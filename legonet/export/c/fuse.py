"""Graph rewrites before memory planning: fewer passes over activations, fewer buffers.

* zero padding of H/W whose only reader is a convolution becomes the convolution's own padding
  (the 'SAME' pad of TensorFlow ports traced as ``F.pad`` + ``F.conv2d``);
* a per-channel affine (BatchNorm) and/or activation whose input only it reads is merged into the
  ``post`` of the op producing that input when that op has no activation yet: BatchNorm is thereby
  folded into the preceding convolution or linear layer, ReLU into the convolution, the add of a
  residual block or the BatchNorm before it (the weights themselves are never changed: the
  convolution multiplies its accumulator, so clustered weights stay clustered);
* operations whose result nothing reads are dropped.
"""

from __future__ import annotations

from legonet.export.c.graph import Graph, Op, Post

# ops that apply a per-channel ``post`` to their results / ops that apply only its activation
_AFFINE_POST = ("conv", "linear", "pointwise")
_ACT_POST = ("scalar", "binary")


def _producers(graph: Graph) -> dict[int, Op]:
    return {op.output: op for op in graph.ops}


def _only_reader(graph: Graph, value: int, op: Op) -> bool:
    return graph.consumers()[value] == [op]


def _merge(first: Post, then: Post) -> Post:
    """``then(first(x))`` as one Post; ``first`` has no activation."""
    mul = first.mul if then.mul is None else (then.mul if first.mul is None else first.mul * then.mul)
    add = first.add
    if then.mul is not None and add is not None:
        add = add * then.mul
    if then.add is not None:
        add = then.add if add is None else add + then.add
    return Post(mul=mul, add=add, act=then.act, lo=then.lo, hi=then.hi)


def _fuse_pads(graph: Graph) -> None:
    producers = _producers(graph)
    for op in list(graph.ops):
        pad = producers.get(op.inputs[0]) if op.kind == "conv" else None
        if (pad is None or pad.kind != "pad" or pad.attrs["value"] != 0.0 or pad.attrs["pads"][0] != (0, 0)
                or not _only_reader(graph, pad.output, op)):
            continue
        (top, _), (left, _) = pad.attrs["pads"][1], pad.attrs["pads"][2]
        op.attrs["pad"] = (op.attrs["pad"][0] + top, op.attrs["pad"][1] + left)
        op.inputs = [pad.inputs[0]]
        graph.ops.remove(pad)


def _fold_posts(graph: Graph) -> None:
    for op in list(graph.ops):
        if op.kind != "pointwise":
            continue
        src = _producers(graph).get(op.inputs[0])
        if src is None or src.attrs.get("post") is None or src.attrs["post"].act != "none":
            continue
        per_channel = op.attrs["post"].mul is not None or op.attrs["post"].add is not None
        fits = src.kind in _AFFINE_POST or (src.kind in _ACT_POST and not per_channel)
        if src.kind == "linear" and per_channel and len(graph.shapes[src.output]) != 2:
            fits = False  # a BatchNorm1d over (1, T, F) scales T, not the linear layer's outputs
        if fits and _only_reader(graph, src.output, op):
            src.attrs["post"] = _merge(src.attrs["post"], op.attrs["post"])
            src.output = op.output
            graph.ops.remove(op)


def _drop_dead(graph: Graph) -> None:
    while True:
        users = graph.consumers()
        dead = [op for op in graph.ops if op.kind != "input" and not users[op.output]]
        if not dead:
            return
        for op in dead:
            graph.ops.remove(op)


def fuse(graph: Graph) -> Graph:
    """Apply the rewrites above to ``graph`` in place; returns it."""
    _drop_dead(graph)
    _fuse_pads(graph)
    _fold_posts(graph)
    return graph
