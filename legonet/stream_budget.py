"""The byte budget once the real index streams are known.

Target mode plans each tensor's index stream at the entropy-coded size it estimates for k-means
indices from a sample, and its allocation moves in steps of a whole setting: on EfficientNet-Lite1
at 8x the first file left 6 % of its budget unused. The layer fit then chooses every block's index
again with error feedback (:mod:`legonet.calibrate.layer_fit`), which changes the streams'
statistics: on ResNet-50 at 128x they came out 6.5 % smaller in all than planned, and on some
tensor they may grow. This module keeps the file within its plan and spends what is left:

* :func:`undo_growth` gives codebooks their state before a step back, those whose bytes grew most
  first, until the clustered tensors' bytes are within the plan again;
* :func:`spend_slack` spends what a first file leaves below its target (target mode's last step);
* :func:`spend_savings` plans again, with each tensor's entries costed as its own stream shrank,
  re-clusters and refits the tensors whose setting changes, and undoes that where it went over.

The bytes compared are each clustered tensor's index stream (as the writer codes it), codebook and
row gains; everything else in the file is as target mode verified it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from legonet.artifact import CompressedModel
from legonet.compact import store_compact
from legonet.clustering import Group, compress_groups
from legonet.allocation import Choice, allocate, side_nbytes

# bytes kept free per re-planned tensor: its metadata fields (K, block, codes) may lengthen a little
_META_MARGIN = 48


def entry_bytes(cm: CompressedModel) -> dict[str, int]:
    """Per clustered tensor: index stream (as the writer codes it) + codebook + row gains, in bytes.
    Codebooks are counted for the first tensor using them."""
    out, seen = {}, set()
    cb_item = 2 if cm.config.codebook_dtype == "float16" else 4
    for n, ct in cm.clustered.items():
        nb = len(cm.index_stream(n)[0])
        if ct.codebook not in seen:
            seen.add(ct.codebook)
            nb += int(cm.codebooks[ct.codebook].numel()) * (1 if ct.codebook in cm.codebook_scales else cb_item)
        if ct.scale is not None:
            nb += ct.shape[0] * (1 if ct.gain_code is not None else 2)
        out[n] = nb
    return out


def snapshot(cm: CompressedModel, nbytes: dict[str, int] | None = None) -> dict:
    """What the layer fit and :func:`spend_savings` may change: each clustered tensor and the codebooks;
    ``nbytes``: :func:`entry_bytes` of ``cm`` if the caller has it (coding every stream takes seconds)."""
    return {"tensors": {n: replace(ct, indices=ct.indices.clone(), scale=None if ct.scale is None else ct.scale.clone())
                        for n, ct in cm.clustered.items()},
            "codebooks": [cb.clone() for cb in cm.codebooks], "scales": dict(cm.codebook_scales),
            "bytes": entry_bytes(cm) if nbytes is None else nbytes}


def restore(cm: CompressedModel, state: dict) -> None:
    """Give every clustered tensor and codebook of ``cm`` back its ``state`` (a :func:`snapshot`)."""
    cm.codebooks[:] = [cb.clone() for cb in state["codebooks"]]
    cm.codebook_scales.clear()
    cm.codebook_scales.update(state["scales"])
    cm.tensors.update(state["tensors"])


def undo_growth(cm: CompressedModel, budget: int, state: dict) -> list[str]:
    """Give codebooks (with all their tensors) back their ``state`` (a :func:`snapshot`), those whose
    bytes grew most since first, until the clustered tensors' bytes are at most ``budget``; the
    state's own total must be within it. Returns the tensors given back."""
    now = entry_bytes(cm)
    excess = sum(now.values()) - budget
    users: dict[int, list[str]] = {}
    for n, ct in cm.clustered.items():
        users.setdefault(ct.codebook, []).append(n)
    before = state["bytes"]
    order = sorted(users.items(), key=lambda kv: -sum(now[n] - before.get(n, 0) for n in kv[1]))
    undone: list[str] = []
    for cb_id, names in order:
        if excess <= 0:
            break
        if sum(now[n] - before.get(n, 0) for n in names) <= 0:
            continue
        cm.codebooks[cb_id] = state["codebooks"][cb_id]
        cm.codebook_scales.pop(cb_id, None)
        if cb_id in state["scales"]:
            cm.codebook_scales[cb_id] = state["scales"][cb_id]
        for n in names:
            cm.tensors[n] = state["tensors"][n]
            excess -= now[n] - before[n]
        undone += names
    return undone


def _overhead(shape: tuple[int, ...], c: Choice) -> int:
    return side_nbytes(shape, c.block, c.clusters, c.compact)


def spend_savings(
    cm: CompressedModel,
    weights: Mapping[str, torch.Tensor],
    tables: Mapping[str, list[Choice]],
    plan: Mapping[str, Choice],
    budget: int,
    refit: Callable[[list[str]], None],
    *,
    element_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Choice]:
    """Spend the bytes by which the clustered tensors fall short of ``budget`` on better settings.

    Each tensor's menu entries (``tables``, as target mode evaluated them) are costed as the fit
    left that tensor: its planned entry at its real bytes, the others with their estimated stream
    scaled by how much the tensor's own stream shrank against its estimate. The allocation is made
    again for the real total plus what is free; every tensor whose entry changes is clustered anew
    (``weights``, ``element_weights``: as target mode clustered it), stored compactly if its entry
    says so and refitted by ``refit(names)``; where the total then exceeds ``budget``, the tensors
    that grew most are given back their previous state (:func:`undo_growth`).

    Args:
        cm: the compressed model after the layer fit (changed in place).
        weights: ``{name: tensor}`` the weights target mode clustered.
        plan: target mode's entry per tensor (each tensor with a codebook of its own).
        budget: bytes of the clustered tensors (streams, codebooks, gains) target mode verified.
    Returns:
        ``{name: entry}`` for the tensors whose new setting was kept.
    """
    now = entry_bytes(cm)
    free = budget - sum(now.values()) - _META_MARGIN * len(tables)
    if free <= 0:
        return {}
    adjusted: dict[str, list[Choice]] = {}
    for n, entries in tables.items():
        shape, c = tuple(cm.tensors[n].shape), plan[n]
        planned_stream = c.nbytes - _overhead(shape, c)
        shrink = min(1.0, (now[n] - _overhead(shape, c)) / planned_stream) if planned_stream > 0 else 1.0
        adjusted[n] = [replace(e, nbytes=now[n]) if e == c else
                       replace(e, nbytes=_overhead(shape, e) + math.ceil((e.nbytes - _overhead(shape, e)) * shrink))
                       for e in entries]
    picked = allocate(adjusted, sum(now.values()) + free)
    new = {n: tables[n][adjusted[n].index(picked[n])] for n in tables}
    changed = [n for n in tables if new[n] != plan[n]]
    if not changed:
        return {}
    state = snapshot(cm, now)
    groups = [Group((n,), new[n].block, new[n].clusters, new[n].scale_stat) for n in changed]
    sub = compress_groups({n: weights[n] for n in changed}, cm.config, groups, element_weights=element_weights)
    store_compact(sub, [n for n in changed if new[n].compact])
    for n in changed:
        old, fresh = cm.tensors[n], sub.tensors[n]
        cm.codebooks[old.codebook] = sub.codebooks[fresh.codebook]
        cm.codebook_scales.pop(old.codebook, None)
        if fresh.codebook in sub.codebook_scales:
            cm.codebook_scales[old.codebook] = sub.codebook_scales[fresh.codebook]
        cm.tensors[n] = replace(fresh, codebook=old.codebook)
    refit(changed)
    undone = set(undo_growth(cm, budget - _META_MARGIN * len(changed), state))
    return {n: new[n] for n in changed if n not in undone}


def spend_slack(
    cm: CompressedModel,
    weights: Mapping[str, torch.Tensor],
    tables: Mapping[str, list[Choice]],
    plan: Mapping[str, Choice],
    target_bytes: int,
    *,
    element_weights: Mapping[str, torch.Tensor] | None = None,
    rounds: int = 2,
    file_bytes: int | None = None,
) -> tuple[dict[str, Choice], int]:
    """Spend the bytes a file of ``cm`` leaves below ``target_bytes`` on finer settings.

    The clustered tensors may grow by what the file is short of its target (everything else in
    it stays as it is); :func:`spend_savings` re-plans with the real streams, ``rounds`` times
    while it finds something to upgrade. If the rewritten file's metadata pushed it over the
    target after all, ``cm`` is given back its first state.

    Args:
        cm: a target-mode file (changed in place), each tensor with a codebook of its own.
        weights, tables, plan, element_weights: as target mode clustered and planned them.
        file_bytes: the size of ``cm``'s file where the caller has just measured it.
    Returns:
        ``(plan, file bytes)``: the entry per tensor now stored, and the file's size.
    """
    size = len(cm.to_bytes()) if file_bytes is None else file_bytes
    now = entry_bytes(cm)
    budget = target_bytes - (size - sum(now.values()))
    state = snapshot(cm, now)
    new = dict(plan)
    for _round in range(rounds):
        kept = spend_savings(cm, weights, tables, new, budget, refit=lambda names: None,
                             element_weights=element_weights)
        new.update(kept)
        if not kept:
            break
    if new == dict(plan):
        return new, size
    grown = len(cm.to_bytes())
    if grown > target_bytes:
        restore(cm, state)
        return dict(plan), size
    return new, grown
