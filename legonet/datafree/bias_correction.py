"""Data-free correction of the mean shift that clustering error causes (after Nagel et al., 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

A layer ``y = W x`` whose weights become ``W_q`` shifts its output mean by ``(W_q - W) E[x]``. When
the input comes out of a BatchNorm layer (optionally through ReLU, additions, padding, pooling),
``E[x]`` follows from that BatchNorm's stored affine parameters: its output is modelled per channel
as a Gaussian ``N(beta, gamma^2)``, and a ReLU of it has the rectified-Gaussian mean and variance.
The shift is then cancelled where it lands: by the BatchNorm that follows the layer (its
``running_mean`` moves by the shift) or, failing that, by the layer's own bias.

Moments are propagated through the model's graph (``torch.fx``) with a few rules (BatchNorm, ReLU,
addition, channel padding/slicing, average pooling, flatten of 1x1 maps); a layer whose input mean is
not known this way is left uncorrected and reported as such.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from legonet.errors import ArchitectureError

_RELU = (F.relu, torch.relu, torch.relu_)
_ADD = (operator.add, torch.add, operator.iadd)
_POOL_FN = (F.adaptive_avg_pool2d, F.avg_pool2d)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Moments:
    """Per-channel mean and variance ``(C,)`` of a tensor; ``var`` is None when unknown."""

    mean: torch.Tensor
    var: torch.Tensor | None


@dataclass(frozen=True)
class CorrectionReport:
    corrected: tuple[str, ...]  # weight names whose shift was cancelled
    uncorrected: tuple[str, ...]  # weight names left as they are (input mean unknown or no place to put it)


def _relu_moments(m: Moments) -> Moments | None:
    if m.var is None:
        return None
    s = m.var.clamp_min(1e-12).sqrt()
    a = m.mean / s
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    mean = m.mean * cdf + s * pdf
    second = (m.mean * m.mean + m.var) * cdf + m.mean * s * pdf
    return Moments(mean, (second - mean * mean).clamp_min(0))


def input_moments(model: nn.Module) -> dict[str, Moments]:
    """``{module name: Moments of its input}`` for every Conv2d/Linear whose input mean is derivable.

    Raises :class:`ArchitectureError` if the model cannot be traced by ``torch.fx``.
    """
    return _moments(_trace(model))


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise ArchitectureError(f"data-free bias correction needs a traceable model: {exc}") from None


def _moments(gm: fx.GraphModule) -> dict[str, Moments]:
    mods = dict(gm.named_modules())
    known: dict[fx.Node, Moments | None] = {}
    out: dict[str, Moments] = {}

    def arg(n) -> Moments | None:
        return known.get(n) if isinstance(n, fx.Node) else None

    for node in gm.graph.nodes:
        res: Moments | None = None
        if node.op == "call_module":
            mod = mods[node.target]
            src = arg(node.args[0]) if node.args else None
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                if src is not None:
                    out[node.target] = src
            elif isinstance(mod, _BN) and mod.affine:
                res = Moments(mod.bias.detach().float().clone(), mod.weight.detach().float().pow(2))
            elif isinstance(mod, nn.ReLU) and src is not None:
                res = _relu_moments(src)
            elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)) and src is not None:
                res = Moments(src.mean, src.var if isinstance(mod, (nn.Identity, nn.Dropout)) else None)
            elif isinstance(mod, nn.Flatten) and src is not None:
                res = _flatten(node, src)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            src = arg(node.args[0]) if node.args else None
            if fn in _RELU or fn in ("relu", "relu_"):
                res = _relu_moments(src) if src is not None else None
            elif fn in _ADD or fn in ("add", "add_", "__add__"):
                a, b = arg(node.args[0]), arg(node.args[1]) if len(node.args) > 1 else None
                if a is not None and b is not None and a.mean.shape == b.mean.shape:
                    var = None if a.var is None or b.var is None else a.var + b.var  # independence assumed
                    res = Moments(a.mean + b.mean, var)
            elif fn in _POOL_FN and src is not None:
                res = Moments(src.mean, None)
            elif fn is F.pad and src is not None:
                res = _channel_pad(node, src)
            elif fn is operator.getitem and src is not None:
                res = _spatial_slice(node, src)
            elif (fn is torch.flatten or fn == "flatten") and src is not None:
                res = _flatten(node, src)
        known[node] = res
    return out


def _flatten(node: fx.Node, src: Moments) -> Moments | None:
    # only the flatten of pooled (1x1) maps keeps one value per channel; shapes are not traced, so
    # the input must come straight from an average pooling to size 1
    prev = node.args[0]
    if isinstance(prev, fx.Node) and prev.op == "call_function" and prev.target is F.adaptive_avg_pool2d \
            and prev.args[1:] in ((1,), ((1, 1),)):
        return Moments(src.mean, None)
    if isinstance(prev, fx.Node) and prev.op == "call_module" and prev.target and \
            isinstance(prev.graph.owning_module.get_submodule(prev.target), nn.AdaptiveAvgPool2d) and \
            prev.graph.owning_module.get_submodule(prev.target).output_size in (1, (1, 1)):
        return Moments(src.mean, None)
    return None


def _channel_pad(node: fx.Node, src: Moments) -> Moments | None:
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
    if mode != "constant" or (value or 0.0) != 0.0 or not isinstance(pad, (tuple, list)):
        return None
    pad = list(pad)
    if len(pad) <= 4:  # spatial padding only: channel means kept (border zeros ignored)
        return src
    if len(pad) == 6 and all(isinstance(p, int) for p in pad):
        lo, hi = pad[4], pad[5]
        z = torch.zeros(lo), torch.zeros(hi)
        var = None if src.var is None else torch.cat([z[0], src.var, z[1]])
        return Moments(torch.cat([z[0], src.mean, z[1]]), var)
    return None


def _spatial_slice(node: fx.Node, src: Moments) -> Moments | None:
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) < 2:
        return None
    full = slice(None, None, None)
    if idx[0] != full or idx[1] != full:  # batch and channel axes must be untouched
        return None
    return src


@torch.no_grad()
def correct_bias(model: nn.Module, original: dict[str, torch.Tensor],
                 compressed: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], CorrectionReport]:
    """Cancel the mean shift of every clustered Conv2d/Linear whose input mean is derivable.

    Args:
        model: the architecture (its weights are not used; the BatchNorm parameters come from ``original``).
        original: the original state dict.
        compressed: the dense reconstruction of the compressed model (same names); not modified.
    Returns:
        A new state dict with corrected ``running_mean``/``bias`` entries, and a report.
    """
    probe = _with_state(model, original)
    gm = _trace(probe)
    moments = _moments(gm)
    mods = dict(gm.named_modules())
    users = {n.target: list(n.users) for n in gm.graph.nodes if n.op == "call_module"}
    new = dict(compressed)
    done, skipped = [], []
    for name, mod in probe.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        wname = f"{name}.weight" if name else "weight"
        if wname not in original or torch.equal(original[wname].float(), compressed[wname].float()):
            continue  # kept as it was: nothing to correct
        m = moments.get(name)
        if m is None:
            skipped.append(wname)
            continue
        delta = compressed[wname].float() - original[wname].float()
        shift = _output_shift(mod, delta, m.mean)
        if shift is None:
            skipped.append(wname)
            continue
        target = _bn_after(users.get(name, []), mods)
        if target is not None:
            key = f"{target}.running_mean"
            new[key] = (new[key].float() + shift).to(compressed[key].dtype)
        elif mod.bias is not None and f"{name}.bias" in new:
            key = f"{name}.bias"
            new[key] = (new[key].float() - shift).to(compressed[key].dtype)
        else:
            skipped.append(wname)
            continue
        done.append(wname)
    return new, CorrectionReport(tuple(done), tuple(skipped))


def _output_shift(mod: nn.Module, delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
    """``(out,)`` expected change of the output from weight change ``delta`` and input mean."""
    if isinstance(mod, nn.Linear):
        return delta @ mean if mean.numel() == delta.shape[1] else None
    if mean.numel() != mod.in_channels:
        return None
    g = mod.groups
    d = delta.sum(dim=(2, 3))  # (out, in/g): border padding ignored
    m = mean.reshape(g, -1)  # (g, in/g)
    return (d.reshape(g, -1, d.shape[1]) @ m[:, :, None]).reshape(-1)


def _bn_after(users: list[fx.Node], mods: dict[str, nn.Module]) -> str | None:
    if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], _BN):
        return users[0].target
    return None


def _with_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    from legonet.artifact import load_weights

    probe = copy.deepcopy(model)
    load_weights(probe, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return probe.eval()


def correct_compressed(cm, model: nn.Module, original: dict[str, torch.Tensor]) -> CorrectionReport:
    """:func:`correct_bias` applied in place to a :class:`~legonet.artifact.CompressedModel`.

    Only dense (kept) tensors change: BatchNorm ``running_mean`` or layer biases; the file size stays.
    """
    dense = cm.to_state_dict()
    new, rep = correct_bias(model, original, dense)
    for name, t in new.items():
        if t is not dense[name]:
            cm.tensors[name] = t.to(cm.tensors[name].dtype).clone()
    return rep
