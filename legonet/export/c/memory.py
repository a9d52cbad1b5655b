"""Static memory plan: every activation at a fixed offset of one float arena.

Values joined by a reshape (``alias``) share one buffer. An elementwise op (``pointwise``,
``scalar``, ``binary``) writes over a full-size input whose buffer nothing reads afterwards
(in place). Each remaining buffer lives from the op that writes it to the last op that reads it
(the network's output to the end); buffers whose lifetimes overlap get disjoint ranges, placed
greedily largest first at the lowest offset that fits, the "greedy by size" planner of
TensorFlow Lite Micro and ONNX Runtime. Offsets and sizes are in floats.
"""

from __future__ import annotations

from dataclasses import dataclass

from legonet.export.c.graph import ELEMENTWISE, Graph


@dataclass(frozen=True)
class MemoryPlan:
    """Where each value lives.

    Attributes:
        offsets: ``{value: offset}`` in floats from the arena's start, for every value an op writes.
        arena_floats: the arena's size.
        activation_floats: the sum of every buffer's size: the arena needed without reuse.
        buffers: number of distinct buffers (after aliasing and in-place ops).
    """

    offsets: dict[int, int]
    arena_floats: int
    activation_floats: int
    buffers: int


def _alias_roots(graph: Graph) -> dict[int, int]:
    root = {}
    for op in graph.ops:
        for v in (*op.inputs, op.output):
            root.setdefault(v, v)
        if op.kind == "alias":
            root[op.output] = root[op.inputs[0]]
    return root


def plan_memory(graph: Graph) -> MemoryPlan:
    """The arena layout of ``graph`` (whose ops are in execution order)."""
    root = _alias_roots(graph)
    last_read = {}
    for i, op in enumerate(graph.ops):
        for v in op.inputs:
            last_read[root[v]] = i
    last_read[root[graph.output]] = len(graph.ops)

    buffer_of: dict[int, int] = {}  # alias root -> buffer (the root value that first owned it)
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for i, op in enumerate(graph.ops):
        r = root[op.output]
        if op.kind == "alias":
            continue
        reuse = None
        if op.kind in ELEMENTWISE:
            for v in op.inputs:
                src = root[v]
                if graph.numel(v) == graph.numel(op.output) and last_read.get(src) == i:
                    reuse = buffer_of[src]
                    break
        if reuse is None:
            buffer_of[r] = r
            start[r] = i
        else:
            buffer_of[r] = reuse
        b = buffer_of[r]
        end[b] = max(end.get(b, i), last_read.get(r, i))

    size = {b: graph.numel(b) for b in start}
    placed: list[tuple[int, int, int]] = []  # (offset, buffer, size)
    offset_of: dict[int, int] = {}
    for b in sorted(size, key=lambda b: (-size[b], start[b])):
        busy = sorted((o, s) for o, other, s in placed if start[other] <= end[b] and start[b] <= end[other])
        at = 0
        for o, s in busy:
            if at + size[b] <= o:
                break
            at = max(at, o + s)
        placed.append((at, b, size[b]))
        offset_of[b] = at
    offsets = {v: offset_of[buffer_of[r]] for v, r in root.items() if r in buffer_of}
    arena = max((o + s for o, _, s in placed), default=0)
    return MemoryPlan(offsets=offsets, arena_floats=arena, activation_floats=sum(size.values()), buffers=len(size))
