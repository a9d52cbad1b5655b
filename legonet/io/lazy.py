"""Reading safetensors checkpoints one tensor at a time, without memory-mapping whole shards.

:func:`open_sharded` parses a ``*.safetensors.index.json`` and every shard's header (names, dtypes,
shapes, byte ranges) without reading tensor data; :func:`read_tensor` then reads one tensor with a
plain ``seek`` + ``readinto``, so resident memory holds that tensor only (a memory map would keep
every page it touched resident, i.e. grow to the size of the shard).

The checks and the tensor order match :func:`legonet.io.checkpoints.read_state_dict`: index order
first, then tensors present in a shard but absent from the index, sorted by name, shard by shard.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from legonet.errors import CheckpointError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` bytes ``[start, end)``, with its dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    def meta(self) -> torch.Tensor:
        """A data-less stand-in (device ``meta``) with the tensor's dtype and shape."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor layout of one safetensors file, in name order; raises :class:`CheckpointError`."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (malformed header)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        e = header[name]
        ok = isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
        ok = ok and all(isinstance(s, int) and s >= 0 for s in e["shape"]) and len(e["data_offsets"]) == 2
        ok = ok and all(isinstance(o, int) and o >= 0 for o in e["data_offsets"])
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}")
        if e.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
        dtype = _DTYPES[e["dtype"]]
        lo, hi = e["data_offsets"]
        if hi - lo != math.prod(e["shape"]) * dtype.itemsize or base + hi > size or lo > hi:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (tensor {name!r} "
                                  "does not fit its byte range)")
        out[name] = TensorInfo(name, dtype, tuple(e["shape"]), path, base + lo, base + hi)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor from disk into a fresh CPU tensor (little-endian host assumed)."""
    nbytes = info.end - info.start
    if nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf.numpy()))
    except OSError as exc:
        raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({exc.strerror})") from None
    if got != nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
    return buf.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A sharded checkpoint's layout: ``shards`` in index order, each with its tensors.

    Attributes:
        index: the ``*.index.json`` path.
        shards: ``[(shard_path, {name: TensorInfo})]`` in the order the index first names them.
        order: every tensor name, in the order :func:`read_state_dict` would return them.
    """

    index: Path
    shards: list[tuple[Path, dict[str, TensorInfo]]]
    order: list[str]

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        found = {name: info for _, infos in self.shards for name, info in infos.items()}
        return {name: found[name] for name in self.order}


def open_sharded(index: str | Path) -> ShardedCheckpoint:
    """Parse a sharded-checkpoint index and its shards' headers; no tensor data is read."""
    path = Path(index)
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid JSON index ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: not a sharded-checkpoint index (no weight_map)")
    shards: list[tuple[Path, dict[str, TensorInfo]]] = []
    where: dict[str, str] = {}
    extras: list[str] = []
    for shard in dict.fromkeys(wm.values()):
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{path}: shard name {shard!r} points outside the index's folder")
        spath = path.parent / shard
        if not spath.is_file():
            raise CheckpointError(f"{path}: shard {shard} named in the index is missing")
        infos = read_header(spath)
        for name in infos:
            if name in where:
                raise CheckpointError(f"{path}: tensor {name!r} appears in both {where[name]} and {shard}")
            where[name] = shard
            if name not in wm:
                extras.append(name)
        shards.append((spath, infos))
    missing = [k for k, s in wm.items() if where.get(k) != s]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) listed in the index are not in their shard, "
                              f"e.g. {missing[0]!r}")
    return ShardedCheckpoint(path, shards, list(wm) + extras)
