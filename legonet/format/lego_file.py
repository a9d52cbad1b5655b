"""The .lego file: a safetensors container that loads without executing code.

Layout (format version 1). The safetensors header's ``__metadata__`` holds
``{"format": "legonet", "version": "1", "meta_crc32": "<hex>"}`` and the file holds four 1-D uint8
tensors:

* ``legonet.meta``: compact UTF-8 JSON, described below;
* ``codebooks``: every codebook's raw little-endian values, one after another;
* ``indices``: every clustered tensor's bit-packed indices (see :mod:`legonet.ops.bitpack`), each
  tensor starting on a byte boundary, in the order of ``tensors``;
* ``dense``: the raw little-endian bytes of every tensor kept as it is, in the order of ``tensors``.

The JSON is ``{"format", "version", "config", "codebooks", "tensors"}`` where ``codebooks`` is a list of
``[K, dim, dtype, crc32]`` and ``tensors`` lists every tensor of the model in its original order, as
``[name, dtype, shape, crc32, codebook, [b_r, b_c], sqnr_db]`` when clustered (with an eighth field,
the crc32 of its per-row float16 scales, when it was compressed with gain-shape scales; those
``2 * shape[0]`` bytes sit in ``dense`` at the tensor's place in the order) or
``[name, dtype, shape, crc32]`` when kept. A kept floating tensor of 2 or more elements that all
hold one finite value is written as ``[name, dtype, shape, "fill", value]`` with no bytes in
``dense`` (e.g. BatchNorm running statistics in inference form); files holding such an entry say
format version 2 (everything else is unchanged, so files without one are still version 1 and
older legonet versions read them). A fill may hold at most 2**22 elements, 2**24 in one file, so
that a small file cannot make the reader allocate much. Offsets are not stored: they follow from
the order and the sizes. ``crc32`` is the zlib CRC-32 (8 hex digits) of the bytes of that codebook, packed index stream
or dense tensor.

Format version 3 (files of models with :attr:`~legonet.config.LegoConfig.compact_storage`) adds,
for the small overheads of high ratios (see :mod:`legonet.compact`): ``legonet.meta`` holds the JSON
zlib-compressed (``meta_crc32`` is the CRC-32 of the compressed bytes); a codebook may be
``[K, dim, "I8", crc32, scale]``, ``K * dim`` int8 values whose codebook is their float32 product
with ``scale``; a clustered tensor may have a ninth field ``[lo, step]``, its row gains then being
``shape[0]`` bytes of 8-bit log codes (:mod:`legonet.ops.scalar_codes`) in ``dense``, not float16.
``scale``, ``lo`` and ``step`` are float32 values written as the 8 hex digits of their big-endian
bit pattern (exact, and of one width whatever the value, so that a later change of a code cannot
lengthen the metadata).
Version 1 and 2 files are written exactly as before.

Format version 4 (files of models with :attr:`~legonet.config.LegoConfig.entropy_coding` where
coding made some index stream smaller) lets a clustered tensor's ``crc32`` field be
``["rans", crc32, nbytes]``: its index stream is then ``nbytes`` bytes entropy-coded as
:mod:`legonet.ops.rans` specifies, not bit-packed. Everything else is as in version 3 (a version-4
file without compact storage still has its metadata zlib-compressed).

Format version 5 (files of models with tied weights: one tensor listed under several names, e.g.
an output head sharing the token embedding) adds ``"aliases": {alias: source, ...}``: the tensor is
stored once, under ``source`` (a name in ``tensors``), and a reader lists it under each ``alias``
(a name not in ``tensors``) too. Everything else is as in version 4.

Any version may carry ``"source_dtypes": {dtype: [name, ...]}``: kept floating tensors stored in a
narrower dtype than the checkpoint they came from had (target mode stores them in float16), listed
under the dtype a reader restores them to; ``{dtype: "*"}`` (the only key then) stands for every kept
float16 tensor of the file. Readers that do not know the key read the stored dtype.

``sqnr_db`` is a number, ``null``, or the string ``"inf"``/``"-inf"`` (JSON has no infinities;
``"-inf"``, an all-zero tensor, was written as ``"inf"`` before this was fixed). The ``config``
object omits ``allow_nonfinite`` when it is false, so default files are byte-identical to those of
the first format-1 writer; a file compressed with ``allow_nonfinite=True`` carries the key, which
legonet versions without that option reject as an unknown config key.

Reading, and every check it makes before trusting a size, is :mod:`legonet.format.lego_reader`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from typing import Any

import numpy as np
import torch

from legonet.aliases import alias_problem
from legonet.artifact import (
    ClusteredTensor,
    CompressedModel,
    fills,
)
from legonet.errors import FormatError
from legonet.io.atomic import atomic_path
from legonet.ops.scalar_codes import codebook_levels, float32_hex, gain_levels

FORMAT_NAME = "legonet"
FORMAT_VERSION = 5  # the newest version this legonet reads; it writes the lowest that holds the file (see serialize)
_FILL_VERSION = 2
COMPACT_VERSION = 3
ENTROPY_VERSION = 4
ALIAS_VERSION = 5
# the largest metadata JSON a version-3 file may inflate to (a few KB per thousand tensors)
MAX_META_BYTES = 1 << 28
_BLOBS = ("legonet.meta", "codebooks", "indices", "dense")
_MAX_NDIM = 16

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CODEBOOK_DTYPES = {"F32": torch.float32, "F16": torch.float16}


def _crc(b: bytes | memoryview | np.ndarray) -> str:
    return f"{zlib.crc32(b) & 0xFFFFFFFF:08x}"


def _raw(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (legonet targets little-endian hosts)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} cannot be stored in a .lego file") from None


def _sqnr_json(v: float | None) -> float | str | None:
    if v is None:
        return None
    if math.isinf(v):  # JSON has no infinities; -inf (an all-zero tensor) must not read back as +inf
        return "inf" if v > 0 else "-inf"
    return round(float(v), 3)


# Config keys added after the first format-1 writer: omitted from the file while at their default.
_LATER_CONFIG_KEYS = {"allow_nonfinite": False, "scales": "none", "kept_dtype": "keep", "scale_stat": "rms",
                      "unshrink": False, "compact_storage": False, "entropy_coding": False}


# -- writing ---------------------------------------------------------------------------------------
def serialize(cm: CompressedModel) -> bytes:
    """The bytes of the .lego file for ``cm`` (deterministic: equal inputs give equal bytes)."""
    codebook_dtype = {"float32": "F32", "float16": "F16"}[cm.config.codebook_dtype]
    compact = cm.config.compact_storage or bool(cm.codebook_scales) or any(
        t.gain_code is not None for t in cm.clustered.values())
    cb_bytes, cb_meta = [], []
    for i, cb in enumerate(cm.codebooks):
        if i in cm.codebook_scales:
            scale = cm.codebook_scales[i]
            q = codebook_levels(cb, scale)
            if q is None:
                raise FormatError(f"codebook {i} is not on its int8 grid (changed after compact storage "
                                  "without legonet.compact.recode_compact)")
            b = _raw(q)
            cb_bytes.append(b)
            cb_meta.append([int(cb.shape[0]), int(cb.shape[1]), "I8", _crc(b), float32_hex(scale)])
            continue
        b = _raw(cb.to(CODEBOOK_DTYPES[codebook_dtype]))
        cb_bytes.append(b)
        cb_meta.append([int(cb.shape[0]), int(cb.shape[1]), codebook_dtype, _crc(b)])
    idx_bytes, dense_bytes, entries = [], [], []
    filled = fills(cm.tensors)
    coded_any = False
    for name, t in cm.tensors.items():
        if isinstance(t, ClusteredTensor):
            b, coded = cm.index_stream(name)
            idx_bytes.append(b)
            coded_any |= coded
            entry = [name, _dtype_name(t.dtype), list(t.shape), ["rans", _crc(b), len(b)] if coded else _crc(b),
                     t.codebook, list(t.block), _sqnr_json(t.sqnr_db)]
            if t.scale is not None and t.gain_code is not None:
                codes = gain_levels(t.scale, *t.gain_code)
                if codes is None:
                    raise FormatError(f"the row gains of {name!r} are not on their log code (changed after "
                                      "compact storage without legonet.compact.recode_compact)")
                sb = _raw(codes)
                dense_bytes.append(sb)
                entry += [_crc(sb), [float32_hex(t.gain_code[0]), float32_hex(t.gain_code[1])]]
            elif t.scale is not None:
                sb = _raw(t.scale.to(torch.float16))
                dense_bytes.append(sb)
                entry.append(_crc(sb))
            entries.append(entry)
        elif name in filled:
            entries.append([name, _dtype_name(t.dtype), list(t.shape), "fill", filled[name]])
        else:
            b = _raw(t)
            dense_bytes.append(b)
            entries.append([name, _dtype_name(t.dtype), list(t.shape), _crc(b)])
    config = cm.config.to_dict()
    for key, default in _LATER_CONFIG_KEYS.items():  # keep default files byte-identical to the first writer's
        if config.get(key) == default:
            config.pop(key, None)
    # the lowest version that holds what is present: files stay readable by older legonet versions
    # (which, not knowing aliases, would silently lose the names of tied tensors: hence a version)
    version = (ALIAS_VERSION if cm.aliases else ENTROPY_VERSION if coded_any else COMPACT_VERSION if compact
               else _FILL_VERSION if any(len(e) == 5 for e in entries) else 1)
    meta = {"format": FORMAT_NAME, "version": version, "config": config,
            "codebooks": cb_meta, "tensors": entries}
    if cm.source_dtypes:  # only where some kept tensor was narrowed: other files are written as before
        meta["source_dtypes"] = _source_dtypes_entry(cm)
    if cm.aliases:
        problem = alias_problem(cm.aliases, cm.tensors)
        if problem is not None:
            raise FormatError(f"cannot write the model: {problem}")
        meta["aliases"] = dict(cm.aliases)
    meta_b = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if version >= COMPACT_VERSION:
        meta_b = zlib.compress(meta_b, 9)

    blobs = {"legonet.meta": meta_b, "codebooks": b"".join(cb_bytes),
             "indices": b"".join(idx_bytes), "dense": b"".join(dense_bytes)}
    header = {"format": FORMAT_NAME, "version": str(version), "meta_crc32": _crc(meta_b)}
    return _container(blobs, header)


def _source_dtypes_entry(cm: CompressedModel) -> dict[str, Any]:
    """``{dtype: [names]}``, or ``{dtype: "*"}`` when every kept float16 tensor came from that one
    dtype (the usual case, target mode on a float32 checkpoint: a few bytes instead of every name)."""
    widen: dict[str, list[str]] = {}
    for name in cm.tensors:
        if name in cm.source_dtypes:
            widen.setdefault(_dtype_name(cm.source_dtypes[name]), []).append(name)
    half = [n for n, t in cm.dense.items() if t.dtype == torch.float16]
    if len(widen) == 1 and next(iter(widen.values())) == half:
        return {next(iter(widen)): "*"}
    return dict(sorted(widen.items()))


def _container(blobs: dict[str, bytes], metadata: dict[str, str]) -> bytes:
    """A safetensors file of 1-D uint8 tensors, laid out as the safetensors library lays it out.

    Written here rather than by ``safetensors.torch.save`` because that library orders the
    ``__metadata__`` keys by a hash map, differently from run to run, and the file must be
    deterministic. Layout: u64 header length, compact JSON header (metadata first, then tensors by
    name) padded with spaces to a multiple of 8, then the tensors' bytes in the same order.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    off = 0
    for name in sorted(blobs):
        n = len(blobs[name])
        header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs[name] for name in sorted(blobs))


def save(cm: CompressedModel, path: str | os.PathLike) -> int:
    """Write ``cm`` to ``path`` atomically; returns the number of bytes written."""
    data = serialize(cm)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return len(data)
