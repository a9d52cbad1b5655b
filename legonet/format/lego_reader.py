"""Reading a .lego file (the layout is described in :mod:`legonet.format.lego_file`).

Reading never executes code and never trusts a declared size: the safetensors framing (header
length, entry offsets tiling the data area exactly), every codebook's K, dimension and dtype, every
tensor's dtype, shape (at most 16 dims, each < 2**62), codebook reference, block and bit width are
checked against the real byte counts before anything is allocated or decoded; indices >= K,
non-finite codebook values and bool bytes other than 0/1 are rejected; CRC-32s are verified unless
``verify=False``. A version-3 file's compressed metadata is inflated to at most
:data:`~legonet.format.lego_file.MAX_META_BYTES` (a zlib bomb is refused, not unpacked), its int8
codebook scales and gain codes must be finite float32 values in range. A version-4 file's
entropy-coded index streams must decode to exactly their tensor's number of blocks, consume their
bytes exactly and end in the coder's initial state; decoding allocates only for the tensor's
(already bounded) number of blocks. A version-5 file's aliases must each be a new name referring to
a tensor of the file. Every failure is a
:class:`legonet.errors.FormatError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import zlib
from typing import Any

import numpy as np
import torch

from legonet.aliases import alias_problem
from legonet.artifact import MAX_FILL, MAX_FILL_TOTAL, ClusteredTensor, CompressedModel
from legonet.config import LegoConfig
from legonet.errors import ConfigError, FormatError
from legonet.format.lego_file import (
    _BLOBS,
    _FILL_VERSION,
    _MAX_NDIM,
    ALIAS_VERSION,
    CODEBOOK_DTYPES,
    COMPACT_VERSION,
    DTYPES,
    ENTROPY_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_META_BYTES,
    _crc,
)
from legonet.ops import rans
from legonet.ops.bitpack import bits_for, packed_nbytes, unpack_bits
from legonet.ops.scalar_codes import (
    decode_codebook,
    decode_gains,
    float32_from_hex,
    valid_codebook_scale,
    valid_gain_code,
)
from legonet.ops.tiling import make_tiling

# torch sizes are int64; a dimension near this bound can only be a lie told by a small file.
_MAX_DIM = 1 << 62
_VERSION_RE = re.compile(r"[0-9]{1,6}")


def _fail(source: str, msg: str) -> FormatError:
    return FormatError(f"{source}: {msg}")


def _parse_json(raw: bytes, source: str, what: str) -> Any:
    # ValueError covers bad UTF-8 and integers longer than Python's 4300-digit limit;
    # RecursionError covers absurdly nested arrays.
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise _fail(source, f"{what} is not valid JSON") from None


def _check_magic(md: Any, source: str) -> int:
    if not isinstance(md, dict) or md.get("format") != FORMAT_NAME:
        raise _fail(source, "not a .lego file (a safetensors file without legonet metadata)")
    v = md.get("version")
    if not (isinstance(v, str) and _VERSION_RE.fullmatch(v)):
        raise _fail(source, f"unreadable format version {str(v)[:20]!r}")
    version = int(v)
    if version > FORMAT_VERSION:
        raise _fail(source, f"written by a newer legonet (format version {version}); this legonet reads "
                            f"versions up to {FORMAT_VERSION}: upgrade legonet")
    if version < 1:
        raise _fail(source, f"invalid format version {version}")
    return version


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _split_container(data: memoryview, source: str) -> tuple[dict[str, Any], dict[str, memoryview], int]:
    """Check the safetensors framing; return the header metadata and the four blobs (zero-copy views).

    The rules are safetensors' own (8-byte little-endian header length, JSON header, data offsets
    tiling the data area with no gap, overlap or trailing byte), checked here rather than by the
    safetensors library so that every violation is a :class:`FormatError` and nothing is copied.
    """
    if len(data) < 8:
        raise _fail(source, f"truncated or not a .lego file ({len(data)} bytes)")
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        raise _fail(source, f"truncated or not a .lego file (header says {n} bytes, file has {len(data) - 8})")
    header = _parse_json(bytes(data[8 : 8 + n]), source, "the safetensors header (not a .lego file?)")
    if not isinstance(header, dict):
        raise _fail(source, "not a .lego file (malformed safetensors header)")
    version = _check_magic(header.get("__metadata__"), source)
    found = sorted(k for k in header if k != "__metadata__")
    if found != sorted(_BLOBS):
        raise _fail(source, f"expected tensors {sorted(_BLOBS)}, found {found[:8]}")
    body = data[8 + n :]
    spans = []
    for k in _BLOBS:
        e = header[k]
        shape, offs = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (None, None)
        if not (isinstance(e, dict) and e.get("dtype") == "U8" and isinstance(shape, list) and len(shape) == 1
                and isinstance(offs, list) and len(offs) == 2 and all(_is_int(x) for x in shape + offs)
                and offs[1] - offs[0] == shape[0]):
            raise _fail(source, f"container entry {k!r} is malformed (expected a 1-D uint8 tensor)")
        spans.append((offs[0], offs[1], k))
    pos = 0
    for b, e, _k in sorted(spans):
        if b != pos:
            raise _fail(source, "container data areas overlap or leave gaps (corrupt)")
        pos = e
    if pos != len(body):
        raise _fail(source, f"container data area is {len(body)} bytes but its header describes {pos} "
                            "(truncated or extended file)")
    return header["__metadata__"], {k: body[b:e] for b, e, k in spans}, version


def _inflate(raw: bytes, source: str) -> bytes:
    """The JSON of a version-3 file's zlib-compressed metadata, refusing more than MAX_META_BYTES."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, MAX_META_BYTES + 1)
    except zlib.error:
        raise _fail(source, "the metadata is not valid zlib data (corrupt)") from None
    if len(out) > MAX_META_BYTES:
        raise _fail(source, f"the metadata inflates to more than {MAX_META_BYTES:,} bytes (corrupt or hostile)")
    if not d.eof or d.unused_data:
        raise _fail(source, "the metadata's zlib stream is truncated or followed by extra bytes (corrupt)")
    return out


def _parse_meta(raw: bytes, source: str, version: int) -> dict[str, Any]:
    if version >= COMPACT_VERSION:
        raw = _inflate(raw, source)
    meta = _parse_json(raw, source, "metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or type(meta.get("version")) is not int \
            or meta["version"] != version:
        raise _fail(source, f"metadata does not describe a legonet format-{version} file")
    if not isinstance(meta.get("codebooks"), list) or not isinstance(meta.get("tensors"), list):
        raise _fail(source, "metadata lacks the codebooks or tensors list")
    return meta


def load(path: str | os.PathLike, *, verify: bool = True) -> CompressedModel:
    """Read a .lego file.

    Memory: the file is read whole; nothing else is allocated before every declared size has been
    checked against it, so a lying header costs at most the file's own size. Decoded indices take
    8 bytes per block.

    Args:
        path: the file.
        verify: check every CRC-32 (default). Shapes, sizes, offsets and index ranges are checked
            regardless.
    Raises:
        FormatError: naming the file and what is wrong with it.
    """
    source = str(path)
    try:
        st = os.stat(path)
        # A FIFO or device would block or never end: only regular files are read.
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{source}: " + ("is a folder, not a .lego file" if stat.S_ISDIR(st.st_mode)
                                               else "not a regular file"))
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(f"{source}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{source}: cannot read ({exc.strerror or exc})") from None
    return deserialize(data, source=source, verify=verify)


def deserialize(data: bytes | bytearray | memoryview, *, source: str = "<bytes>", verify: bool = True) -> CompressedModel:
    """Parse the bytes of a .lego file; see :func:`load`."""
    md, blobs, version = _split_container(memoryview(data).cast("B"), source)
    meta_raw = bytes(blobs["legonet.meta"])
    if verify and _crc(meta_raw) != md.get("meta_crc32"):
        raise _fail(source, "checksum mismatch in the metadata (the file is corrupt)")
    meta = _parse_meta(meta_raw, source, version)
    try:
        config = LegoConfig.from_dict(meta.get("config"))
    except (ConfigError, TypeError, ValueError) as exc:
        raise _fail(source, f"invalid config in metadata ({str(exc)[:300]})") from None

    codebooks, codebook_scales = _read_codebooks(meta["codebooks"], blobs["codebooks"], source, verify, version)
    tensors: dict[str, ClusteredTensor | torch.Tensor] = {}
    idx_off = dense_off = filled = 0
    for i, entry in enumerate(meta["tensors"]):
        name, dtype, shape, crc = _check_entry_head(entry, i, source, version)
        if name in tensors:
            raise _fail(source, f"tensor {name!r} appears twice")
        if len(entry) == 5 and crc == "fill" and version >= _FILL_VERSION:
            tensors[name] = _read_fill(name, dtype, shape, entry[4], MAX_FILL_TOTAL - filled, source)
            filled += tensors[name].numel()
        elif len(entry) == 4:
            tensors[name], nbytes = _read_dense(name, dtype, shape, crc, blobs["dense"], dense_off, source, verify)
            dense_off += nbytes
        elif len(entry) in (7, 8) or (len(entry) == 9 and version >= COMPACT_VERSION):
            ct, nbytes = _read_clustered(entry, name, dtype, shape, crc, codebooks, blobs["indices"],
                                         idx_off, source, verify)
            idx_off += nbytes
            if len(entry) == 9:
                ct.scale, ct.gain_code, nbytes = _read_gain_codes(entry, name, shape, blobs["dense"], dense_off,
                                                                  source, verify)
                dense_off += nbytes
            elif len(entry) == 8:
                scale, nbytes = _read_dense(f"{name} (scales)", "F16", (shape[0],), entry[7], blobs["dense"],
                                            dense_off, source, verify)
                if not bool(torch.isfinite(scale).all()):
                    raise _fail(source, f"tensor {name!r} has non-finite scales")
                ct.scale = scale.float()
                dense_off += nbytes
            tensors[name] = ct
        else:
            raise _fail(source, f"tensor entry {i} has {len(entry)} fields (expected 4, 7 or 8"
                                + (", 5 for a fill" if version >= _FILL_VERSION else "")
                                + (", 9 for log-coded gains" if version >= COMPACT_VERSION else "") + ")")
    if dense_off != len(blobs["dense"]) or idx_off != len(blobs["indices"]):
        raise _fail(source, "blob sizes do not match the metadata (extra bytes)")
    return CompressedModel(config=config, codebooks=codebooks, tensors=tensors, codebook_scales=codebook_scales,
                           source_dtypes=_read_source_dtypes(meta.get("source_dtypes"), tensors, source),
                           aliases=_read_aliases(meta.get("aliases"), tensors, source, version))


def _read_aliases(entry: Any, tensors: dict, source: str, version: int) -> dict[str, str]:
    """``{alias: source}`` from the optional ``aliases`` map (version 5): each alias a new name,
    each source a tensor of the file."""
    if entry is None:
        return {}
    if version < ALIAS_VERSION:  # an older reader would drop these names without a word
        raise _fail(source, f"aliases need format version {ALIAS_VERSION}, the file says {version}")
    if not isinstance(entry, dict):
        raise _fail(source, "aliases is malformed (expected an object of names)")
    problem = alias_problem(entry, tensors)
    if problem is not None:
        raise _fail(source, problem)
    return dict(entry)


def _read_source_dtypes(entry: Any, tensors: dict, source: str) -> dict[str, torch.dtype]:
    """``{name: dtype}`` from the optional ``source_dtypes`` map: floating dtypes, each naming kept
    floating tensors of the file, every name at most once."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise _fail(source, "source_dtypes is malformed")
    out: dict[str, torch.dtype] = {}
    for dtype, names in entry.items():
        if names == "*" and len(entry) == 1:  # every kept float16 tensor
            names = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.dtype == torch.float16]
        if dtype not in DTYPES or not DTYPES[dtype].is_floating_point or not isinstance(names, list):
            raise _fail(source, f"source_dtypes has an invalid entry {str(dtype)[:20]!r}")
        for name in names:
            t = tensors.get(name) if isinstance(name, str) else None
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or name in out:
                raise _fail(source, f"source_dtypes names {str(name)[:80]!r}, not a kept floating tensor "
                                    "of the file (or twice)")
            out[name] = DTYPES[dtype]
    return out


def _read_codebooks(entries: list, blob: memoryview, source: str, verify: bool,
                    version: int) -> tuple[list[torch.Tensor], dict[int, float]]:
    out, scales, off = [], {}, 0
    for i, e in enumerate(entries):
        int8 = (version >= COMPACT_VERSION and isinstance(e, list) and len(e) == 5 and e[2] == "I8")
        scale = float32_from_hex(e[4]) if int8 else None
        if int8 and not valid_codebook_scale(scale):
            raise _fail(source, f"codebook {i} has an invalid int8 scale {str(e[4])[:40]}")
        if not (isinstance(e, list) and (len(e) == 4 or int8) and _is_int(e[0], 1, 1 << 16) and _is_int(e[1], 1, 4096)
                and isinstance(e[2], str) and (e[2] in CODEBOOK_DTYPES or int8) and isinstance(e[3], str)):
            raise _fail(source, f"codebook entry {i} is malformed")
        k, d, dt, crc = e[:4]
        nbytes = k * d * (1 if int8 else CODEBOOK_DTYPES[dt].itemsize)
        if nbytes > len(blob) - off:
            raise _fail(source, f"codebook {i} data too short (truncated or corrupt)")
        chunk = blob[off : off + nbytes]
        if verify and _crc(chunk) != crc:
            raise _fail(source, f"checksum mismatch in codebook {i} (the file is corrupt)")
        raw = torch.frombuffer(bytearray(chunk), dtype=torch.uint8)
        if int8:
            scales[i] = scale
            cb = decode_codebook(raw.view(torch.int8).reshape(k, d), scale)
        else:
            cb = raw.view(CODEBOOK_DTYPES[dt]).reshape(k, d).float()
        if not bool(torch.isfinite(cb).all()):
            raise _fail(source, f"codebook {i} holds non-finite values")
        out.append(cb)
        off += nbytes
    if off != len(blob):
        raise _fail(source, "codebook blob size does not match the metadata")
    return out, scales


def _read_gain_codes(entry, name, shape, blob, off, source, verify):
    crc, code = entry[7], entry[8]
    lo, step = (float32_from_hex(code[0]), float32_from_hex(code[1])) if isinstance(code, list) and len(code) == 2 \
        else (None, None)
    if not valid_gain_code(lo, step):
        raise _fail(source, f"tensor {name!r} has an invalid gain code {str(code)[:60]}")
    codes, nbytes = _read_dense(f"{name} (gain codes)", "U8", (shape[0],), crc, blob, off, source, verify)
    return decode_gains(codes, lo, step), (lo, step), nbytes


def _check_entry_head(entry: Any, i: int, source: str, version: int) -> tuple[str, str, tuple[int, ...], Any]:
    if not isinstance(entry, list) or len(entry) < 4:
        raise _fail(source, f"tensor entry {i} is malformed")
    name, dtype, shape, crc = entry[:4]
    if not isinstance(name, str) or not name:
        raise _fail(source, f"tensor entry {i} has no name")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(source, f"tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_int(s, 0, _MAX_DIM) for s in shape)
            and math.prod(s for s in shape if s) <= _MAX_DIM):
        raise _fail(source, f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
    coded = (version >= ENTROPY_VERSION and isinstance(crc, list) and len(crc) == 3 and crc[0] == "rans"
             and isinstance(crc[1], str) and _is_int(crc[2], 1) and len(entry) in (7, 8, 9))
    if not (isinstance(crc, str) or coded):
        raise _fail(source, f"tensor {name!r} has an invalid checksum field")
    return name, dtype, tuple(shape), crc


def _read_dense(name, dtype, shape, crc, blob, off, source, verify) -> tuple[torch.Tensor, int]:
    dt = DTYPES[dtype]
    numel = math.prod(shape)
    nbytes = numel * dt.itemsize
    if nbytes > len(blob) - off:  # before anything is allocated
        raise _fail(source, f"dense data too short for tensor {name!r} (truncated or corrupt)")
    chunk = blob[off : off + nbytes]
    if verify and _crc(chunk) != crc:
        raise _fail(source, f"checksum mismatch in tensor {name!r} (the file is corrupt)")
    if numel == 0:
        return torch.zeros(shape, dtype=dt), 0
    if dt is torch.bool and int(np.frombuffer(chunk, dtype=np.uint8).max()) > 1:
        raise _fail(source, f"bool tensor {name!r} holds bytes other than 0 and 1")
    return torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(dt).reshape(shape), nbytes


def _read_fill(name, dtype, shape, value, room, source) -> torch.Tensor:
    dt = DTYPES[dtype]
    if not dt.is_floating_point:
        raise _fail(source, f"fill tensor {name!r} must be floating-point, not {dtype}")
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise _fail(source, f"fill tensor {name!r} has an invalid value {str(value)[:40]}")
    numel = math.prod(shape)
    if numel > min(MAX_FILL, room):  # before anything is allocated
        raise _fail(source, f"fill tensor {name!r} of {numel} elements exceeds the limit of fills")
    return torch.full(shape, float(value), dtype=dt)


def _read_clustered(entry, name, dtype, shape, crc, codebooks, blob, off, source, verify):
    cb_id, block, sqnr = entry[4:7]
    if not (_is_int(cb_id) and cb_id < len(codebooks)):
        raise _fail(source, f"tensor {name!r} refers to a missing codebook {str(cb_id)[:20]}")
    if not (isinstance(block, list) and len(block) == 2 and all(_is_int(b, 1, 4096) for b in block)):
        raise _fail(source, f"tensor {name!r} has an invalid block {str(block)[:40]}")
    if not DTYPES[dtype].is_floating_point or len(shape) < 2 or 0 in shape:
        raise _fail(source, f"tensor {name!r} cannot be a clustered tensor (dtype {dtype}, shape {list(shape)})")
    k, d = codebooks[cb_id].shape
    if block[0] * block[1] != d:
        raise _fail(source, f"tensor {name!r} has blocks {block} but its codebook holds vectors of {d}")
    if not (sqnr is None or sqnr in ("inf", "-inf") or (isinstance(sqnr, (int, float)) and not isinstance(sqnr, bool))):
        raise _fail(source, f"tensor {name!r} has an invalid sqnr field")
    tiling = make_tiling(shape, (block[0], block[1]))
    bits = bits_for(k)
    coded = isinstance(crc, list)
    # numel <= num_blocks * d, so this check also bounds what reconstruction will allocate.
    packed = packed_nbytes(tiling.num_blocks, bits)
    nbytes = crc[2] if coded else packed
    if coded and nbytes >= packed:  # the writer bit-packs a stream that coding does not make smaller
        raise _fail(source, f"tensor {name!r} has an entropy-coded stream longer than its packed indices")
    if coded and tiling.num_blocks > rans.MAX_SYMBOLS_PER_BYTE * nbytes:  # before decoding allocates
        raise _fail(source, f"tensor {name!r} declares {tiling.num_blocks:,} blocks for an entropy-coded stream "
                            f"of {nbytes:,} bytes (more than {rans.MAX_SYMBOLS_PER_BYTE} per byte)")
    if nbytes > len(blob) - off:
        raise _fail(source, f"index data too short for tensor {name!r} (truncated or corrupt)")
    chunk = blob[off : off + nbytes]
    if verify and _crc(chunk) != (crc[1] if coded else crc):
        raise _fail(source, f"checksum mismatch in tensor {name!r} (the file is corrupt)")
    if coded:
        try:
            idx = rans.decode(np.frombuffer(chunk, dtype=np.uint8), k, tiling.num_blocks)
        except ValueError as exc:
            raise _fail(source, f"tensor {name!r} has an invalid entropy-coded index stream ({exc})") from None
    else:
        idx = unpack_bits(np.frombuffer(chunk, dtype=np.uint8), bits, tiling.num_blocks)
    if idx.size and int(idx.max()) >= k:
        raise _fail(source, f"tensor {name!r} has index {int(idx.max())} >= K={k}")
    sqnr_db = {"inf": math.inf, "-inf": -math.inf}.get(sqnr, sqnr) if isinstance(sqnr, str) else sqnr
    ct = ClusteredTensor(shape=tuple(shape), dtype=DTYPES[dtype], block=(block[0], block[1]), codebook=cb_id,
                         indices=torch.from_numpy(idx), sqnr_db=sqnr_db)
    return ct, nbytes
