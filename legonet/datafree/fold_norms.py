"""BatchNorm in inference form: running statistics folded into the affine parameters.

In eval mode a BatchNorm computes ``(x - mean) / sqrt(var + eps) * weight + bias``. With
``s = weight / sqrt(var + eps)`` the same map is ``(x - 0) / sqrt((1 - eps) + eps) * s + (bias - mean * s)``:
storing ``weight := s``, ``bias := bias - mean * s``, ``running_mean := 0`` and ``running_var := 1 - eps``
changes no output in eval mode, and the two constant tensors cost nothing in a .lego file (they are
written as one value each, see :mod:`legonet.format.lego_file`). On a ResNet-50 that is 4 of the 10
bytes per channel the file spends on BatchNorm and row gains.

A second step, :func:`fold_norm_scales_into_gains`, moves each such BatchNorm's per-channel scale
``weight`` into the row gains of the clustered Conv/Linear layer that feeds it (``(W x) * s`` is
``(diag(s) W) x`` when the running mean is 0), leaving ``weight := 1``, another one-value tensor:
the gains and the scale were two float16 numbers per channel doing one job. A gain may then be
negative (a negative BatchNorm scale).

What changes: training-mode behaviour. A decompressed model's running statistics are no longer the
trained ones (0 and ``1 - eps``), which matters only if it is fine-tuned with BatchNorm in train mode;
``weight`` then starts at ``s`` instead of the trained scale (at 1 after the second step, with ``s``
in the preceding layer's weights).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

from legonet.artifact import ClusteredTensor
from legonet.compact import recode_compact
from legonet.errors import ConfigError
from legonet.graph import PassNote, graph_or_note

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


_FEEDERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight rows = output channels


def norms_after_layers(model: nn.Module, notes: list[PassNote] | None = None) -> dict[str, str]:
    """``{BatchNorm prefix: layer prefix}`` for every affine BatchNorm whose input is the output of a
    Conv/Linear layer (subclasses included) that feeds nothing else, with one output channel per
    BatchNorm channel (the pairs :func:`fold_norm_scales_into_gains` can fold). Empty when
    ``torch.fx`` cannot trace the model: nothing is folded then, the BatchNorm scales stay stored as
    they are, and a :class:`~legonet.graph.PassNote` saying why is appended to ``notes``."""
    gm, note = graph_or_note(model, "BatchNorm scale folding")
    if gm is None:
        if notes is not None:
            notes.append(note)
        return {}
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _FEEDERS):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn, layer = mods.get(users[0].target), mods[node.target]
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.affine and bn.track_running_stats \
                and bn.num_features == layer.weight.shape[0] and users[0].target not in out:
            out[users[0].target] = node.target
    return out


@torch.no_grad()
def fold_norm_scales_into_gains(cm, pairs: Mapping[str, str]) -> list[str]:
    """Move the scale of each BatchNorm of ``pairs`` into the row gains of the layer before it.

    A pair is folded when the layer's weight is clustered with row gains and the BatchNorm's
    ``weight`` is a dense tensor and its ``running_mean`` is 0 (inference form, see
    :func:`fold_batchnorm_statistics`): ``gain[r] *= weight[r]`` (rounded to float16, as stored),
    ``weight := 1``. The stored SQNR of the layer stays the one measured before (the fold is a
    change of parametrisation, not of the network's function).

    Args:
        cm: a :class:`~legonet.artifact.CompressedModel`, changed in place.
        pairs: ``{BatchNorm prefix: layer prefix}``, e.g. from :func:`norms_after_layers`.
    Returns:
        The BatchNorm prefixes folded.
    """
    done = []
    for bn, layer in pairs.items():
        ct = cm.tensors.get(state_key(layer, "weight"))
        w = cm.tensors.get(state_key(bn, "weight"))
        mean = cm.tensors.get(state_key(bn, "running_mean"))
        if not (isinstance(ct, ClusteredTensor) and ct.scale is not None and isinstance(w, torch.Tensor)
                and isinstance(mean, torch.Tensor) and w.shape == ct.scale.shape and not bool(mean.any())):
            continue
        gains = (ct.scale.double() * w.double()).to(torch.float16)
        if not bool(torch.isfinite(gains).all()):
            continue  # beyond float16: the scale stays where it is
        ct.scale = gains.float()
        cm.tensors[state_key(bn, "weight")] = torch.ones_like(w)
        done.append(bn)
    recode_compact(cm)  # gains stored as 8-bit log codes take a code for their new range
    return done


def unit_scales(tensors: Mapping[str, object], pairs: Mapping[str, str]) -> dict[str, object]:
    """A copy of ``tensors`` with the ``weight`` of every BatchNorm of ``pairs`` set to 1: the kept
    tensors as the file will hold them after :func:`fold_norm_scales_into_gains` (for planning a
    byte budget; the layers' weights are not rescaled, so it is not the same network)."""
    out = dict(tensors)
    for bn in pairs:
        key = state_key(bn, "weight")
        if isinstance(out.get(key), torch.Tensor):
            out[key] = torch.ones_like(out[key])
    return out


def restore_scales(cm, tensors: Mapping[str, torch.Tensor], pairs: Mapping[str, str]) -> None:
    """Put the BatchNorm scales of ``pairs`` back into ``cm`` from ``tensors`` after a budget was
    planned without them (:func:`unit_scales`): the network needs them until
    :func:`fold_planned_scales` moves them into the row gains."""
    for bn in pairs:
        key = state_key(bn, "weight")
        cm.tensors[key] = tensors[key].to(cm.tensors[key].dtype).clone()


def scale_pairs(model: nn.Module, clustered: list[str], notes: list[PassNote] | None = None) -> dict[str, str]:
    """:func:`norms_after_layers` restricted to layers whose weight is among ``clustered``."""
    chosen = set(clustered)
    return {bn: layer for bn, layer in norms_after_layers(model, notes).items()
            if state_key(layer, "weight") in chosen}


def fold_planned_scales(cm, pairs: Mapping[str, str]) -> list[str]:
    """:func:`fold_norm_scales_into_gains` for pairs a byte budget was planned with (see
    :func:`unit_scales`): every one must fold, else the file would outgrow the budget.

    Raises:
        ConfigError: naming the first BatchNorm that could not be folded.
    """
    done = fold_norm_scales_into_gains(cm, pairs)
    missed = [bn for bn in pairs if bn not in done]
    if missed:
        raise ConfigError(f"the scale of BatchNorm {missed[0]!r} could not move into the row gains of "
                          f"{pairs[missed[0]]!r} (not clustered with gains, not in inference form, or beyond "
                          "float16); compress without folding BatchNorm")
    return done
