"""Handlers of the layers the C export lowers, and the tables that route fx nodes to them.

``MODULES`` (checked in order with ``isinstance``), ``FUNCTIONS`` (by function object) and
``METHODS`` (by Tensor method name, a trailing ``_`` dropped) map fx targets to handlers of
:class:`~legonet.export.c.lower.Lowering`. Reshapes, dropout and identities become aliases (no
code); every handler checks the settings it cannot run and names the node when it refuses.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from legonet.export.c.conv_padding import conv_padding, resolve_padding
from legonet.export.c.graph import Post
from legonet.export.c.lower import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    ACT_MODULES,
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    Lowering,
    Param,
    Ref,
    bind,
    signature,
)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _image(lw: Lowering, node: fx.Node, x: object) -> Ref:
    ref = lw.tensor_arg(node, x)
    if len(lw.shape(ref)) != 4 or lw.shape(ref)[0] != 1:
        raise lw.fail(node, f"expects a (1, C, H, W) input, got {lw.shape(ref)}")
    return ref


# -- convolution and linear ---------------------------------------------------------------------
def _conv(lw: Lowering, node: fx.Node, x: Ref, weight: str, bias: str | None, stride, dilation,
          pad: tuple[int, int, int, int], groups: int) -> Ref:
    w_shape = tuple(lw.cm.tensors[lw.check_weight(weight, node)].shape)
    (_, c, h, w), out = lw.shape(x), lw.results[node].shape
    (kh, kw), (sh, sw), (dh, dw) = w_shape[2:], _pair(stride), _pair(dilation)
    top, bottom, left, right = pad
    expect = (1, w_shape[0], (h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
              (w + left + right - dw * (kw - 1) - 1) // sw + 1)
    if tuple(out) != expect or c != w_shape[1] * groups:
        raise lw.fail(node, f"its output {tuple(out)} is not a convolution's {expect}")
    return lw.emit(node, "conv", [x], weight=weight, kernel=(kh, kw), stride=(sh, sw), dilation=(dh, dw),
                   pad=(top, left), groups=int(groups), post=Post(add=lw.array(bias, node)))


def conv_module(lw: Lowering, node: fx.Node, m: nn.Conv2d, args, kwargs) -> Ref:
    x = _image(lw, node, args[0])
    pad = conv_padding(m, str(node.target), lw.shape(x), lw.results[node].shape)
    bias = f"{node.target}.bias" if m.bias is not None else None
    return _conv(lw, node, x, f"{node.target}.weight", bias, m.stride, m.dilation, pad, m.groups)


_CONV = signature("input", "weight", bias=None, stride=1, padding=0, dilation=1, groups=1)


def conv_function(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_CONV, args, kwargs, node, lw.gm)
    if not isinstance(a["weight"], Param) or not (a["bias"] is None or isinstance(a["bias"], Param)):
        raise lw.fail(node, "the weight and bias must be parameters of the network")
    x, weight = _image(lw, node, a["input"]), a["weight"].name
    kernel = tuple(lw.cm.tensors[lw.check_weight(weight, node)].shape[2:])
    pad = resolve_padding(a["padding"], kernel, _pair(a["dilation"]))
    return _conv(lw, node, x, weight, a["bias"] and a["bias"].name, a["stride"], a["dilation"], pad, a["groups"])


def _linear(lw: Lowering, node: fx.Node, x: object, weight: str, bias: str | None) -> Ref:
    x = lw.tensor_arg(node, x)
    rows, cols = lw.cm.tensors[lw.check_weight(weight, node)].shape
    if lw.shape(x)[-1] != cols:
        raise lw.fail(node, f"input {lw.shape(x)} does not end in the weight's {cols} columns")
    return lw.emit(node, "linear", [x], weight=weight, post=Post(add=lw.array(bias, node)))


def linear_module(lw: Lowering, node: fx.Node, m: nn.Linear, args, kwargs) -> Ref:
    return _linear(lw, node, args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None)


_LINEAR = signature("input", "weight", bias=None)


def linear_function(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_LINEAR, args, kwargs, node, lw.gm)
    if not isinstance(a["weight"], Param) or not (a["bias"] is None or isinstance(a["bias"], Param)):
        raise lw.fail(node, "the weight and bias must be parameters of the network")
    return _linear(lw, node, a["input"], a["weight"].name, a["bias"] and a["bias"].name)


def batchnorm_module(lw: Lowering, node: fx.Node, m: nn.modules.batchnorm._BatchNorm, args, kwargs) -> Ref:
    x, q = lw.tensor_arg(node, args[0]), node.target
    if not m.track_running_stats or m.running_mean is None:
        raise lw.fail(node, "batch norm without running statistics")
    mean, var = lw.array(f"{q}.running_mean", node), lw.array(f"{q}.running_var", node)
    weight = lw.array(f"{q}.weight", node) if m.affine else 1.0
    bias = lw.array(f"{q}.bias", node) if m.affine else 0.0
    scale = weight / (var + m.eps) ** 0.5
    return lw.emit(node, "pointwise", [x], post=Post(mul=scale, add=bias - mean * scale))


# -- pooling ------------------------------------------------------------------------------------
_MAXPOOL = signature("input", "kernel_size", stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
_AVGPOOL = signature("input", "kernel_size", stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                     divisor_override=None)


def _maxpool(lw: Lowering, node: fx.Node, a: dict) -> Ref:
    if a["return_indices"]:
        raise lw.fail(node, "return_indices=True")
    k = _pair(a["kernel_size"])
    return lw.emit(node, "maxpool", [_image(lw, node, a["input"])], kernel=k, stride=_pair(a["stride"] or k),
                   pad=_pair(a["padding"]), dilation=_pair(a["dilation"]))


def _avgpool(lw: Lowering, node: fx.Node, a: dict) -> Ref:
    k = _pair(a["kernel_size"])
    return lw.emit(node, "avgpool", [_image(lw, node, a["input"])], kernel=k, stride=_pair(a["stride"] or k),
                   pad=_pair(a["padding"]), count_include_pad=bool(a["count_include_pad"]),
                   divisor=int(a["divisor_override"] or 0))


def _adaptive_avg(lw: Lowering, node: fx.Node, x: object) -> Ref:
    x = _image(lw, node, x)
    (_, _, h, w), (_, _, oh, ow) = lw.shape(x), lw.results[node].shape
    if (oh, ow) == (1, 1):
        return lw.emit(node, "mean", [x])
    if (oh, ow) == (h, w):
        return x
    if h % oh or w % ow:
        raise lw.fail(node, f"adaptive pooling {h}x{w} -> {oh}x{ow} is not a whole number of windows")
    k = (h // oh, w // ow)
    return lw.emit(node, "avgpool", [x], kernel=k, stride=k, pad=(0, 0), count_include_pad=True, divisor=0)


_MEAN = signature("input", dim=None, keepdim=False, dtype=None)


def mean(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_MEAN, args, kwargs, node, lw.gm)
    x = lw.tensor_arg(node, a["input"])
    dims = a["dim"] if isinstance(a["dim"], (list, tuple)) else (a["dim"],)
    rank = len(lw.shape(x))
    if rank != 4 or a["dtype"] is not None or any(d is None for d in dims) or {d % rank for d in dims} != {2, 3}:
        raise lw.fail(node, "only the mean over H and W of a (1, C, H, W) tensor is supported")
    return lw.emit(node, "mean", [_image(lw, node, x)])


# -- padding, slicing, concatenation, reshapes ----------------------------------------------------
def _pad(lw: Lowering, node: fx.Node, x: object, pads, value: float) -> Ref:
    x = lw.tensor_arg(node, x)
    rank, pads = len(lw.shape(x)), [int(p) for p in pads]
    if len(pads) % 2 or len(pads) // 2 > rank - 1 or rank > 4 or any(p < 0 for p in pads):
        raise lw.fail(node, f"padding {tuple(pads)} of a {rank}-d tensor (only non-negative, not the batch dim)")
    per_dim = [(0, 0)] * 3  # (C, H, W) slots: tensor dim d sits in slot d - 1
    for i in range(len(pads) // 2):
        per_dim[rank - 2 - i] = (pads[2 * i], pads[2 * i + 1])
    return lw.emit(node, "pad", [x], pads=tuple(per_dim), value=float(value))


_PAD = signature("input", "pad", mode="constant", value=None)


def pad_function(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_PAD, args, kwargs, node, lw.gm)
    if a["mode"] != "constant":
        raise lw.fail(node, f"padding mode {a['mode']!r} (only constant)")
    return _pad(lw, node, a["input"], a["pad"], a["value"] or 0.0)


def getitem(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    x, index = lw.tensor_arg(node, args[0]), args[1]
    shape = lw.shape(x)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, slice) or i is Ellipsis) for i in items) or items.count(Ellipsis) > 1:
        raise lw.fail(node, "only slicing (start:stop:step per dimension) is supported")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    items += [slice(None)] * (len(shape) - len(items))
    bounds = [s.indices(n) for s, n in zip(items, shape)]
    if len(shape) > 4 or bounds[0] != (0, 1, 1):
        raise lw.fail(node, "slicing a tensor of more than 4 dims or its batch dimension")
    if all(b == (0, n, 1) for b, n in zip(bounds, shape)):
        return x
    start, step = [0, 0, 0], [1, 1, 1]
    for d, (b0, _, st) in enumerate(bounds[1:]):
        start[d], step[d] = b0, st
    return lw.emit(node, "slice", [x], start=tuple(start), step=tuple(step))


_CAT = signature("tensors", dim=0)


def concat(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_CAT, args, kwargs, node, lw.gm)
    parts = [lw.tensor_arg(node, t) for t in a["tensors"]]
    rank = len(lw.results[node].shape)
    return lw.emit(node, "concat", parts, dim=int(a["dim"]) % rank)


def alias(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    x = lw.tensor_arg(node, args[0])
    if tuple(lw.results[node].shape) == lw.shape(x):
        return x
    return lw.emit(node, "alias", [x])


_DROPOUT = signature("input", p=0.5, training=True, inplace=False)


def dropout(lw: Lowering, node: fx.Node, args, kwargs) -> Ref:
    a = bind(_DROPOUT, args, kwargs, node, lw.gm)
    if a["training"]:
        raise lw.fail(node, "dropout with training=True at inference")
    return lw.tensor_arg(node, a["input"])


def _module_pad(lw: Lowering, node: fx.Node, m: nn.Module, args, kwargs) -> Ref:
    return _pad(lw, node, args[0], m.padding, getattr(m, "value", 0.0))


def _module_act(name: str, settings):
    return lambda lw, node, m, args, kwargs: lw.activation(node, name, (args[0],), settings(m))


def _binary(op: str):
    return lambda lw, node, args, kwargs: lw.arithmetic(node, op, args, kwargs)


def _act(name: str):
    return lambda lw, node, args, kwargs: lw.activation(node, name, args, kwargs)


MODULES = [
    (nn.Conv2d, conv_module),
    (nn.Linear, linear_module),
    ((nn.BatchNorm1d, nn.BatchNorm2d), batchnorm_module),
    *(((t,), _module_act(name, settings)) for t, name, settings in ACT_MODULES),
    (nn.MaxPool2d, lambda lw, node, m, args, kwargs: _maxpool(lw, node, dict(
        input=args[0], kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
        return_indices=m.return_indices))),
    (nn.AvgPool2d, lambda lw, node, m, args, kwargs: _avgpool(lw, node, dict(
        input=args[0], kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
        count_include_pad=m.count_include_pad, divisor_override=m.divisor_override))),
    (nn.AdaptiveAvgPool2d, lambda lw, node, m, args, kwargs: _adaptive_avg(lw, node, args[0])),
    ((nn.Flatten, nn.Unflatten), lambda lw, node, m, args, kwargs: alias(lw, node, args, kwargs)),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity),
     lambda lw, node, m, args, kwargs: lw.tensor_arg(node, args[0])),
    ((nn.ZeroPad2d, nn.ConstantPad2d), _module_pad),
]

FUNCTIONS = {
    **{fn: _act(name) for fn, name in ACT_FUNCTIONS.items()},
    **{fn: _binary(op) for fn, op in BINARY_FUNCTIONS.items()},
    operator.neg: lambda lw, node, args, kwargs: lw.negate(node, args, kwargs),
    torch.neg: lambda lw, node, args, kwargs: lw.negate(node, args, kwargs),
    F.conv2d: conv_function,
    F.linear: linear_function,
    F.max_pool2d: lambda lw, node, args, kwargs: _maxpool(lw, node, bind(_MAXPOOL, args, kwargs, node, lw.gm)),
    F.avg_pool2d: lambda lw, node, args, kwargs: _avgpool(lw, node, bind(_AVGPOOL, args, kwargs, node, lw.gm)),
    F.adaptive_avg_pool2d: lambda lw, node, args, kwargs: _adaptive_avg(lw, node, args[0]),
    torch.mean: mean,
    F.pad: pad_function,
    operator.getitem: getitem,
    torch.cat: concat,
    torch.concat: concat,
    torch.flatten: alias,
    torch.reshape: alias,
    torch.squeeze: alias,
    torch.unsqueeze: alias,
    F.dropout: dropout,
    F.dropout1d: dropout,
    F.dropout2d: dropout,
    F.alpha_dropout: dropout,
}

METHODS = {
    **{name: _act(act) for name, act in ACT_METHODS.items()},
    **{name: _binary(op) for name, op in BINARY_METHODS.items()},
    "neg": lambda lw, node, args, kwargs: lw.negate(node, args, kwargs),
    "mean": mean,
    **{name: alias for name in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "view_as",
                                "reshape_as", "float")},
}

