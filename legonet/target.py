"""Target mode: choose a codebook setting per tensor so that the .lego file meets a compression ratio.

Index streams are entropy-coded where that makes them smaller (:mod:`legonet.ops.rans`); each menu
entry's bytes count its stream at the size estimated from the centroid histogram of a sample.

Every clustered tensor gets its own codebook (float16) with per-row float16 gains, both stored in 8
bits instead where the entry planned for it has an estimated relative error of at least
:data:`~legonet.ops.scalar_codes.COMPACT_MIN_DISTORTION` (see :mod:`legonet.compact`); its block shape,
K and gain statistic (RMS or largest magnitude of each row) come from a menu (convolutions with a
spatial kernel are also offered blocks of whole kernels, :data:`KERNEL_MENU`). For each tensor and
menu entry the distortion is estimated by k-means on a sample of the tensor's blocks; a Lagrangian
search then picks, for every tensor, the entry minimising ``distortion + lambda * bytes`` with the
smallest ``lambda`` whose total fits the byte budget.

Distortion is the relative error of the normalised weights (each output channel counts equally,
since a following normalisation layer rescales channels anyway). Given calibration statistics, it is
weighted by the second moment of the inputs each weight multiplies, i.e. a proxy for the error of the
layer's output rather than of its weights; given full input second-moment matrices it is the relative
error of the layer's outputs itself, measured on whole sampled rows. Each tensor's distortion counts
equally in the sum: a stand-in for per-layer sensitivity that does not favour big layers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from legonet.allocation import Choice, allocate, entry_nbytes, side_nbytes
from legonet.artifact import CompressedModel, fills
from legonet.compact import store_compact
from legonet.clustering import (
    Group,
    check_finite,
    compress_groups,
    select_tensors,
    state_dict_and_aliases,
)
from legonet.config import SCALE_STATS, TargetConfig
from legonet.errors import ConfigError
from legonet.menu_cache import MenuCache
from legonet.ops import rans
from legonet.ops.bitpack import bits_for, packed_nbytes
from legonet.ops.lloyd import nearest, quick_kmeans
from legonet.ops.output_lsq import gain_fitted_errors
from legonet.ops.quant import choose_row_scales, normalized_blocks
from legonet.ops.scalar_codes import COMPACT_MIN_DISTORTION
from legonet.ops.tiling import make_tiling, tile
from legonet.report import fp32_bytes
from legonet.runlog import RunLog
from legonet.stream_budget import spend_slack

# (block, K) settings offered to every tensor: from 1/32 to 8 bits per weight. The scalar 1x1
# entries cover 2 to 8 bits per weight with a tiny codebook: vector entries at the same rate (2x2
# K=256, 1x2 K=64/256) quantise better but their codebooks cost up to 1 KB, as much as the indices
# of a small tensor (a 16x16x3x3 convolution, a depthwise filter bank). K stays <= 256 so that the
# final per-tensor k-means++ fits stay fast.
DEFAULT_MENU: tuple[tuple[tuple[int, int], int], ...] = (
    ((4, 8), 2), ((4, 8), 4), ((4, 8), 16), ((4, 8), 64), ((4, 8), 256),
    ((4, 4), 4), ((4, 4), 16), ((4, 4), 64), ((4, 4), 256),
    ((2, 2), 4), ((2, 2), 16), ((2, 2), 64), ((2, 2), 256),
    ((1, 2), 16), ((1, 2), 64), ((1, 2), 256),
    ((1, 1), 4), ((1, 1), 8), ((1, 1), 16), ((1, 1), 32), ((1, 1), 64), ((1, 1), 256),
)
# Kernel-aligned settings, offered besides the menu to convolutions with a spatial kernel
# (``kh * kw > 1``): ``((rows, kernels), K)`` is a block of ``rows`` output channels by ``kernels``
# whole kernels, i.e. ``(rows, kernels * kh * kw)`` in the 2-D view (whose columns run kernel by
# kernel). Aligned blocks keep each kernel's spatial pattern in one vector, where square blocks cut
# kernels apart: on ResNet-50's 3x3 convolutions, at equal bits per weight they reach 10-40 % lower
# output error (e.g. ``layer2.1.conv2``: 1x9 K=8 at 0.34 bit, relative error 0.20, against 4x4
# K=64 at 0.49 bit, 0.23; see docs/design-notes.md). For 3x3 kernels: 0.22 to 0.89 bits per weight.
KERNEL_MENU: tuple[tuple[tuple[int, int], int], ...] = (
    ((1, 1), 8), ((1, 1), 16), ((1, 1), 32), ((1, 1), 64), ((1, 1), 256),
    ((2, 1), 16), ((2, 1), 64), ((2, 1), 256),
    ((1, 2), 64), ((1, 2), 256),
)
_SAMPLE = 4096
_OUTPUT_ROWS = 32


def menu_for(shape: tuple[int, ...] | torch.Size, menu=DEFAULT_MENU, kernel_menu=KERNEL_MENU) -> list:
    """The ``((b_r, b_c), K)`` settings to evaluate for a tensor of ``shape``: ``menu``, plus the
    ``kernel_menu`` entries resolved to whole kernels if ``shape`` is a convolution weight
    ``(out, in, kh, ...)`` with ``kh * ... > 1``; in order, without repeats."""
    entries = list(menu)
    kernel = math.prod(shape[2:]) if len(shape) >= 3 else 1
    if kernel > 1:
        entries += [((rows, kernels * kernel), k) for (rows, kernels), k in kernel_menu]
    return list(dict.fromkeys((tuple(b), int(k)) for b, k in entries))


def _choice(shape: tuple[int, ...], block: tuple[int, int], k: int, distortion: float, stat: str,
            labels: torch.Tensor | None = None) -> Choice:
    # 8-bit gains and codebook where their added error is negligible beside the clustering error
    compact = distortion >= COMPACT_MIN_DISTORTION
    return Choice(block, k, entry_nbytes(shape, block, k, compact, labels), distortion, stat, compact)


def evaluate_menu(
    weight: torch.Tensor,
    menu=DEFAULT_MENU,
    *,
    element_weights: torch.Tensor | None = None,
    covariance: torch.Tensor | None = None,
    seed: int = 0,
    sample: int = _SAMPLE,
    scale_stats: tuple[str, ...] = SCALE_STATS,
    entropy_coding: bool = False,
) -> list[Choice]:
    """Estimated distortion and bytes (exact where bit-packed) of every feasible menu entry for one tensor.

    Args:
        weight: ``(rows, ...)`` tensor.
        element_weights: optional weights broadcastable to the 2-D view ``(rows, cols)``.
        covariance: optional ``(cols, cols)`` input second-moment matrix: the distortion is then
            the mean relative *output* error of whole sampled rows, each with its best gain (what
            :mod:`legonet.calibrate.layer_fit` will fit), instead of the relative weight error.
        scale_stats: row gain statistics to try with every entry (each gives its own choice).
        entropy_coding: count each entry's index stream at its estimated entropy-coded size where
            that is smaller than bit-packing (the sample's centroid histogram; see
            :func:`legonet.allocation.estimated_stream_nbytes`).
    """
    rows, cols = weight.shape[0], weight[0].numel()
    wfull = None if element_weights is None else torch.broadcast_to(element_weights.float(), (rows, cols)).reshape(weight.shape)
    out = []
    g = torch.Generator().manual_seed(seed)
    tiled: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}  # menu entries share blocks
    scales = {stat: choose_row_scales(weight, stat=stat) for stat in scale_stats}
    for (block, k), stat in itertools.product(menu, scale_stats):
        if (block, stat) not in tiled:
            tiled[block, stat] = (normalized_blocks(weight, block, scales[stat]),
                                  None if wfull is None else tile(wfull, block))
        blocks, bw = tiled[block, stat]
        n = blocks.shape[0]
        if k > n // 2:
            continue
        fit = torch.randperm(n, generator=g)[:sample] if n > sample else torch.arange(n)
        # a quick estimate: random seeding and few plain Lloyd iterations rank the settings well enough
        centroids = quick_kmeans(blocks[fit], k, weights=None if bw is None else bw[fit], iters=12, tol=1e-3,
                                 generator=g)
        if covariance is not None:
            out.append(_output_choice(weight, blocks, bw, centroids, block, k, stat, covariance, sample, g,
                                      entropy_coding))
            continue
        test = torch.randperm(n, generator=g)[:sample] if n > sample else torch.arange(n)
        xt = blocks[test]
        wt = torch.ones_like(xt) if bw is None else bw[test]
        labels, d = nearest(xt, centroids, None if bw is None else wt)
        signal = float((wt * xt * xt).sum())
        out.append(_choice(tuple(weight.shape), block, k, float(d.sum()) / max(signal, 1e-30), stat,
                           labels if entropy_coding else None))
    return out


def _output_choice(weight, blocks, bw, centroids, block, k, stat, cov, sample, g, entropy_coding) -> Choice:
    """A :class:`Choice` whose distortion is the mean relative output error of whole block-rows."""
    til = make_tiling(tuple(weight.shape), block)
    (br, bc), (gr, gc) = block, til.grid
    # about ``sample`` blocks, but whole rows and at least _OUTPUT_ROWS of them: a mean over a few rows is noisy
    picked = torch.randperm(gr, generator=g)[: min(gr, max(sample // gc, -(-_OUTPUT_ROWS // br)))]
    test = (picked[:, None] * gc + torch.arange(gc)).reshape(-1)
    labels, _ = nearest(blocks[test], centroids, None if bw is None else bw[test])
    q = centroids[labels].reshape(-1, gc, br, bc).permute(0, 2, 1, 3).reshape(-1, gc * bc)[:, : til.cols]
    rows = (picked[:, None] * br + torch.arange(br)).reshape(-1)
    real = rows < til.rows
    w = weight.reshape(til.rows, til.cols).float()[rows[real]]
    err = gain_fitted_errors(w, q[real], cov.float())
    return _choice(tuple(weight.shape), block, k, float(err.mean()), stat, labels if entropy_coding else None)


def coarsest_nbytes(shape: tuple[int, ...], menu=DEFAULT_MENU, kernel_menu=KERNEL_MENU) -> tuple[int, int] | None:
    """``(fewest, packed)`` bytes of the coarsest setting a tensor of ``shape`` can get, before any
    clustering: ``fewest`` if its index stream coded to nothing but its table and lane states (a
    bound no file goes below), ``packed`` bit-packed; ``None`` if no menu entry fits the tensor
    (the same rule as :func:`evaluate_menu`: K at most half the blocks)."""
    best = None
    for block, k in menu_for(shape, menu, kernel_menu):
        count = make_tiling(shape, block).num_blocks
        if k > count // 2:
            continue
        side = side_nbytes(shape, block, k, compact=True)
        packed = packed_nbytes(count, bits_for(k))
        cost = (side + min(packed, k + 4 * rans.lanes(count)), side + packed)
        best = cost if best is None else (min(best[0], cost[0]), min(best[1], cost[1]))
    return best


@dataclass(frozen=True)
class Reach:
    """What target mode can reach for a model, known before any clustering."""

    fp32_bytes: int
    fixed_bytes: int  # tensors kept (float16, constants as one-value fills), header, metadata, reserve
    fewest_bytes: int  # with every clustered tensor at its coarsest setting, streams coded to nothing
    packed_bytes: int  # the same, streams bit-packed

    @property
    def most(self) -> float:
        """A ratio no file can pass."""
        return self.fp32_bytes / self.fewest_bytes

    @property
    def packed(self) -> float:
        """The ratio of the coarsest settings with bit-packed indices (entropy coding gains a little more)."""
        return self.fp32_bytes / self.packed_bytes


def reach(sd: Mapping[str, torch.Tensor], names: list[str], *, menu=DEFAULT_MENU, kernel_menu=KERNEL_MENU,
          reserve: int = 0) -> Reach:
    """How far target mode can compress ``sd`` with ``names`` clustered (cheap: no clustering).

    Raises :class:`ConfigError` naming a tensor too small for every menu setting."""
    chosen = set(names)
    kept = {k: t.half() if t.is_floating_point() else t for k, t in sd.items() if k not in chosen}
    filled = fills(kept)
    fixed = sum(t.numel() * t.element_size() for k, t in kept.items() if k not in filled)
    fixed += _overhead(len(sd)) + reserve
    fewest = packed = fixed
    for n in names:
        cost = coarsest_nbytes(tuple(sd[n].shape), menu, kernel_menu)
        if cost is None:
            raise ConfigError(f"tensor {n!r} {tuple(sd[n].shape)} is too small for any menu setting; exclude it")
        fewest, packed = fewest + cost[0], packed + cost[1]
    return Reach(fp32_bytes(sd), fixed, fewest, packed)


def _overhead(num_tensors: int) -> int:
    """Container header and zlib-compressed metadata, a first guess (ResNet-50: 5.3 KiB for 320
    tensors, about 17 bytes each), corrected by :func:`compress_to_ratio` if too low."""
    return 512 + 24 * num_tensors


def check_reachable(sd: Mapping[str, torch.Tensor], names: list[str], target_ratio: float, *, menu=DEFAULT_MENU,
                    kernel_menu=KERNEL_MENU, reserve: int = 0) -> Reach:
    """Raise :class:`ConfigError` at once if no file of ``sd`` can meet ``target_ratio``, saying the
    highest ratio within reach; returns the :class:`Reach`."""
    r = reach(sd, names, menu=menu, kernel_menu=kernel_menu, reserve=reserve)
    if target_ratio > r.most:
        raise ConfigError(f"target ratio {target_ratio:g} is out of reach for this model: even the coarsest "
                          f"settings leave a file of at least {r.fewest_bytes:,} bytes, at most {r.most:.1f}x "
                          f"(about {r.packed:.1f}x where indices do not entropy-code smaller); "
                          "lower target_ratio")
    return r


def compress_to_ratio(
    model_or_state_dict,
    target_ratio: float,
    *,
    config: TargetConfig | None = None,
    element_weights: Mapping[str, torch.Tensor] | None = None,
    covariances: Mapping[str, torch.Tensor] | None = None,
    menu=DEFAULT_MENU,
    kernel_menu=KERNEL_MENU,
    log: RunLog | None = None,
    reserve: int = 0,
    sensitivity: Mapping[str, float] | None = None,
    tables_out: dict[str, list[Choice]] | None = None,
    menu_cache: MenuCache | None = None,
    aliases: Mapping[str, str] | None = None,
) -> tuple[CompressedModel, dict[str, Choice]]:
    """Compress so that ``original fp32 bytes / file bytes >= target_ratio``.

    Args:
        model_or_state_dict: module or state dict.
        target_ratio: required whole-file ratio (> 1).
        config: which tensors (include/exclude), seed and k-means settings
            (:meth:`TargetConfig.clustering`: one float16 codebook per tensor, row gains with the
            unshrink correction, float16 kept tensors, compact storage: the codebook and gains of
            every tensor whose choice says ``compact`` in 8 bits, entropy-coded index streams, planned
            at their estimated size); each tensor's gain statistic comes with its choice.
        log: where the steps report progress and their time (``"estimating settings"``, ``"clustering"``).
        element_weights: optional ``{name: (1 or rows, cols)}`` importance weights (calibration).
        covariances: optional ``{name: (cols, cols)}`` input second-moment matrices (calibration):
            those tensors' menu entries are ranked by relative output error (see :func:`evaluate_menu`).
        menu: the ``((b_r, b_c), K)`` settings offered to every tensor.
        kernel_menu: kernel-aligned settings offered to convolutions besides (see :data:`KERNEL_MENU`
            and :func:`menu_for`); ``()`` for none.
        reserve: bytes to leave free below the target (for metadata that a later step may lengthen).
        sensitivity: optional ``{name: s}``: each tensor's distortion is multiplied by ``s`` in the
            allocation (a caller's per-layer sensitivity measure); default: every tensor counts
            equally (a Fisher-based measure was tried and dropped, see docs/design-notes.md).
        tables_out: optional dict, filled with every tensor's evaluated menu entries.
        menu_cache: optional :class:`~legonet.menu_cache.MenuCache` shared by several runs on the same
            weights (several target ratios): each tensor's data-free estimates are made once.
        aliases: ``{alias: source}`` names the caller took out of ``model_or_state_dict`` (tied
            weights, :func:`legonet.clustering.state_dict_and_aliases`), stored with the file;
            those of a module or state dict given here are found and added.
    Returns:
        The compressed model and the chosen setting per clustered tensor.
    """
    if not (isinstance(target_ratio, (int, float)) and target_ratio > 1):
        raise ConfigError(f"target ratio must be a number > 1, got {target_ratio!r}")
    log = log or RunLog()
    cfg = (config or TargetConfig()).clustering()
    sd, found = state_dict_and_aliases(model_or_state_dict)
    aliases = {**(aliases or {}), **found}
    check_finite(sd, cfg.allow_nonfinite)
    names = select_tensors(sd, cfg)
    if not names:
        raise ConfigError("no tensor to cluster")
    element_weights = element_weights or {}
    fp32 = fp32_bytes(sd)
    check_reachable(sd, names, target_ratio, menu=menu, kernel_menu=kernel_menu, reserve=reserve)
    target_bytes = int(fp32 / target_ratio) - reserve
    tables = {}
    with log.step("estimating settings"):
        for i, n in enumerate(names):
            entries = menu_for(sd[n].shape, menu, kernel_menu)
            weights, cov = element_weights.get(n), (covariances or {}).get(n)

            def evaluate(n=n, entries=entries, weights=weights, cov=cov, seed=cfg.seed + i):
                return evaluate_menu(sd[n], entries, element_weights=weights, covariance=cov, seed=seed,
                                     entropy_coding=True)

            if menu_cache is not None and weights is None and cov is None:
                tables[n] = menu_cache.get_or_evaluate(
                    MenuCache.key(n, sd[n], entries, cfg.seed + i, entropy_coding=True), evaluate)
            else:
                tables[n] = evaluate()
            if not tables[n]:
                raise ConfigError(f"tensor {n!r} {tuple(sd[n].shape)} is too small for any menu setting; exclude it")
            log.advance(i + 1, len(names))
    if tables_out is not None:
        tables_out.update(tables)
    if sensitivity is not None:
        missing = [n for n in names if n not in sensitivity]
        if missing:
            raise ConfigError(f"no sensitivity given for tensor {missing[0]!r}")
        # the plan keeps the unweighted distortion (what the reports show); only the search sees s
        search = {n: [replace(c, distortion=c.distortion * float(sensitivity[n])) for c in t] for n, t in tables.items()}
    else:
        search = tables
    chosen_set = set(names)
    # tensors kept as float16, constant ones written as fills (the writer's own rule)
    kept = {k: t.half() if t.is_floating_point() else t for k, t in sd.items() if k not in chosen_set}
    filled = fills(kept)
    fixed = sum(t.numel() * t.element_size() for k, t in kept.items() if k not in filled)
    overhead = _overhead(len(sd) + len(aliases))  # corrected below if too low
    smallest = sum(min(c.nbytes for c in t) for t in tables.values())
    if smallest > target_bytes - fixed - overhead:
        raise ConfigError(f"target ratio {target_ratio:g} is out of reach for this model: its coarsest settings "
                          f"are estimated at {smallest + fixed + overhead + reserve:,} bytes, about "
                          f"{fp32 / (smallest + fixed + overhead + reserve):.1f}x; lower target_ratio")
    # index streams are planned at their estimated entropy-coded sizes, and a sample's estimate may
    # be off; the last attempt plans them bit-packed, which the writer never exceeds
    packed = {n: [replace(c, nbytes=entry_nbytes(tuple(sd[n].shape), c.block, c.clusters, c.compact)) for c in t]
              for n, t in search.items()}
    attempts = 6
    for attempt in range(attempts):
        space = packed if attempt == attempts - 1 else search
        picked = allocate(space, target_bytes - fixed - overhead)
        plan = {n: tables[n][space[n].index(picked[n])] for n in names}
        groups = [Group((n,), plan[n].block, plan[n].clusters, plan[n].scale_stat) for n in names]
        with log.step("clustering"):
            cm = compress_groups(sd, cfg, groups, element_weights=element_weights, progress=log.report)
        cm.aliases = dict(aliases)
        store_compact(cm, [n for n in names if plan[n].compact])
        size = len(cm.to_bytes())
        if size <= target_bytes:
            # the allocation moves in whole settings and the streams' sizes were estimated: what
            # the file leaves below its target buys finer settings
            with log.step("spending what is left"):
                spent, _size = spend_slack(cm, sd, space, picked, target_bytes, element_weights=element_weights,
                                           file_bytes=size)
            return cm, {n: tables[n][space[n].index(spent[n])] for n in names}
        overhead += size - target_bytes + 64
    raise ConfigError(f"could not meet ratio {target_ratio} (last file {size:,} bytes, target {target_bytes:,})")
