"""Input statistics of weight layers, gathered with forward hooks on calibration images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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


@torch.no_grad()
def input_second_moments(model: nn.Module, batches: Iterable[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Per-column input second moments of the Conv2d/Linear weights ``names`` of ``model``.

    For a weight viewed as ``(rows, cols)`` (see :mod:`legonet.ops.tiling`), column ``j`` multiplies
    one input feature; its weight is ``E[x^2]`` of that feature over the calibration batches
    (for convolutions: of the input channel, over all positions). Weights of other layer types get
    no entry (their clustering stays unweighted).

    Returns:
        ``{name: (groups == 1 ? 1 : rows, cols)}`` float32 tensors, normalised to mean 1.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
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
                x = x.reshape(-1, x.shape[-1])
                s, n = x.pow(2).sum(0), x.shape[0]
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + n

        hooks.append(mod.register_forward_hook(hook))
    if not hooks:
        return {}
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for x in batches:
            model(x)
            seen += 1
        if not seen:
            raise ConfigError("no calibration batch was given")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for name, s in sums.items():
        mod = _module_of(model, name)
        m = s / counts[name]
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
        out[name] = (w / w.mean()).float()
    return out
