"""Input statistics of weight layers, gathered with forward hooks on calibration images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from legonet.calibrate.data import Batch, run_model
from legonet.errors import ConfigError


def _module_of(model: nn.Module, weight_name: str) -> nn.Module | None:
    if weight_name == "weight":
        return model
    if not weight_name.endswith(".weight"):
        return None
    try:
        return model.get_submodule(weight_name[: -len(".weight")])
    except AttributeError:
        return None


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s passes run: the device of its first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _run(models: nn.Module | tuple[nn.Module, ...], batches: Iterable[Batch], hooks: list) -> None:
    """Run ``models`` (one, or several in turn on every batch) in eval mode over ``batches`` and
    remove ``hooks`` afterwards, whatever happens."""
    models = models if isinstance(models, tuple) else (models,)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        seen = 0
        for x in batches:
            for m in models:
                run_model(m, x)
            seen += 1
        if not seen:
            raise ConfigError("no calibration batch was given")
    finally:
        for h in hooks:
            h.remove()
        for m, training in zip(models, was_training):
            m.train(training)


@torch.no_grad()
def input_second_moments(model: nn.Module, batches: Iterable[Batch], names: list[str]) -> dict[str, torch.Tensor]:
    """Per-column input second moments of the Conv2d/Linear weights ``names`` of ``model``.

    For a weight viewed as ``(rows, cols)`` (see :mod:`legonet.ops.tiling`), column ``j`` multiplies
    one input feature; its weight is ``E[x^2]`` of that feature over the calibration batches
    (for convolutions: of the input channel, over all positions). Weights of other layer types get
    no entry (their clustering stays unweighted).

    Returns:
        ``{name: (groups == 1 ? 1 : rows, cols)}`` float32 tensors, normalised to mean 1.
    """
    return input_statistics(model, batches, names)[0]


@torch.no_grad()
def input_statistics(model: nn.Module, batches: Iterable[Batch], names: list[str], *,
                     covariance_rows: int | None = None, seed: int = 0,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Input second moments (:func:`input_second_moments`) and, with ``covariance_rows``, input
    second-moment matrices (:func:`input_covariances`), both from one pass over ``batches``.

    Returns:
        ``(moments, covariances)``; ``covariances`` is empty without ``covariance_rows``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    cov = _CovarianceSums(covariance_rows, seed) if covariance_rows is not None else None
    with_cov = set(covariance_layers(model, names)) if cov is not None else set()
    hooks = []
    for name in names:
        mod = _module_of(model, name)
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue

        def hook(m, inputs, _out, name=name):
            x = inputs[0].detach().float()
            if isinstance(m, nn.Conv2d):
                s = x.pow(2).sum(dim=(0, 2, 3))
                n = x.shape[0] * x.shape[2] * x.shape[3]
            else:
                x2 = x.reshape(-1, x.shape[-1])
                s, n = x2.pow(2).sum(0), x2.shape[0]
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + n
            if name in with_cov:
                cov.add(name, m, x)

        hooks.append(mod.register_forward_hook(hook))
    if not hooks:
        return {}, {}
    _run(model, batches, hooks)
    out = {name: column_weights(_module_of(model, name), s / counts[name]) for name, s in sums.items()}
    return out, ({} if cov is None else cov.result())


def column_weights(mod: nn.Module, channel_moments: torch.Tensor) -> torch.Tensor:
    """Per-column weights of a Conv2d/Linear weight's 2-D view from its inputs' per-channel second
    moments ``(in_channels,)``: ``(1, cols)``, or ``(rows, cols)`` for a grouped convolution (each
    group's rows see their own channels); normalised to mean 1, never exactly zero."""
    m = channel_moments.float()
    if isinstance(mod, nn.Conv2d):
        kk = mod.kernel_size[0] * mod.kernel_size[1]
        g = mod.groups
        per = mod.in_channels // g
        # (groups, in/groups) channel moments -> (rows, cols): rows of group i see channels of group i
        cols = m.reshape(g, per).repeat_interleave(kk, dim=1)  # (g, per*kk), column = (channel, ky, kx)
        w = cols.repeat_interleave(mod.out_channels // g, dim=0) if g > 1 else cols
    else:
        w = m[None, :]
    w = w + 1e-8 * float(w.mean())  # never exactly zero: every weight still counts a little
    return (w / w.mean()).float()


def _input_rows(mod: nn.Module, x: torch.Tensor, gen: torch.Generator | None = None,
                limit: int | None = None) -> torch.Tensor:
    """``(positions, cols)`` input vectors of a Conv2d (groups 1) or Linear, columns in the order of
    the weight's 2-D view (channel, ky, kx); with ``limit``, a random subset of at most ``limit``
    of them (drawn with ``gen``), in the order of the draw."""
    x = x.detach().float()
    if isinstance(mod, nn.Linear):
        return _subset(x.reshape(-1, x.shape[-1]), limit, gen)
    # Conv2d keeps its padding (whatever the mode, 'same' included) as an explicit pad spec
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    x = torch.nn.functional.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    if mod.dilation != (1, 1):
        p = torch.nn.functional.unfold(x, mod.kernel_size, dilation=mod.dilation, stride=mod.stride)  # (N, cols, L)
        return _subset(p.transpose(1, 2).reshape(-1, p.shape[1]), limit, gen)
    # a strided view (N, C, OH, OW, kh, kw) of every receptive field, no copy: only the drawn
    # positions are gathered (unfolding a whole batch first would copy kh*kw times the input)
    (kh, kw), (sh, sw) = mod.kernel_size, mod.stride
    view = x.unfold(2, kh, sh).unfold(3, kw, sw)
    n, c, oh, ow = view.shape[:4]
    total = n * oh * ow
    pick = torch.arange(total) if limit is None or total <= limit else _draw(total, limit, gen)
    img, pos = pick // (oh * ow), pick % (oh * ow)
    return view[img, :, pos // ow, pos % ow].reshape(pick.shape[0], c * kh * kw)


def _draw(total: int, limit: int, gen: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(total, generator=gen)[:limit]


def _subset(rows: torch.Tensor, limit: int | None, gen: torch.Generator | None) -> torch.Tensor:
    return rows if limit is None or rows.shape[0] <= limit else rows[_draw(rows.shape[0], limit, gen)]


def covariance_layers(model: nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` whose layer has one input-covariance matrix: Linear and
    ungrouped Conv2d weights (a grouped convolution's rows see different inputs)."""
    out = []
    for name in names:
        mod = _module_of(model, name)
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            out.append(name)
    return out


class _CovarianceSums:
    """Running ``sum x x^T`` per layer over at most ``rows`` seeded random input positions a batch."""

    def __init__(self, rows: int, seed: int) -> None:
        self.rows = rows
        self.gen = torch.Generator().manual_seed(seed)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, mod: nn.Module, x: torch.Tensor) -> None:
        rows = _input_rows(mod, x, self.gen, self.rows)
        self.sums[name] = self.sums.get(name, 0) + (rows.T @ rows).double()
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {name: (s / self.counts[name]).float() for name, s in self.sums.items()}


@torch.no_grad()
def input_covariances(model: nn.Module, batches: Iterable[Batch], names: list[str], *,
                      rows_per_batch: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """Input second-moment matrices ``H = E[x x^T]`` of the Linear/ungrouped Conv2d weights ``names``.

    For a convolution, ``x`` is one receptive field (``in * kh * kw`` values, the columns of the
    weight's 2-D view); at most ``rows_per_batch`` of a batch's positions (a seeded random
    subset) enter the estimate, which keeps the cost at ``rows_per_batch * cols^2`` per layer
    and batch. Memory: ``4 * cols^2`` bytes per layer (ResNet-50: about 0.6 GB in all).

    Returns:
        ``{name: (cols, cols)}`` float32 for the names :func:`covariance_layers` accepts.
    """
    cov = _CovarianceSums(rows_per_batch, seed)
    hooks = [_module_of(model, name).register_forward_hook(
                 lambda m, inputs, _out, name=name: cov.add(name, m, inputs[0]))
             for name in covariance_layers(model, names)]
    if not hooks:
        return {}
    _run(model, batches, hooks)
    return cov.result()


@torch.no_grad()
def paired_input_statistics(original: nn.Module, compressed: nn.Module, batches: Iterable[Batch],
                            names: list[str], *, rows_per_batch: int = 512, seed: int = 0,
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What each Linear/ungrouped Conv2d weight ``names`` receives in ``compressed`` against what
    it receives in ``original`` at the same input positions (both models run on every batch).

    With ``x`` a layer's input vector in the original network and ``x~`` in the compressed one
    (same image, same receptive field; at most ``rows_per_batch`` positions a batch, a seeded
    random subset drawn once for both), returns ``(H~, C)``: ``H~ = E[x~ x~^T]`` and the cross
    moment ``C = E[x~ x^T]``, each ``{name: (cols, cols)}`` float32.
    """
    names = covariance_layers(original, names)
    gen = torch.Generator().manual_seed(seed)
    # name -> [(generator state, original's rows)], one per call (a layer may run twice a forward)
    drawn: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    sums: dict[str, list] = {}

    def on_original(m, inputs, _out, name):
        state = gen.get_state()
        drawn.setdefault(name, []).append((state, _input_rows(m, inputs[0], gen, rows_per_batch)))

    def on_compressed(m, inputs, _out, name):
        state, rows = drawn[name].pop(0)
        mine = _input_rows(m, inputs[0], torch.Generator().set_state(state), rows_per_batch)  # same draw
        acc = sums.setdefault(name, [0, 0, 0])
        acc[0] = acc[0] + (mine.T @ mine).double()
        acc[1] = acc[1] + (mine.T @ rows).double()
        acc[2] += rows.shape[0]

    hooks = [_module_of(original, n).register_forward_hook(lambda m, i, o, n=n: on_original(m, i, o, n))
             for n in names]
    hooks += [_module_of(compressed, n).register_forward_hook(lambda m, i, o, n=n: on_compressed(m, i, o, n))
              for n in names]
    _run((original, compressed), batches, hooks)  # the original first on every batch: it draws the rows
    return ({n: (s / k).float() for n, (s, _, k) in sums.items()},
            {n: (c / k).float() for n, (_, c, k) in sums.items()})
