"""Compressing a sharded safetensors checkpoint (``*.safetensors.index.json``) with bounded memory.

The model-wide codebook is fitted on a sample of blocks drawn across all shards, then every tensor is
read, assigned and kept only as its indices. Tensors are read one at a time with plain file reads
(:mod:`legonet.io.lazy`), so resident memory stays near the largest tensor, the fit sample and the
output (indices and the tensors kept as they are), whatever the size of the checkpoint.

Equality with the in-memory path: the sample's row indices are drawn with the same seeded generator
over the same (never materialised) concatenation of blocks, the fit runs on the same rows, and
assignment is row-wise, so :func:`compress_sharded` writes the same .lego bytes as
``compress(read_state_dict(index), config).save(...)``.

The per-tensor step, :func:`assign_tensor`, is a pure function ``(tensor, codebook) -> indices`` with
no shared state, so a distributed engine (Dask, Ray) can map it over shards or machines.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.compact import compact_by_sqnr
from legonet.clustering import (
    _fit_codebook,
    check_finite,
    clustered_tensor,
    select_tensors,
    stored_codebook,
)
from legonet.config import LegoConfig
from legonet.errors import ConfigError
from legonet.io.lazy import ShardedCheckpoint, open_sharded, read_tensor
from legonet.ops.kmeans import assign, fit_centroids, sample_rows
from legonet.ops.tiling import make_tiling, tile

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)`` with task ``"sample"`` (bytes read), ``"fit"`` (stages) or
``"assign"`` (blocks)."""


def is_sharded_index(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a sharded-checkpoint index (a ``.json`` file)."""
    return str(path).endswith(".json")


def block_slabs(weight: torch.Tensor, block: tuple[int, int], max_elements: int = 1 << 22):
    """Yield ``(first_block, blocks)`` for slabs of whole block-rows of ``weight``, as float32.

    Concatenating the slabs gives ``tile(weight.float(), block)`` exactly (blocks are numbered
    row-major over the block grid), without ever materialising the whole tiled copy.
    """
    til = make_tiling(weight.shape, block)
    (br, bc), (gr, gc) = til.block, til.grid
    m = weight.reshape(til.rows, til.cols)
    step = max(1, max_elements // (br * gc * bc))
    for g0 in range(0, gr, step):
        yield g0 * gc, tile(m[g0 * br : (g0 + step) * br].float(), block)


def assign_tensor(
    weight: torch.Tensor, codebook: torch.Tensor, block: tuple[int, int], device: str | torch.device | None = None
) -> torch.Tensor:
    """Centroid index of every block of one tensor: a pure function of its arguments.

    Args:
        weight: tensor with >= 2 dims (any float dtype).
        codebook: ``(K, b_r*b_c)`` float32 codebook, values as stored.
        block: ``(b_r, b_c)``.
        device: where to compute (default: the tensor's device).
    Returns:
        ``(num_blocks,)`` int32 indices on the CPU, in tiling order.
    """
    dev = weight.device if device is None else torch.device(device)
    out = torch.empty(make_tiling(weight.shape, block).num_blocks, dtype=torch.int32)
    cb = codebook.to(dev)
    for first, blocks in block_slabs(weight, block):
        labels, _ = assign(blocks.to(dev), cb)
        out[first : first + labels.numel()] = labels.to(torch.int32).cpu()
    return out


def _gather_sample(
    ck: ShardedCheckpoint, names: list[str], config: LegoConfig, idx: torch.Tensor | None,
    n_total: int, dense: dict[str, torch.Tensor], say: Progress,
) -> torch.Tensor:
    """Pass 1: read every tensor once, check it, keep the unclustered ones, collect the sampled rows."""
    chosen = set(names)
    offsets, off = {}, 0
    for n in names:
        offsets[n] = off
        off += make_tiling(ck.tensors[n].shape, config.block).num_blocks
    d = config.block[0] * config.block[1]
    xf = torch.empty(n_total if idx is None else idx.numel(), d, dtype=torch.float32)
    total = sum(i.end - i.start for _, infos in ck.shards for i in infos.values())
    done = 0
    say("sample", 0, total)
    for _, infos in ck.shards:
        for name, info in infos.items():
            t = read_tensor(info)
            check_finite({name: t})
            done += info.end - info.start
            if name not in chosen:
                dense[name] = t
            else:
                for first, blocks in block_slabs(t, config.block):
                    lo, hi = offsets[name] + first, offsets[name] + first + blocks.shape[0]
                    if idx is None:
                        xf[lo:hi] = blocks
                    else:
                        a, b = (int(v) for v in torch.searchsorted(idx, torch.tensor([lo, hi])))
                        xf[a:b] = blocks[idx[a:b] - lo]
                del t
            say("sample", done, total)
    return xf


def compress_sharded(
    index: str | os.PathLike,
    output: str | os.PathLike,
    config: LegoConfig | None = None,
    *,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
) -> tuple[CompressedModel, int]:
    """Compress a sharded safetensors checkpoint tensor by tensor and write the .lego file.

    Args:
        index: the ``*.safetensors.index.json`` file.
        output: the .lego file to write (atomically).
        config: a :class:`LegoConfig` (default: 4x4 blocks, K=32, one model-wide codebook).
        progress: optional ``progress(task, done, total)`` callback.
        device: where to run k-means and assignment (default CPU); results are copied back.
    Returns:
        The :class:`CompressedModel` (clustered tensors hold int32 indices) and the file size in bytes.
    """
    config = config or LegoConfig()
    say = progress or (lambda _t, _d, _n: None)
    ck = open_sharded(index)
    infos = ck.tensors
    if not infos:
        raise ConfigError(f"{index}: the checkpoint holds no tensors")
    names = select_tensors({n: i.meta() for n, i in infos.items()}, config)
    if not names:
        raise ConfigError("no tensor to cluster: none is floating-point with 2 or more dimensions "
                          "and matched by the include/exclude patterns")
    chosen = set(names)
    dense: dict[str, torch.Tensor] = {}
    clustered: dict[str, ClusteredTensor] = {}
    codebooks: list[torch.Tensor] = []
    dev = torch.device(device) if device is not None else torch.device("cpu")

    if config.scope == "model":
        n_total = sum(make_tiling(infos[n].shape, config.block).num_blocks for n in names)
        k = config.clusters
        if k > n_total:
            raise ConfigError(f"K={k} is larger than the {n_total} blocks of the model; lower K")
        gen = torch.Generator().manual_seed(int(config.seed))
        idx = sample_rows(n_total, config.kmeans.max_fit_points, gen)
        xf = _gather_sample(ck, names, config, idx, n_total, dense, say)
        km = config.kmeans
        centroids, _ = fit_centroids(xf.to(dev), k, gen, init=km.init, max_iters=km.max_iters, tol=km.tol,
                                     progress=say)
        del xf
        codebook = stored_codebook(centroids.cpu(), config)
        codebooks.append(codebook)
        done = 0
        say("assign", 0, n_total)
        for _, shard in ck.shards:
            for name, info in shard.items():
                if name not in chosen:
                    continue
                t = read_tensor(info)
                labels = assign_tensor(t, codebook, config.block, dev)
                clustered[name] = clustered_tensor(t, codebook, 0, labels, config.block)
                done += labels.numel()
                del t
                say("assign", done, n_total)
    else:
        # One codebook per tensor: each tensor is fitted and assigned on its own, as in compress().
        for name, info in infos.items():
            if name in chosen:
                continue
            t = read_tensor(info)
            check_finite({name: t})
            dense[name] = t
        for i, name in enumerate(names):
            t = read_tensor(infos[name])
            check_finite({name: t})
            cb, lab = _fit_codebook(tile(t.float(), config.block), config.clusters, config, config.seed + i,
                                    f"tensor {name!r}")
            codebooks.append(cb)
            clustered[name] = clustered_tensor(t, cb, i, lab.to(torch.int32), config.block)
            say("assign", i + 1, len(names))
    tensors = {n: clustered[n] if n in clustered else dense[n] for n in ck.order}
    cm = CompressedModel(config=config, codebooks=codebooks, tensors=tensors)
    if config.compact_storage:  # as compress() does
        compact_by_sqnr(cm)
    return cm, cm.save(Path(output))
