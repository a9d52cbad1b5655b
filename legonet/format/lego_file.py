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
``[name, dtype, shape, crc32, codebook, [b_r, b_c], sqnr_db]`` when clustered or
``[name, dtype, shape, crc32]`` when kept. Offsets are not stored: they follow from the order and the
sizes. ``crc32`` is the zlib CRC-32 (8 hex digits) of the bytes of that codebook, packed index stream
or dense tensor.

Every declared size is checked against the real blob sizes before anything is decoded, so a
malformed file raises :class:`legonet.errors.FormatError` instead of allocating or crashing.
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

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.config import LegoConfig
from legonet.errors import ConfigError, FormatError
from legonet.io.atomic import atomic_path
from legonet.ops.bitpack import bits_for, pack_bits, packed_nbytes, unpack_bits
from legonet.ops.tiling import make_tiling

FORMAT_NAME = "legonet"
FORMAT_VERSION = 1
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
    if math.isinf(v):
        return "inf"
    return round(float(v), 3)


# -- writing ---------------------------------------------------------------------------------------
def serialize(cm: CompressedModel) -> bytes:
    """The bytes of the .lego file for ``cm`` (deterministic: equal inputs give equal bytes)."""
    from safetensors.torch import save as st_save

    codebook_dtype = {"float32": "F32", "float16": "F16"}[cm.config.codebook_dtype]
    cb_bytes, cb_meta = [], []
    for cb in cm.codebooks:
        b = _raw(cb.to(CODEBOOK_DTYPES[codebook_dtype]))
        cb_bytes.append(b)
        cb_meta.append([int(cb.shape[0]), int(cb.shape[1]), codebook_dtype, _crc(b)])
    idx_bytes, dense_bytes, entries = [], [], []
    for name, t in cm.tensors.items():
        if isinstance(t, ClusteredTensor):
            k = cm.codebooks[t.codebook].shape[0]
            b = pack_bits(t.indices.cpu().numpy(), bits_for(k)).tobytes()
            idx_bytes.append(b)
            entries.append([name, _dtype_name(t.dtype), list(t.shape), _crc(b), t.codebook,
                            list(t.block), _sqnr_json(t.sqnr_db)])
        else:
            b = _raw(t)
            dense_bytes.append(b)
            entries.append([name, _dtype_name(t.dtype), list(t.shape), _crc(b)])
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": cm.config.to_dict(),
            "codebooks": cb_meta, "tensors": entries}
    meta_b = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()

    def blob(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8) if any(parts) else torch.zeros(0, dtype=torch.uint8)

    tensors = {"legonet.meta": blob([meta_b]), "codebooks": blob(cb_bytes),
               "indices": blob(idx_bytes), "dense": blob(dense_bytes)}
    header = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "meta_crc32": _crc(meta_b)}
    return _canonical_header(st_save(tensors, metadata=header))


def _canonical_header(data: bytes) -> bytes:
    """Re-emit a safetensors header with sorted keys.

    safetensors writes ``__metadata__`` from a hash map whose order changes from one process to the
    next; sorting makes equal inputs give equal bytes. Data offsets are relative to the end of the
    header, so the data section is reused as it is.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    md = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(md.items()))} if md is not None else {}) | dict(sorted(header.items()))
    h = json.dumps(ordered, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n :]


def save(cm: CompressedModel, path: str | os.PathLike) -> int:
    """Write ``cm`` to ``path`` atomically; returns the number of bytes written."""
    data = serialize(cm)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return len(data)


# -- reading ---------------------------------------------------------------------------------------
def _fail(source: str, msg: str) -> FormatError:
    return FormatError(f"{source}: {msg}")


def _read_header(data: bytes, source: str) -> dict[str, Any]:
    if len(data) < 8:
        raise _fail(source, f"truncated or not a .lego file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _fail(source, f"truncated or not a .lego file (header says {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(source, "not a .lego file (no safetensors header)") from None
    if not isinstance(header, dict):
        raise _fail(source, "not a .lego file (malformed safetensors header)")
    return header


def _check_magic(header: dict[str, Any], source: str) -> None:
    md = header.get("__metadata__")
    if not isinstance(md, dict) or md.get("format") != FORMAT_NAME:
        raise _fail(source, "not a .lego file (a safetensors file without legonet metadata)")
    try:
        version = int(md.get("version", ""))
    except ValueError:
        raise _fail(source, f"unreadable format version {md.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise _fail(source, f"written by a newer legonet (format version {version}); this legonet reads "
                            f"versions up to {FORMAT_VERSION}: upgrade legonet")
    if version < 1:
        raise _fail(source, f"invalid format version {version}")


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _parse_meta(raw: bytes, source: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail(source, "metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise _fail(source, "metadata does not describe a legonet format-1 file")
    if not isinstance(meta.get("codebooks"), list) or not isinstance(meta.get("tensors"), list):
        raise _fail(source, "metadata lacks the codebooks or tensors list")
    return meta


def load(path: str | os.PathLike, *, verify: bool = True) -> CompressedModel:
    """Read a .lego file.

    Args:
        path: the file.
        verify: check every CRC-32 (default). Shapes and sizes are checked regardless.
    Raises:
        FormatError: naming the file and what is wrong with it.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{source}: is a folder, not a .lego file") from None
    except OSError as exc:
        raise FormatError(f"{source}: cannot read ({exc.strerror})") from None
    return deserialize(data, source=source, verify=verify)


def deserialize(data: bytes, *, source: str = "<bytes>", verify: bool = True) -> CompressedModel:
    """Parse the bytes of a .lego file; see :func:`load`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    header = _read_header(data, source)
    _check_magic(header, source)
    try:
        blobs = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(source, f"corrupt container ({str(exc).splitlines()[0][:200]})") from None
    if set(blobs) != set(_BLOBS):
        raise _fail(source, f"expected tensors {list(_BLOBS)}, found {sorted(blobs)}")
    for k, v in blobs.items():
        if v.dtype != torch.uint8 or v.ndim != 1:
            raise _fail(source, f"tensor {k!r} must be 1-D uint8")
    raw = {k: v.numpy().tobytes() for k, v in blobs.items()}
    if verify and _crc(raw["legonet.meta"]) != header["__metadata__"].get("meta_crc32"):
        raise _fail(source, "checksum mismatch in the metadata (the file is corrupt)")
    meta = _parse_meta(raw["legonet.meta"], source)
    try:
        config = LegoConfig.from_dict(meta.get("config"))
    except (ConfigError, TypeError) as exc:
        raise _fail(source, f"invalid config in metadata ({exc})") from None

    codebooks = _read_codebooks(meta["codebooks"], raw["codebooks"], source, verify)
    tensors: dict[str, ClusteredTensor | torch.Tensor] = {}
    idx_off = dense_off = 0
    for i, entry in enumerate(meta["tensors"]):
        name, dtype, shape, crc = _check_entry_head(entry, i, source)
        if name in tensors:
            raise _fail(source, f"tensor {name!r} appears twice")
        if len(entry) == 4:
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            chunk = raw["dense"][dense_off : dense_off + nbytes]
            if len(chunk) != nbytes:
                raise _fail(source, f"dense data too short for tensor {name!r} (truncated or corrupt)")
            if verify and _crc(chunk) != crc:
                raise _fail(source, f"checksum mismatch in tensor {name!r} (the file is corrupt)")
            tensors[name] = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(DTYPES[dtype]).reshape(shape) \
                if nbytes else torch.zeros(shape, dtype=DTYPES[dtype])
            dense_off += nbytes
        elif len(entry) == 7:
            ct, nbytes = _read_clustered(entry, name, dtype, shape, crc, codebooks, raw["indices"], idx_off, source, verify)
            tensors[name] = ct
            idx_off += nbytes
        else:
            raise _fail(source, f"tensor entry {i} has {len(entry)} fields (expected 4 or 7)")
    if dense_off != len(raw["dense"]) or idx_off != len(raw["indices"]):
        raise _fail(source, "blob sizes do not match the metadata (extra bytes)")
    return CompressedModel(config=config, codebooks=codebooks, tensors=tensors)


def _read_codebooks(entries: list, blob: bytes, source: str, verify: bool) -> list[torch.Tensor]:
    out, off = [], 0
    for i, e in enumerate(entries):
        if not (isinstance(e, list) and len(e) == 4 and _is_int(e[0], 1) and _is_int(e[1], 1)
                and e[0] <= 1 << 16 and e[1] <= 4096 and e[2] in CODEBOOK_DTYPES and isinstance(e[3], str)):
            raise _fail(source, f"codebook entry {i} is malformed")
        k, d, dt, crc = e
        nbytes = k * d * CODEBOOK_DTYPES[dt].itemsize
        chunk = blob[off : off + nbytes]
        if len(chunk) != nbytes:
            raise _fail(source, f"codebook {i} data too short (truncated or corrupt)")
        if verify and _crc(chunk) != crc:
            raise _fail(source, f"checksum mismatch in codebook {i} (the file is corrupt)")
        cb = torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(CODEBOOK_DTYPES[dt]).reshape(k, d).float()
        if not bool(torch.isfinite(cb).all()):
            raise _fail(source, f"codebook {i} holds non-finite values")
        out.append(cb)
        off += nbytes
    if off != len(blob):
        raise _fail(source, "codebook blob size does not match the metadata")
    return out


def _check_entry_head(entry: Any, i: int, source: str) -> tuple[str, str, tuple[int, ...], str]:
    if not isinstance(entry, list) or len(entry) < 4:
        raise _fail(source, f"tensor entry {i} is malformed")
    name, dtype, shape, crc = entry[:4]
    if not isinstance(name, str) or not name:
        raise _fail(source, f"tensor entry {i} has no name")
    if dtype not in DTYPES:
        raise _fail(source, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_int(s) for s in shape)):
        raise _fail(source, f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(crc, str):
        raise _fail(source, f"tensor {name!r} has an invalid checksum field")
    return name, dtype, tuple(shape), crc


def _read_clustered(entry, name, dtype, shape, crc, codebooks, blob, off, source, verify):
    cb_id, block, sqnr = entry[4:7]
    if not (_is_int(cb_id) and cb_id < len(codebooks)):
        raise _fail(source, f"tensor {name!r} refers to a missing codebook {cb_id!r}")
    if not (isinstance(block, list) and len(block) == 2 and all(_is_int(b, 1) for b in block)):
        raise _fail(source, f"tensor {name!r} has an invalid block {block!r}")
    if not DTYPES[dtype].is_floating_point or len(shape) < 2 or 0 in shape:
        raise _fail(source, f"tensor {name!r} cannot be a clustered tensor (dtype {dtype}, shape {list(shape)})")
    k, d = codebooks[cb_id].shape
    if block[0] * block[1] != d:
        raise _fail(source, f"tensor {name!r} has blocks {block} but its codebook holds vectors of {d}")
    if not (sqnr is None or sqnr == "inf" or (isinstance(sqnr, (int, float)) and not isinstance(sqnr, bool))):
        raise _fail(source, f"tensor {name!r} has an invalid sqnr field")
    tiling = make_tiling(shape, tuple(block))
    bits = bits_for(k)
    nbytes = packed_nbytes(tiling.num_blocks, bits)
    chunk = blob[off : off + nbytes]
    if len(chunk) != nbytes:
        raise _fail(source, f"index data too short for tensor {name!r} (truncated or corrupt)")
    if verify and _crc(chunk) != crc:
        raise _fail(source, f"checksum mismatch in tensor {name!r} (the file is corrupt)")
    idx = unpack_bits(np.frombuffer(chunk, dtype=np.uint8), bits, tiling.num_blocks)
    if idx.size and int(idx.max()) >= k:
        raise _fail(source, f"tensor {name!r} has index {int(idx.max())} >= K={k}")
    ct = ClusteredTensor(shape=tuple(shape), dtype=DTYPES[dtype], block=(block[0], block[1]), codebook=cb_id,
                         indices=torch.from_numpy(idx), sqnr_db=math.inf if sqnr == "inf" else sqnr)
    return ct, nbytes
