"""Data-free correction of the mean shift that clustering error causes (after Nagel et al., 2019,
"Data-Free Quantization Through Weight Equalization and Bias Correction").

A layer ``y = W x`` whose weights become ``W_q`` shifts its output mean by ``(W_q - W) E[x]``. When
the input comes out of a BatchNorm layer (optionally through ReLU, additions, padding, pooling),
``E[x]`` follows from that BatchNorm's stored affine parameters: its output is modelled per channel
as a Gaussian ``N(beta, gamma^2)``, and a ReLU of it has the rectified-Gaussian mean and variance.
The shift is then cancelled where it lands: by the BatchNorm that follows the layer (its
``running_mean`` moves by the shift) or, failing that, by the layer's own bias.

Moments are propagated through the model's graph (``torch.fx``) with a few rules (BatchNorm;
elementwise activations: ReLU, ReLU6 and Hardtanh in closed form, SiLU, GELU, Hardswish, sigmoid,
tanh and a few more by Gauss-Hermite quadrature; addition, channel padding/slicing, average pooling,
spatial means, flatten of 1x1 maps); a layer whose input mean is not known this way is left
uncorrected and reported as such.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from legonet.errors import ArchitectureError
from legonet.graph import trace

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
    reason: str = ""  # why nothing could be corrected (the model could not be traced), else ""

    def describe(self) -> str:
        """One line for the user: how many layers were corrected, and which were not."""
        if self.reason:
            return f"data-free bias correction: skipped all {len(self.uncorrected)} clustered layers: {self.reason}"
        line = (f"data-free bias correction: corrected {len(self.corrected)} of "
                f"{len(self.corrected) + len(self.uncorrected)} clustered layers")
        if self.uncorrected:
            line += ("; left as they are (input mean not derivable, or no BatchNorm or bias after them): "
                     + ", ".join(self.uncorrected))
        return line


def _clip_moments(m: Moments, lo: float, hi: float) -> Moments | None:
    """Moments of ``clamp(x, lo, hi)`` for ``x ~ N(mean, var)`` per channel (the clipped Gaussian,
    in closed form; ``lo``/``hi`` may be infinite): ReLU, ReLU6, Hardtanh."""
    if m.var is None:
        return None
    s = m.var.clamp_min(1e-12).sqrt()
    mu = m.mean
    a, b = (lo - mu) / s, (hi - mu) / s

    def pdf(z):
        return torch.where(torch.isinf(z), torch.zeros_like(z), torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))

    def zpdf(z):  # z * pdf(z), 0 at +-inf
        return torch.where(torch.isinf(z), torch.zeros_like(z), z * pdf(z))

    def edge(v):  # v * P(side) terms vanish at an infinite bound
        return 0.0 if math.isinf(v) else v

    cdf_a, cdf_b = 0.5 * (1 + torch.erf(a / math.sqrt(2))), 0.5 * (1 + torch.erf(b / math.sqrt(2)))
    inside = cdf_b - cdf_a
    mean = edge(lo) * cdf_a + edge(hi) * (1 - cdf_b) + mu * inside + s * (pdf(a) - pdf(b))
    second = (edge(lo) ** 2 * cdf_a + edge(hi) ** 2 * (1 - cdf_b) + (mu * mu + m.var) * inside
              + 2 * mu * s * (pdf(a) - pdf(b)) + m.var * (zpdf(a) - zpdf(b)))
    return Moments(mean, (second - mean * mean).clamp_min(0))


def _relu_moments(m: Moments) -> Moments | None:
    """The rectified Gaussian: :func:`_clip_moments` with ``(0, inf)``, in its simpler form."""
    if m.var is None:
        return None
    s = m.var.clamp_min(1e-12).sqrt()
    a = m.mean / s
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    mean = m.mean * cdf + s * pdf
    second = (m.mean * m.mean + m.var) * cdf + m.mean * s * pdf
    return Moments(mean, (second - mean * mean).clamp_min(0))


# probabilists' Gauss-Hermite rule: E[f(x)], x ~ N(mu, s^2), is sum_i w_i f(mu + s t_i) / sqrt(2 pi);
# 64 nodes integrate the smooth activations below to ~1e-6 and kinked ones (Hardswish) to ~1e-4
_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(64))


def _smooth_moments(m: Moments, fn: Callable[[torch.Tensor], torch.Tensor]) -> Moments | None:
    """Moments of ``fn(x)`` for ``x ~ N(mean, var)`` per channel, by Gauss-Hermite quadrature."""
    if m.var is None:
        return None
    x = m.mean.double()[:, None] + m.var.double().clamp_min(0).sqrt()[:, None] * _NODES[None, :]
    w = _WEIGHTS / math.sqrt(2 * math.pi)
    y = fn(x)
    mean = (y * w).sum(1)
    var = ((y - mean[:, None]) ** 2 * w).sum(1)
    return Moments(mean.float(), var.float().clamp_min(0))


# elementwise activations whose output moments follow from a Gaussian input: ReLU and the clipped
# ReLUs in closed form, the rest by quadrature of the module or function itself
_CLIP_MODULES = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh(0, 6)
_QUADRATURE_MODULES = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU,
                       nn.Softplus, nn.LeakyReLU)
_QUADRATURE_FUNCTIONS = (F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh,
                         F.tanh, F.mish, F.elu, F.softplus, F.leaky_relu)
_QUADRATURE_METHODS = ("sigmoid", "tanh")


def _is_activation(target) -> bool:
    if isinstance(target, nn.Module):
        return isinstance(target, _CLIP_MODULES + _QUADRATURE_MODULES)
    if isinstance(target, str):
        return target in ("relu", "relu_") + _QUADRATURE_METHODS
    return any(target is f for f in _RELU + (F.relu6, F.hardtanh, F.hardtanh_) + _QUADRATURE_FUNCTIONS)


def _activation_moments(act, args: tuple, kwargs: dict, src: Moments | None) -> Moments | None:
    """Moments after the elementwise activation ``act`` (a module, or a function or method name called
    with the extra ``args``/``kwargs``), or None when ``src`` or an option is unknown."""
    if src is None:
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    if any(isinstance(v, fx.Node) for v in (*args, *kwargs.values())):
        return None  # an option computed at run time
    if isinstance(act, nn.ReLU) or any(act is f for f in _RELU) or act in ("relu", "relu_"):
        return _relu_moments(src)
    if isinstance(act, nn.Hardtanh):
        return _clip_moments(src, float(act.min_val), float(act.max_val))
    if act is F.relu6:
        return _clip_moments(src, 0.0, 6.0)
    if act is F.hardtanh or act is F.hardtanh_:
        lo = kwargs.get("min_val", args[0] if args else -1.0)
        hi = kwargs.get("max_val", args[1] if len(args) > 1 else 1.0)
        return _clip_moments(src, float(lo), float(hi))
    if isinstance(act, nn.Module):
        return _smooth_moments(src, act)
    if isinstance(act, str):
        return _smooth_moments(src, lambda x: getattr(x, act)(*args, **kwargs))
    return _smooth_moments(src, lambda x: act(x, *args, **kwargs))


def input_moments(model: nn.Module) -> dict[str, Moments]:
    """``{module name: Moments of its input}`` for every Conv2d/Linear whose input mean is derivable.

    Raises :class:`ArchitectureError` if the model cannot be traced by ``torch.fx``.
    """
    return _moments(_trace(model))


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return trace(model)
    except ArchitectureError as exc:
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
            elif _is_activation(mod):
                res = _activation_moments(mod, (), {}, src)
            elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)) and src is not None:
                res = Moments(src.mean, src.var if isinstance(mod, (nn.Identity, nn.Dropout)) else None)
            elif isinstance(mod, nn.Flatten) and src is not None:
                res = _flatten(node, src)
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            src = arg(node.args[0]) if node.args else None
            if _is_activation(fn):
                res = _activation_moments(fn, tuple(node.args[1:]), dict(node.kwargs), src)
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
            elif (fn is torch.mean or fn == "mean") and src is not None:
                res = _spatial_mean(node, src)
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


def _spatial_mean(node: fx.Node, src: Moments) -> Moments | None:
    # x.mean(dims) keeps the channel means when it averages over spatial axes only: shapes are not
    # traced, so only explicit dims >= 2 (never the batch or channel axis, whatever the rank) qualify
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) and d >= 2 for d in dims):
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
    try:
        new, rep = correct_bias(model, original, dense)
    except ArchitectureError as exc:  # untraceable: the file is still valid, only uncorrected; say so
        return CorrectionReport((), tuple(cm.clustered), str(exc))
    for name, t in new.items():
        if t is not dense[name]:
            cm.tensors[name] = t.to(cm.tensors[name].dtype).clone()
    return rep
