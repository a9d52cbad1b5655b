"""Lowering a zoo network into a flat list of C-runtime operations, with shapes and buffers.

The C export supports the layers the zoo's ResNets use: conv2d, batch norm, ReLU, add, option-A
shortcut, max-pool, global average pooling and linear. A network is lowered by walking its
modules (CIFAR ResNets of :mod:`legonet.zoo.resnet_cifar`, ResNet-50 of :mod:`legonet.zoo.resnet50`),
so only the architecture's structure is needed, not its weights.

Activations are float32 CHW. Every value gets one of a few static buffers ("slots"), reused as soon
as the value is dead; in-place ops (batch norm, ReLU, add) write over their first operand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from legonet.errors import ArchitectureError
from legonet.zoo import resnet50, resnet_cifar


@dataclass
class Op:
    """One runtime call. ``kind`` is conv, bn, relu, add, shortcut_a, maxpool, gap or linear;
    ``src``/``dst`` are value ids; ``layer`` the module's name; ``attrs`` kind-specific settings."""

    kind: str
    dst: int
    src: tuple[int, ...] = ()
    layer: str = ""
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    """Ops in execution order, each value's shape ``(C, H, W)`` and, after :meth:`plan`, its slot."""

    input_shape: tuple[int, int, int]
    ops: list[Op] = field(default_factory=list)
    shapes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    slot_of: dict[int, int] = field(default_factory=dict)
    slot_floats: list[int] = field(default_factory=list)
    output: int = 0

    def new(self, shape: tuple[int, int, int]) -> int:
        vid = len(self.shapes)
        self.shapes[vid] = shape
        return vid

    def plan(self) -> None:
        """Assign slots: a value takes a free slot when defined and frees it after its last use."""
        last: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for v in (*op.src, op.dst):
                last[v] = i
        last[self.output] = len(self.ops)
        free: list[int] = []
        self.slot_of = {0: 0}
        self.slot_floats = [_numel(self.shapes[0])]
        for i, op in enumerate(self.ops):
            if op.dst not in self.slot_of:
                size = _numel(self.shapes[op.dst])
                if free:
                    # best fit: the largest free slot, grown if needed (few slots, simple is enough)
                    s = max(free, key=lambda k: self.slot_floats[k])
                    free.remove(s)
                    self.slot_floats[s] = max(self.slot_floats[s], size)
                else:
                    s = len(self.slot_floats)
                    self.slot_floats.append(size)
                self.slot_of[op.dst] = s
            for v in set((*op.src, op.dst)):
                if last[v] == i:
                    free.append(self.slot_of[v])


def _numel(shape: tuple[int, int, int]) -> int:
    return shape[0] * shape[1] * shape[2]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Builder:
    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.g = Graph(input_shape)
        self.g.new(input_shape)

    def conv(self, m: nn.Conv2d, x: int) -> int:
        if m.padding_mode != "zeros" or m.dilation not in ((1, 1), 1) or isinstance(m.padding, str):
            raise ArchitectureError(f"C export: conv {self.names[m]!r} uses an unsupported setting "
                                    "(only zero padding, numeric padding, dilation 1)")
        c, h, w = self.g.shapes[x]
        (kh, kw), (sh, sw), (ph, pw) = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        y = self.g.new((m.out_channels, oh, ow))
        self.g.ops.append(Op("conv", y, (x,), self.names[m], dict(k=(kh, kw), s=(sh, sw), p=(ph, pw),
                                                                   groups=m.groups, bias=m.bias is not None)))
        return y

    def bn(self, m: nn.BatchNorm2d, x: int) -> int:
        if not (m.affine and m.track_running_stats):
            raise ArchitectureError(f"C export: batch norm {self.names[m]!r} needs affine=True and running stats")
        self.g.ops.append(Op("bn", x, (x,), self.names[m], dict(eps=float(m.eps))))
        return x

    def relu(self, x: int) -> int:
        self.g.ops.append(Op("relu", x, (x,)))
        return x

    def add(self, x: int, other: int) -> int:
        self.g.ops.append(Op("add", x, (x, other)))
        return x

    def shortcut_a(self, x: int, pad: int) -> int:
        c, h, w = self.g.shapes[x]
        y = self.g.new((c + 2 * pad, (h + 1) // 2, (w + 1) // 2))
        self.g.ops.append(Op("shortcut_a", y, (x,), attrs=dict(pad=pad)))
        return y

    def maxpool(self, x: int, k: int, s: int, p: int) -> int:
        c, h, w = self.g.shapes[x]
        y = self.g.new((c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1))
        self.g.ops.append(Op("maxpool", y, (x,), attrs=dict(k=k, s=s, p=p)))
        return y

    def gap(self, x: int) -> int:
        y = self.g.new((self.g.shapes[x][0], 1, 1))
        self.g.ops.append(Op("gap", y, (x,)))
        return y

    def linear(self, m: nn.Linear, x: int) -> int:
        if _numel(self.g.shapes[x]) != m.in_features:
            raise ArchitectureError(f"C export: linear {self.names[m]!r} expects {m.in_features} inputs")
        y = self.g.new((m.out_features, 1, 1))
        self.g.ops.append(Op("linear", y, (x,), self.names[m], dict(bias=m.bias is not None)))
        return y


def _cifar_resnet(b: _Builder, model: resnet_cifar.CifarResNet) -> int:
    x = b.relu(b.bn(model.bn1, b.conv(model.conv1, 0)))
    for layer in (model.layer1, model.layer2, model.layer3):
        for blk in layer:
            t = b.relu(b.bn(blk.bn1, b.conv(blk.conv1, x)))
            u = b.bn(blk.bn2, b.conv(blk.conv2, t))
            sc = b.shortcut_a(x, blk.shortcut.pad) if isinstance(blk.shortcut, resnet_cifar._OptionAShortcut) else x
            x = b.relu(b.add(u, sc))
    return b.linear(model.linear, b.gap(x))


def _resnet50(b: _Builder, model: resnet50.ResNet50) -> int:
    x = b.relu(b.bn(model.bn1, b.conv(model.conv1, 0)))
    if not model.cifar_stem:
        x = b.maxpool(x, 3, 2, 1)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in layer:
            y = b.relu(b.bn(blk.bn1, b.conv(blk.conv1, x)))
            y = b.relu(b.bn(blk.bn2, b.conv(blk.conv2, y)))
            y = b.bn(blk.bn3, b.conv(blk.conv3, y))
            idn = x if blk.downsample is None else b.bn(blk.downsample[1], b.conv(blk.downsample[0], x))
            x = b.relu(b.add(y, idn))
    return b.linear(model.fc, b.gap(x))


def lower(model: nn.Module, input_shape: tuple[int, int, int]) -> Graph:
    """The op list of ``model`` (a zoo ResNet) for inputs of ``input_shape`` ``(C, H, W)``, slots planned."""
    b = _Builder(model, input_shape)
    if isinstance(model, resnet_cifar.CifarResNet):
        out = _cifar_resnet(b, model)
    elif isinstance(model, resnet50.ResNet50):
        out = _resnet50(b, model)
    else:
        raise ArchitectureError(f"C export supports the zoo's ResNets (resnet20..110, resnet50_cifar), "
                                f"not {type(model).__name__}")
    b.g.output = out
    b.g.plan()
    return b.g
