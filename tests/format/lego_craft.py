"""Test helper: take a .lego file apart and put it back together with valid checksums.

Written from the format description (safetensors framing + JSON metadata + CRC-32s), not with
legonet's own reader, so that crafted files exercise the loader's checks rather than agree with it.
"""

from __future__ import annotations

import json
import struct
import zlib

import torch

import legonet


def crc(b: bytes) -> str:
    return f"{zlib.crc32(b) & 0xFFFFFFFF:08x}"


def tiny_model_bytes(scope: str = "model", codebook_dtype: str = "float32", clusters: int = 3,
                     compact: bool = False, entropy: bool = False) -> bytes:
    """A small compressed model with clustered tensors and kept tensors of several dtypes; with
    ``compact``, per-layer codebooks and row gains stored in 8 bits (format version 3); with
    ``entropy``, a sparse tensor whose index stream is entropy-coded (format version 4)."""
    g = torch.Generator().manual_seed(0)
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(5, 12, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(4, generator=g).half(),
    }
    if entropy:
        sparse = torch.randn(32, 64, generator=g) * (torch.rand(32, 64, generator=g) < 0.15)
        cfg = legonet.LegoConfig(block=(2, 2), clusters=16, scope="layer", entropy_coding=True)
        return legonet.compress({**sd, "sparse.weight": sparse}, cfg).to_bytes()
    if compact:
        cfg = legonet.LegoConfig(block=(2, 2), clusters=clusters, scope="layer", scales="row", compact_storage=True)
        cm = legonet.compress(sd, cfg)
        assert cm.codebook_scales and all(t.gain_code is not None for t in cm.clustered.values())
        return cm.to_bytes()
    cfg = legonet.LegoConfig(block=(2, 2), clusters=clusters, scope=scope, codebook_dtype=codebook_dtype)
    return legonet.compress(sd, cfg).to_bytes()


def split(data: bytes) -> tuple[dict, dict, dict[str, bytes]]:
    """(safetensors __metadata__, legonet meta JSON, {blob name: bytes}); the metadata of version 3
    and later is zlib-compressed in the file."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    blobs = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    raw = blobs["legonet.meta"]
    if header["__metadata__"]["version"] in ("3", "4", "5"):
        raw = zlib.decompress(raw)
    return header["__metadata__"], json.loads(raw), blobs


def join(md: dict, meta: dict, blobs: dict[str, bytes], *, fix_crc: bool = True) -> bytes:
    """Rebuild a file; with ``fix_crc`` the metadata checksum is recomputed (tensor CRCs are the caller's).
    The metadata is zlib-compressed when ``md`` says version 3, 4 or 5."""
    blobs = dict(blobs)
    blobs["legonet.meta"] = json.dumps(meta, separators=(",", ":")).encode()
    if md.get("version") in ("3", "4", "5"):
        blobs["legonet.meta"] = zlib.compress(blobs["legonet.meta"])
    md = dict(md)
    if fix_crc:
        md["meta_crc32"] = crc(blobs["legonet.meta"])
    return container(md, blobs)


def container(md: dict, blobs: dict[str, bytes]) -> bytes:
    """The safetensors framing around ``blobs`` as given (the metadata blob is not re-encoded)."""
    header: dict = {"__metadata__": md}
    off = 0
    for k in sorted(blobs):
        header[k] = {"dtype": "U8", "shape": [len(blobs[k])], "data_offsets": [off, off + len(blobs[k])]}
        off += len(blobs[k])
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs[k] for k in sorted(blobs))
