"""ONNX subgraphs that rebuild a compressed model's tensors from what its .lego file stores.

Each function appends nodes and initializers to a :class:`~legonet.export.onnx.builder.GraphBuilder`
and returns the name of the value it defines. The values are bit-identical to
:meth:`legonet.CompressedModel.reconstruct` (float32 arithmetic in the same order):

* indices: the bit-packed stream of :mod:`legonet.ops.bitpack` (``w = ceil(log2 K)`` bits each,
  little-endian bit order). For ``w`` of 8 or 16 the stream is a uint8 / uint16 array; for any
  other ``w`` every 8 indices fill exactly ``w`` bytes, so the stream is viewed as ``(groups, w)``
  bytes and index ``j`` of a group is read from the bytes ``(j*w) // 8`` onwards: a Gather of fixed
  byte positions, the bytes combined little-endian, a shift right by ``(j*w) % 8`` and a mask;
* codebook ``(K, b_r*b_c)``: float16 or float32 as stored, or int8 times a float32 scale;
* the weight: centroids gathered by index ``(num_blocks, b_r*b_c)``, the block grid put back
  row-major (:mod:`legonet.ops.tiling`) into the 2-D view ``(rows, cols)``, padding cropped, rows
  multiplied by their gains, reshaped to the tensor's shape;
* row gains: float16, or 8-bit log codes decoded as :mod:`legonet.ops.scalar_codes` does (in
  float64, then rounded to float32);
* kept tensors: an initializer in their stored dtype; fills: ``ConstantOfShape``.

ONNX Runtime folds these subgraphs (all their inputs are constants) when a session loads, so
inference runs on dense weights while the file holds the compressed form.
"""

from __future__ import annotations

import numpy as np
import torch

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.errors import ConfigError
from legonet.export.onnx.builder import GraphBuilder, onnx_dtype, raw_bytes, torch_dtype
from legonet.ops.bitpack import bits_for, pack_bits
from legonet.ops.scalar_codes import codebook_levels, gain_levels

# Widest index the unpacking reads: 16 bits (K <= 65536), at most 3 bytes per index.
MAX_INDEX_BITS = 16


def byte_layout(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Where index ``j`` (0..7) of a group of 8 ``width``-bit indices (``width`` bytes) lies.

    Returns:
        ``(positions (8, span) int32, shifts (8,) int32)``: the bytes holding index ``j`` are
        ``positions[j]`` (little-endian; positions past the group's end are clamped, their bits
        are masked off), and the index starts ``shifts[j]`` bits into the first of them.
    """
    starts = np.arange(8) * width
    first, shifts = starts // 8, starts % 8
    span = int(((shifts + width + 7) // 8).max())
    positions = np.minimum(first[:, None] + np.arange(span)[None, :], width - 1)
    return positions.astype(np.int32), shifts.astype(np.int32)


def packed_indices(gb: GraphBuilder, name: str, indices: torch.Tensor, width: int) -> str:
    """Initializer ``name`` of ``(num_blocks,)`` indices bit-packed at ``width`` bits, and the
    subgraph unpacking it; returns the ``(num_blocks,)`` int32 value."""
    onnx = gb.onnx
    count = int(indices.numel())
    packed = pack_bits(indices.cpu().numpy(), width)
    if width == 8:
        gb.initializer(name, packed.tobytes(), onnx.TensorProto.UINT8, (count,))
        return gb.op("Cast", name, to=onnx.TensorProto.INT32)
    if width == 16:
        gb.initializer(name, packed.tobytes(), onnx.TensorProto.UINT16, (count,))
        return gb.op("Cast", name, to=onnx.TensorProto.INT32)
    groups = -(-count // 8)
    # the stream's last byte is already padded; pad on to whole groups of 8 indices (< width bytes)
    data = packed.tobytes().ljust(groups * width, b"\0")
    gb.initializer(name, data, onnx.TensorProto.UINT8, (groups, width))
    positions, shifts = byte_layout(width)
    span = positions.shape[1]
    # int32 arithmetic: an index and the bits around it take at most 7 + 16 bits
    parts = gb.op("Gather", name, gb.const(positions), axis=1)  # (groups, 8, span) uint8
    parts = gb.op("Cast", parts, to=onnx.TensorProto.INT32)
    if span > 1:  # little-endian bytes -> one integer (shifts by 0, 8, 16 bits)
        parts = gb.op("Mul", parts, gb.const(np.int32(256) ** np.arange(span, dtype=np.int32)))
    value = gb.op("ReduceSum", parts, gb.const([-1]), keepdims=0)  # (groups, 8)
    # shift right by a non-negative amount: integer division by 2**shift
    value = gb.op("Div", value, gb.const(np.int32(1) << shifts))
    value = gb.op("BitwiseAnd", value, gb.const(np.int32((1 << width) - 1)))
    flat = gb.op("Reshape", value, gb.const([-1]))
    if groups * 8 == count:
        return flat
    return gb.op("Slice", flat, gb.const([0]), gb.const([count]), gb.const([0]))


def codebook_value(gb: GraphBuilder, cm: CompressedModel, i: int) -> str:
    """Initializer of codebook ``i`` as the .lego file stores it; returns its float32 value."""
    onnx = gb.onnx
    cb = cm.codebooks[i]
    k, dim = int(cb.shape[0]), int(cb.shape[1])
    name = f"codebook.{i}"
    if i in cm.codebook_scales:
        scale = cm.codebook_scales[i]
        q = codebook_levels(cb, scale)
        if q is None:
            raise ConfigError(f"codebook {i} is not on its int8 grid (changed after compact storage "
                              "without legonet.compact.recode_compact)")
        gb.initializer(name, raw_bytes(q), onnx.TensorProto.INT8, (k, dim))
        values = gb.op("Cast", name, to=onnx.TensorProto.FLOAT)
        return gb.op("Mul", values, gb.const(np.float32(scale)))
    if cm.config.codebook_dtype == "float16":
        gb.initializer(name, raw_bytes(cb.to(torch.float16)), onnx.TensorProto.FLOAT16, (k, dim))
        return gb.op("Cast", name, to=onnx.TensorProto.FLOAT)
    return gb.initializer(name, raw_bytes(cb.float()), onnx.TensorProto.FLOAT, (k, dim))


def gains_value(gb: GraphBuilder, name: str, ct: ClusteredTensor) -> str:
    """Initializer ``name`` of the row gains of ``ct`` as stored; returns their ``(rows, 1)`` float32 value."""
    onnx = gb.onnx
    rows = int(ct.shape[0])
    if ct.gain_code is None:
        gb.initializer(name, raw_bytes(ct.scale.to(torch.float16)), onnx.TensorProto.FLOAT16, (rows, 1))
        return gb.op("Cast", name, to=onnx.TensorProto.FLOAT)
    lo, step = ct.gain_code
    codes = gain_levels(ct.scale, lo, step)
    if codes is None:
        raise ConfigError(f"the row gains of {name!r} are not on their log code (changed after compact "
                          "storage without legonet.compact.recode_compact)")
    gb.initializer(name, raw_bytes(codes), onnx.TensorProto.UINT8, (rows, 1))
    # byte = sign bit 7 | level 0..127; level 0 is an exact zero, level l is exp(lo + step*(l-1))
    level = gb.op("BitwiseAnd", name, gb.const(np.uint8(0x7F)))
    x = gb.op("Cast", level, to=onnx.TensorProto.DOUBLE)
    x = gb.op("Sub", x, gb.const(np.float64(1.0)))
    x = gb.op("Mul", x, gb.const(np.float64(step)))
    x = gb.op("Add", x, gb.const(np.float64(lo)))
    mag = gb.op("Cast", gb.op("Exp", x), to=onnx.TensorProto.FLOAT)
    nonzero = gb.op("Cast", level, to=onnx.TensorProto.BOOL)
    mag = gb.op("Where", nonzero, mag, gb.const(np.float32(0.0)))
    negative = gb.op("Cast", gb.op("BitwiseAnd", name, gb.const(np.uint8(0x80))), to=onnx.TensorProto.BOOL)
    return gb.op("Where", negative, gb.op("Neg", mag), mag)


def check_index_width(name: str, k: int) -> int:
    """The index width of a tensor clustered on a codebook of ``k`` entries.

    Raises:
        ConfigError: naming the tensor when its indices are wider than :data:`MAX_INDEX_BITS`.
    """
    width = bits_for(k)
    if width > MAX_INDEX_BITS:
        raise ConfigError(f"tensor {name!r}: its codebook of {k} entries needs {width}-bit indices; the ONNX "
                          f"export unpacks at most {MAX_INDEX_BITS} bits (K <= 65536)")
    return width


def clustered_value(gb: GraphBuilder, name: str, ct: ClusteredTensor, codebook: str, k: int, elem_type: int) -> str:
    """Define value ``name`` (element type ``elem_type``) as the weight ``ct`` rebuilt from the
    float32 ``codebook`` value ``(k, b_r*b_c)`` and its packed indices; returns ``name``."""
    onnx = gb.onnx
    tiling = ct.tiling
    width = check_index_width(name, k)
    idx = packed_indices(gb, f"{name}.idx", ct.indices, width)
    blocks = gb.op("Gather", codebook, idx, axis=0)  # (num_blocks, b_r*b_c)
    (br, bc), (gr, gc) = tiling.block, tiling.grid
    w = gb.op("Reshape", blocks, gb.const([gr, gc, br, bc]))
    if br > 1 and gc > 1:  # otherwise the permutation moves no element
        w = gb.op("Transpose", w, perm=[0, 2, 1, 3])
    cropped = (gr * br, gc * bc) != (tiling.rows, tiling.cols)
    if cropped or ct.scale is not None:  # (a reshape straight to the tensor's shape does otherwise)
        w = gb.op("Reshape", w, gb.const([gr * br, gc * bc]))
        if cropped:
            w = gb.op("Slice", w, gb.const([0, 0]), gb.const([tiling.rows, tiling.cols]), gb.const([0, 1]))
        if ct.scale is not None:
            w = gb.op("Mul", w, gains_value(gb, f"{name}.gains", ct))
    # round to the stored dtype as reconstruct does, then to the dtype the graph computes in
    casts, current = [], onnx.TensorProto.FLOAT
    for to in (onnx_dtype(onnx, ct.dtype), elem_type):
        if to != current:
            casts.append(to)
            current = to
    w = gb.op("Reshape", w, gb.const(list(ct.shape)), out=None if casts else name)
    for i, to in enumerate(casts):
        w = gb.op("Cast", w, to=to, out=name if i == len(casts) - 1 else None)
    return name


def kept_value(gb: GraphBuilder, name: str, t: torch.Tensor, elem_type: int, fill: float | None) -> str:
    """Define value ``name`` (element type ``elem_type``) as the kept tensor ``t``: an initializer in
    its stored dtype, or for a fill (all elements one value) a ``ConstantOfShape``; returns ``name``."""
    onnx = gb.onnx
    stored = onnx_dtype(onnx, t.dtype)
    if fill is not None:
        # the value as the module holds it after load_into (a copy into its parameter's dtype)
        v = torch.tensor([fill], dtype=t.dtype).to(torch_dtype(onnx, elem_type))
        value = onnx.helper.make_tensor("value", elem_type, [1], raw_bytes(v), raw=True)
        return gb.op("ConstantOfShape", gb.const(list(t.shape)), out=name, value=value)
    if stored == elem_type:
        return gb.initializer(name, raw_bytes(t), stored, tuple(t.shape))
    data = gb.initializer(f"{name}.stored", raw_bytes(t), stored, tuple(t.shape))
    return gb.op("Cast", data, to=elem_type, out=name)
