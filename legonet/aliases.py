"""Tensors shared by several names (tied weights), found once and restored under every name.

A language model whose output head reuses its token embedding (``head.weight = tok.weight``) lists
that one tensor under two state-dict keys. Compressed key by key it would be clustered twice,
stored twice and counted twice in the original size. legonet keeps the first name and records the
others as aliases, ``{alias: source}``: the tensor is compressed, stored and counted once, and a
decompressed state dict lists it under every name again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch


def _view_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same values: one storage, the same view of it; None for tensors
    without storage of their own to share (empty, or on the meta device)."""
    if t.is_meta or t.numel() == 0:
        return None
    storage = t.untyped_storage()
    if storage.data_ptr() == 0:
        return None
    return (t.device, storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def shared_tensor_aliases(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: source}`` for the keys of ``sd`` whose tensor is a view of the same storage, at the
    same offset, shape, stride and dtype, as an earlier key's (the source: the first such key).

    Tensors that only overlap (a slice of another, a transposed view) are not aliases: each is a
    tensor of its own to the file.
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in sd.items():
        key = _view_key(t)
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def alias_problem(aliases: Mapping[str, str], names: Collection[str]) -> str | None:
    """What is wrong with ``aliases`` for a model whose stored tensors are ``names``, or None: every
    alias must be a new name and every source one of ``names`` (not another alias)."""
    for alias, source in aliases.items():
        if not (isinstance(alias, str) and alias and isinstance(source, str)):
            return f"alias {str(alias)[:80]!r}: {str(source)[:80]!r} is not a pair of tensor names"
        if alias in names:
            return f"alias {alias[:80]!r} is also the name of a stored tensor"
        if source not in names:
            return f"alias {alias[:80]!r} refers to a missing tensor {source[:80]!r}"
    return None


def with_aliases(sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``sd`` with every alias added after its own keys, each the very tensor of its source (so a
    module whose weights are tied gets one value for them, and an untied one that value for each)."""
    out = dict(sd)
    for alias, source in aliases.items():
        out[alias] = sd[source]
    return out


def unsupported(aliases: Mapping[str, str], what: str) -> str | None:
    """The one-line refusal of a consumer that holds each weight under one name only (``what``,
    e.g. ``"C export"``) for a model with tied tensors, or None when there are none."""
    if not aliases:
        return None
    alias, source = next(iter(aliases.items()))
    return f"{what} does not support tied tensors: {alias!r} shares {source!r} ({len(aliases)} alias(es) in the compressed model)"
