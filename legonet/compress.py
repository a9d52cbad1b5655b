"""The model-level entry point: ``compress(model_or_state_dict, config) -> CompressedModel``."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.config import LegoConfig
from legonet.errors import CheckpointError, ConfigError
from legonet.ops.kmeans import Progress as KMeansProgress
from legonet.ops.kmeans import assign, kmeans
from legonet.ops.tiling import make_tiling, tile

Progress = Callable[[str], None]
# Elements per slab when a tensor is processed a few block-rows at a time.
_SLAB_ELEMENTS = 1 << 22


def as_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict (detached, on the CPU) from a module or a mapping.

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
    out = {}
    for name, t in sd.items():
        if not isinstance(name, str):
            raise CheckpointError(f"state dict key {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = t.detach().cpu()
    return out


def check_finite(sd: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming the first tensor holding NaN or Inf."""
    for name, t in sd.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf); "
                                  "clean the checkpoint or exclude the tensor")


def select_tensors(sd: Mapping[str, torch.Tensor], config: LegoConfig) -> list[str]:
    """Names of the tensors to cluster: floating, >= 2 dims, matched by include, not by exclude.

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
        chosen.append(name)
    return chosen


def sqnr_db(original: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|x|^2 / |x - x_hat|^2)`` in dB; ``inf`` for an exact reconstruction."""
    # float32 differences, float64 sums: as accurate as it needs to be, without float64 copies.
    x = original.float()
    noise = float(torch.sum((x - approx.float()).square_(), dtype=torch.float64))
    signal = float(torch.sum(x.square(), dtype=torch.float64))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _fit_codebook(blocks: torch.Tensor, config: LegoConfig, seed: int, what: str,
                  bars: KMeansProgress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on ``blocks (n, d)``; returns the codebook rounded to its storage dtype and indices."""
    k = config.clusters
    if k > blocks.shape[0]:
        raise ConfigError(f"K={k} is larger than the {blocks.shape[0]} blocks of {what}; lower K"
                          + (", exclude the tensor or use scope='model'" if config.scope == "layer" else ""))
    km = config.kmeans
    res = kmeans(blocks, k, seed=seed, init=km.init, max_iters=km.max_iters, tol=km.tol,
                 max_fit_points=km.max_fit_points, progress=bars)
    codebook = stored_codebook(res.centroids, config)
    labels = res.labels
    if config.codebook_dtype != "float32":
        labels, _ = assign(blocks, codebook)  # indices must point at the centroids as stored
    return codebook, labels


def stored_codebook(centroids: torch.Tensor, config: LegoConfig) -> torch.Tensor:
    """``(K, d)`` float32 centroids rounded to the codebook's storage dtype (the values in the file)."""
    store = {"float32": torch.float32, "float16": torch.float16}[config.codebook_dtype]
    return centroids.to(store).to(torch.float32)


def clustered_tensor(t: torch.Tensor, codebook: torch.Tensor, cb_id: int, indices: torch.Tensor,
                     block: tuple[int, int]) -> ClusteredTensor:
    """The :class:`ClusteredTensor` of ``t`` given its block ``indices``, with its SQNR measured."""
    ct = ClusteredTensor(shape=tuple(t.shape), dtype=t.dtype, block=block, codebook=cb_id, indices=indices)
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
        rec = rec.reshape((g1 - g0) * br, gc * bc)[: rows.shape[0], : til.cols].to(t.dtype).float()
        noise += float(torch.sum((rows - rec).square_(), dtype=torch.float64))
        signal += float(torch.sum(rows.square_(), dtype=torch.float64))
    ct.sqnr_db = _db(signal, noise)
    return ct


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def compress(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: LegoConfig | None = None,
    *,
    progress: Progress | None = None,
    bars: KMeansProgress | None = None,
) -> CompressedModel:
    """Compress a model by block weight clustering (LegoNet).

    Args:
        model_or_state_dict: an ``nn.Module`` or a ``{name: tensor}`` mapping.
        config: a :class:`LegoConfig` (default: 4x4 blocks, K=32, one model-wide codebook).
        progress: optional callback receiving a short description of each stage.
        bars: optional ``bars(task, done, total)`` callback for progress bars of the k-means
            fitting and assignment (see :data:`legonet.ops.kmeans.Progress`).
    Returns:
        A :class:`CompressedModel`; every input tensor is in it, clustered or kept as it was.
    """
    config = config or LegoConfig()
    say = progress or (lambda _msg: None)
    sd = as_state_dict(model_or_state_dict)
    check_finite(sd)
    names = select_tensors(sd, config)
    if not names:
        raise ConfigError("no tensor to cluster: none is floating-point with 2 or more dimensions "
                          "and matched by the include/exclude patterns")
    say(f"tiling {len(names)} tensors into {config.block[0]}x{config.block[1]} blocks")
    blocks = {n: tile(sd[n].float(), config.block) for n in names}

    codebooks: list[torch.Tensor] = []
    labels: dict[str, torch.Tensor] = {}
    cb_of: dict[str, int] = {}
    if config.scope == "model":
        all_blocks = torch.cat([blocks[n] for n in names])
        say(f"k-means: {all_blocks.shape[0]} blocks into K={config.clusters} (one model-wide codebook)")
        cb, lab = _fit_codebook(all_blocks, config, config.seed, "the model", bars)
        codebooks.append(cb)
        start = 0
        for n in names:
            m = blocks[n].shape[0]
            labels[n], cb_of[n] = lab[start : start + m], 0
            start += m
    else:
        for i, n in enumerate(names):
            say(f"k-means {i + 1}/{len(names)}: {n} ({blocks[n].shape[0]} blocks into K={config.clusters})")
            cb, lab = _fit_codebook(blocks[n], config, config.seed + i, f"tensor {n!r}", bars)
            codebooks.append(cb)
            labels[n], cb_of[n] = lab, i

    tensors: dict[str, ClusteredTensor | torch.Tensor] = {}
    chosen = set(names)
    for name, t in sd.items():
        if name not in chosen:
            tensors[name] = t.clone()
            continue
        tensors[name] = clustered_tensor(t, codebooks[cb_of[name]], cb_of[name], labels[name].clone(), config.block)
    say("done")
    return CompressedModel(config=config, codebooks=codebooks, tensors=tensors)
