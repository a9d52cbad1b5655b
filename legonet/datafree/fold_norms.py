"""BatchNorm in inference form: running statistics folded into the affine parameters.

In eval mode a BatchNorm computes ``(x - mean) / sqrt(var + eps) * weight + bias``. With
``s = weight / sqrt(var + eps)`` the same map is ``(x - 0) / sqrt((1 - eps) + eps) * s + (bias - mean * s)``:
storing ``weight := s``, ``bias := bias - mean * s``, ``running_mean := 0`` and ``running_var := 1 - eps``
changes no output in eval mode, and the two constant tensors cost nothing in a .lego file (they are
written as one value each, see :mod:`legonet.format.lego_file`). On a ResNet-50 that is 4 of the 10
bytes per channel the file spends on BatchNorm and row gains.

What changes: training-mode behaviour. A decompressed model's running statistics are no longer the
trained ones (0 and ``1 - eps``), which matters only if it is fine-tuned with BatchNorm in train mode;
``weight`` then starts at ``s`` instead of the trained scale.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

_PARTS = ("weight", "bias", "running_mean", "running_var")


def batchnorm_eps(model: nn.Module) -> dict[str, float]:
    """``{state-dict prefix: eps}`` of every BatchNorm of ``model`` with affine parameters and running
    statistics (the ones :func:`fold_batchnorm_statistics` can fold)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and mod.track_running_stats:
            out[name] = float(mod.eps)
    return out


def state_key(prefix: str, part: str) -> str:
    """State-dict name of ``part`` (e.g. ``"weight"``) of the module at ``prefix`` (``""``: the root)."""
    return f"{prefix}.{part}" if prefix else part


@torch.no_grad()
def fold_batchnorm_statistics(tensors: MutableMapping[str, object], eps: Mapping[str, float]) -> list[str]:
    """Fold the running statistics of the BatchNorm layers ``eps`` names into their affine parameters.

    Args:
        tensors: a state dict, or :attr:`legonet.CompressedModel.tensors`; entries are replaced
            (new tensors of the same dtype), never modified in place. A layer is folded only when its
            four tensors are present as dense tensors.
        eps: ``{prefix: eps}``, e.g. from :func:`batchnorm_eps`.
    Returns:
        The prefixes folded (already folded layers are left as they are).
    """
    done = []
    for prefix, e in eps.items():
        keys = [state_key(prefix, p) for p in _PARTS]
        parts = [tensors.get(k) for k in keys]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in parts):
            continue
        w, b, mean, var = parts
        unit = torch.full_like(var, 1.0 - e)
        if not bool(mean.any()) and torch.equal(var, unit):
            continue  # already in inference form
        s = w.double() / (var.double() + e).sqrt()
        tensors[keys[0]] = s.to(w.dtype)
        tensors[keys[1]] = (b.double() - mean.double() * s).to(b.dtype)
        tensors[keys[2]] = torch.zeros_like(mean)
        tensors[keys[3]] = unit
        done.append(prefix)
    return done
