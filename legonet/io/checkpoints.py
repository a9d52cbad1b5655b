"""Reading model weights from the files users have, without executing code from them.

Supported: ``.safetensors``; sharded checkpoints through their ``*.safetensors.index.json``;
PyTorch files (``.pt``/``.pth``/``.bin``) read with ``torch.load(weights_only=True)`` only; and
``.lego`` files (reconstructed dense). The kind is recognised from the file's first bytes, not its
name, so a misnamed file still gets a clear answer.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from legonet.errors import CheckpointError, FormatError


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8:
            return "safetensors"
    if head[:1] == b"{" or path.name.endswith(".json"):
        return "json"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "torch-legacy"
    return "unknown"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, and whatever torch raises for a dtype it lacks
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first})") from None


def _is_lego(path: Path) -> bool:
    from legonet.format.lego_file import FORMAT_NAME

    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            return False
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            return False
    md = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(md, dict) and md.get("format") == FORMAT_NAME


def _load_sharded(path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a valid JSON index ({str(exc)[:200]})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        raise CheckpointError(f"{path}: not a sharded-checkpoint index (no weight_map)")
    if not wm:
        raise CheckpointError(f"{path}: the index's weight_map is empty (no tensors)")
    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for shard in dict.fromkeys(wm.values()):
        spath = path.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{path}: shard name {shard!r} points outside the index's folder")
        if not spath.is_file():
            raise CheckpointError(f"{path}: shard {shard} named in the index is missing")
        for k, v in _load_safetensors(spath).items():
            if k in out:
                raise CheckpointError(f"{path}: tensor {k!r} appears in both {where[k]} and {shard}")
            out[k], where[k] = v, shard
    missing = [k for k, s in wm.items() if where.get(k) != s]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) listed in the index are not in their shard, "
                              f"e.g. {missing[0]!r}")
    return {k: out[k] for k in wm} | {k: v for k, v in out.items() if k not in wm}


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read as a PyTorch state dict with weights_only=True "
                              f"(refusing to unpickle arbitrary objects): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the PyTorch file does not hold a state dict of tensors")
    return dict(obj)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The files reading ``path`` touches: the file itself and, for a sharded index, its shards.

    Best effort and cheap (the index's JSON only): what cannot be parsed here is reported by
    :func:`read_state_dict`. Commands use it to refuse an output path that would overwrite an input.
    """
    p = Path(path)
    files = [p]
    if p.is_file() and p.name.endswith(".json"):
        try:
            wm = json.loads(p.read_bytes()).get("weight_map")
        except (OSError, ValueError, RecursionError, AttributeError):
            return files
        if isinstance(wm, dict):
            files += [p.parent / s for s in dict.fromkeys(wm.values()) if isinstance(s, str) and s]
    return files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dense ``{name: tensor}`` from a checkpoint or .lego file; raises :class:`CheckpointError`.

    Errors name the file: missing, a folder, not a regular file, unreadable, empty, of an unknown
    kind, corrupt, a pickle that ``torch.load(weights_only=True)`` refuses, an index naming a missing
    shard or a tensor found in two shards, or a checkpoint without tensors.
    """
    p = Path(path)
    try:
        return _read_state_dict(p)
    except OSError as exc:  # e.g. permission denied, I/O error: still one line naming the file
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from None


def _read_state_dict(p: Path) -> dict[str, torch.Tensor]:
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; give a .safetensors file, an *.index.json or a .pt file")
    if not p.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file")
    kind = _sniff(p)
    if kind == "safetensors":
        if _is_lego(p):
            from legonet.format import load

            try:
                return load(p).to_state_dict()
            except FormatError as exc:
                raise CheckpointError(str(exc)) from None
        sd = _load_safetensors(p)
    elif kind == "json":
        sd = _load_sharded(p)
    elif kind in ("torch-zip", "torch-legacy"):
        sd = _load_torch(p)
    else:
        raise CheckpointError(f"{p}: not a checkpoint (expected safetensors, a sharded index .json, "
                              "or a PyTorch state dict)")
    if not sd:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    return sd
