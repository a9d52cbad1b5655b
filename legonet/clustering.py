"""Block clustering of a model's tensors at given settings: which tensors, their blocks, the k-means
fits (one codebook for the model, per tensor, or per planned group) and the compressed model.

:func:`cluster_model` is the paper's method and its plain extensions (one :class:`LegoConfig` for
every tensor); :func:`compress_groups` clusters any plan of groups (target mode makes one per tensor).
The public entry point, which also runs target mode, is :func:`legonet.compress`."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from legonet.aliases import shared_tensor_aliases
from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.compact import compact_by_sqnr
from legonet.config import LegoConfig
from legonet.errors import CheckpointError, ConfigError
from legonet.ops.kmeans import assign, kmeans
from legonet.ops.quant import (
    choose_row_scales,
    dequantize,
    normalized_blocks,
    unshrink_scales,
)
from legonet.ops.tiling import make_tiling, tile

# ``progress(task, done, total)``, as :data:`legonet.runlog.Progress`
Progress = Callable[[str, int, int], None]
# Elements per slab when a tensor is processed a few block-rows at a time.
_SLAB_ELEMENTS = 1 << 22


def as_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict (detached, on the CPU) from a module or a mapping, each
    tensor once: a tensor listed under several names (tied weights) appears under its first name
    only (:func:`state_dict_and_aliases` also returns the other names).

    Raises :class:`CheckpointError` for empty models and values that are not tensors.
    """
    return state_dict_and_aliases(model_or_state_dict)[0]


def state_dict_and_aliases(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, aliases)``: the tensors of :func:`as_state_dict`, and ``{alias: source}`` for
    every further name of a tensor shared by several (same storage, offset, shape, stride and
    dtype; :func:`legonet.aliases.shared_tensor_aliases`), so that it is compressed, stored and
    counted once.

    Raises :class:`CheckpointError` for empty models and values that are not tensors.
    """
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        sd = dict(model_or_state_dict)
    else:
        raise CheckpointError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    if not sd:
        raise CheckpointError("the model has no tensors")
    for name, t in sd.items():
        if not isinstance(name, str):
            raise CheckpointError(f"state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    # found before the move to the CPU, which copies each tensor of another device apart
    aliases = shared_tensor_aliases(sd)
    out = {name: t.detach().cpu() for name, t in sd.items() if name not in aliases}
    return out, aliases


def nonfinite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding NaN or Inf, in order."""
    return [name for name, t in sd.items()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def check_finite(sd: Mapping[str, torch.Tensor], allow_nonfinite: bool = False) -> list[str]:
    """Raise :class:`CheckpointError` naming the first tensor holding NaN or Inf.

    With ``allow_nonfinite`` nothing is raised; the names of those tensors are returned instead
    (:func:`select_tensors` then keeps them uncompressed).
    """
    bad_names = nonfinite_tensors(sd)
    if bad_names and not allow_nonfinite:
        name = bad_names[0]
        bad = int((~torch.isfinite(sd[name])).sum())
        more = f" (and {len(bad_names) - 1} more tensor(s))" if len(bad_names) > 1 else ""
        raise CheckpointError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf){more}; "
                              "clean the checkpoint, exclude the tensor, or pass allow_nonfinite to keep such tensors "
                              "uncompressed")
    return bad_names


def select_tensors(sd: Mapping[str, torch.Tensor], config: LegoConfig) -> list[str]:
    """Names of the tensors to cluster: floating, >= 2 dims, matched by include, not by exclude,
    and (when ``config.allow_nonfinite``) free of NaN and Inf.

    Every include/exclude pattern other than ``*`` must match at least one tensor name, so that a
    typo in a layer name is an error rather than a silently uncompressed layer.
    """
    names = list(sd)
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for p in patterns:
            if p != "*" and not fnmatch.filter(names, p):
                raise ConfigError(f"{kind} pattern {p!r} matches no tensor name (e.g. {', '.join(names[:3])})")
    chosen = []
    for name in names:
        t = sd[name]
        if t.ndim < 2 or not t.is_floating_point() or t.numel() == 0:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        # k-means cannot place NaN/Inf blocks; with allow_nonfinite such tensors are kept as they are.
        if config.allow_nonfinite and not bool(torch.isfinite(t).all()):
            continue
        chosen.append(name)
    return chosen


def sqnr_db(original: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|x|^2 / |x - x_hat|^2)`` in dB; ``inf`` for an exact reconstruction."""
    x = original.double()
    return _db(float((x**2).sum()), float(((x - approx.double()) ** 2).sum()))


def _fit_codebook(
    blocks: torch.Tensor, k: int, config: LegoConfig, seed: int, what: str,
    weights: torch.Tensor | None = None, bars: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on ``blocks (n, d)``; returns the codebook rounded to its storage dtype and indices."""
    if k > blocks.shape[0]:
        raise ConfigError(f"K={k} is larger than the {blocks.shape[0]} blocks of {what}; lower K"
                          + (", exclude the tensor or use scope='model'" if config.scope == "layer" else ""))
    km = config.kmeans
    res = kmeans(blocks, k, seed=seed, init=km.init, max_iters=km.max_iters, tol=km.tol,
                 max_fit_points=km.max_fit_points, weights=weights, progress=bars)
    codebook = stored_codebook(res.centroids, config)
    labels = res.labels
    if config.codebook_dtype != "float32":
        labels, _ = assign(blocks, codebook, weights)  # indices must point at the centroids as stored
    return codebook, labels


def stored_codebook(centroids: torch.Tensor, config: LegoConfig) -> torch.Tensor:
    """``(K, d)`` float32 centroids rounded to the codebook's storage dtype (the values in the file)."""
    store = {"float32": torch.float32, "float16": torch.float16}[config.codebook_dtype]
    return centroids.to(store).to(torch.float32)


def clustered_tensor(t: torch.Tensor, codebook: torch.Tensor, cb_id: int, indices: torch.Tensor,
                     block: tuple[int, int], scale: torch.Tensor | None = None) -> ClusteredTensor:
    """The :class:`ClusteredTensor` of ``t`` given its block ``indices``, with its SQNR measured."""
    ct = ClusteredTensor(shape=tuple(t.shape), dtype=t.dtype, block=block, codebook=cb_id, indices=indices,
                         scale=scale)
    # The reconstruction is compared a slab of block-rows at a time, so that measuring the SQNR of
    # a large tensor never holds more than a few MiB besides the tensor itself.
    til = make_tiling(t.shape, block)
    (br, bc), (gr, gc) = block, til.grid
    m = t.reshape(til.rows, til.cols)
    step = max(1, _SLAB_ELEMENTS // (br * gc * bc))
    noise = signal = 0.0
    for g0 in range(0, gr, step):
        g1 = min(gr, g0 + step)
        rows = m[g0 * br : g1 * br].float()
        rec = codebook[indices[g0 * gc : g1 * gc].long()].reshape(g1 - g0, gc, br, bc).permute(0, 2, 1, 3)
        rec = rec.reshape((g1 - g0) * br, gc * bc)[: rows.shape[0], : til.cols]
        if scale is not None:
            rec = rec * scale[g0 * br : g0 * br + rows.shape[0], None]
        rec = rec.to(t.dtype).float()
        noise += float(torch.sum((rows - rec).square_(), dtype=torch.float64))
        # not square_(): for float32 input ``rows`` is a view of the caller's tensor
        signal += float(torch.sum(rows.square(), dtype=torch.float64))
    ct.sqnr_db = _db(signal, noise)
    return ct


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class Group:
    """Tensors that share one codebook of ``clusters`` centroids of ``block``-shaped blocks."""

    names: tuple[str, ...]
    block: tuple[int, int]
    clusters: int
    scale_stat: str | None = None  # row gain statistic; None: the config's


def plan_groups(names: list[str], config: LegoConfig) -> list[Group]:
    """Which tensors share a codebook: all of them (scope model) or each alone (scope layer)."""
    if config.scope == "model":
        return [Group(tuple(names), config.block, config.clusters)]
    return [Group((n,), config.block, config.clusters) for n in names]


def cluster_model(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: LegoConfig | None = None,
    *,
    progress: Progress | None = None,
) -> CompressedModel:
    """Compress a model by block weight clustering (LegoNet) at one setting.

    Args:
        model_or_state_dict: an ``nn.Module`` or a ``{name: tensor}`` mapping.
        config: a :class:`LegoConfig` (default: 4x4 blocks, K=32, one model-wide codebook).
        progress: optional ``progress(task, done, total)`` callback: the k-means stages
            (``"fit"``, ``"assign"``) of one model-wide codebook, or ``"clustering"`` tensor by tensor.
    Returns:
        A :class:`CompressedModel`; every input tensor is in it, clustered or kept as it was (a
        tensor shared by several names once, the other names its ``aliases``). With
        ``config.compact_storage``, tensors clustered with an SQNR of at most 12 dB have their
        gains and codebook stored in 8 bits (:func:`legonet.compact.compact_by_sqnr`).
    """
    config = config or LegoConfig()
    sd, aliases = state_dict_and_aliases(model_or_state_dict)
    check_finite(sd, config.allow_nonfinite)
    names = select_tensors(sd, config)
    if not names:
        raise ConfigError("no tensor to cluster: none is floating-point with 2 or more dimensions "
                          "and matched by the include/exclude patterns")
    cm = compress_groups(sd, config, plan_groups(names, config), progress=progress)
    cm.aliases = aliases
    if config.compact_storage:
        compact_by_sqnr(cm)
    return cm


def compress_groups(
    sd: dict[str, torch.Tensor],
    config: LegoConfig,
    groups: list[Group],
    *,
    element_weights: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> CompressedModel:
    """Cluster each group of tensors with its own codebook; every other tensor is kept.

    Args:
        sd: the state dict (validated by the caller).
        config: scales, codebook dtype, kept dtype, k-means settings and seed are taken from it.
        groups: the codebook plan; a tensor may appear in at most one group.
        element_weights: optional ``{name: weights}`` broadcastable to the tensor's 2-D view
            ``(rows, cols)`` (e.g. ``(1, cols)`` input second moments), for importance-weighted k-means.
    """
    element_weights = element_weights or {}
    scales: dict[str, torch.Tensor | None] = {}
    blocks: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor | None] = {}
    codebooks: list[torch.Tensor] = []
    labels: dict[str, torch.Tensor] = {}
    cb_of: dict[str, int] = {}
    block_of: dict[str, tuple[int, int]] = {}
    for gi, group in enumerate(groups):
        for n in group.names:
            if n in cb_of:
                raise ConfigError(f"tensor {n!r} is planned into two codebooks")
            scales[n] = choose_row_scales(sd[n], stat=group.scale_stat or config.scale_stat) \
                if config.scales == "row" else None
            blocks[n] = normalized_blocks(sd[n], group.block, scales[n])
            weights[n] = _block_weights(element_weights.get(n), sd[n], group.block)
        data = torch.cat([blocks[n] for n in group.names])
        wdata = None if all(weights[n] is None for n in group.names) else torch.cat(
            [weights[n] if weights[n] is not None else torch.ones_like(blocks[n]) for n in group.names])
        what = "the model" if config.scope == "model" and len(groups) == 1 else f"tensor {group.names[0]!r}" \
            if len(group.names) == 1 else f"codebook group {gi}"
        # one codebook: the k-means stages are the steps to show; many: the codebooks done
        bars = progress if len(groups) == 1 else None
        cb, lab = _fit_codebook(data, group.clusters, config, config.seed + gi, what, wdata, bars)
        if progress is not None and len(groups) > 1:
            progress("clustering", gi + 1, len(groups))
        codebooks.append(cb)
        start = 0
        for n in group.names:
            m = blocks[n].shape[0]
            labels[n], cb_of[n], block_of[n] = lab[start : start + m], gi, group.block
            start += m
            if config.unshrink:
                approx = dequantize(cb, labels[n].long(), make_tiling(sd[n].shape, group.block), scales[n])
                scales[n] = unshrink_scales(sd[n], approx, scales[n], element_weights.get(n))
        for n in group.names:  # free the group's blocks before the next group
            del blocks[n]

    kept_dtype = {"keep": None, "float16": torch.float16}[config.kept_dtype]
    tensors: dict[str, ClusteredTensor | torch.Tensor] = {}
    for name, t in sd.items():
        if name not in cb_of:
            keep = t.clone()
            if kept_dtype is not None and keep.is_floating_point() and keep.dtype != kept_dtype \
                    and bool(torch.isfinite(keep).all()):
                keep = keep.to(kept_dtype)
            tensors[name] = keep
            continue
        tensors[name] = clustered_tensor(t, codebooks[cb_of[name]], cb_of[name], labels[name].clone(),
                                         block_of[name], scales[name])
    cm = CompressedModel(config=config, codebooks=codebooks, tensors=tensors)
    cm.adopt_dtypes(sd)
    return cm


def _block_weights(w: torch.Tensor | None, t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    """Tile element weights given for the 2-D view ``(rows, cols)`` (broadcast) like the tensor."""
    if w is None:
        return None
    rows, cols = t.shape[0], t[0].numel()
    full = torch.broadcast_to(w.float(), (rows, cols)).reshape(t.shape)
    return tile(full, block)
