"""Function-preserving channel permutations that put alike weight rows into the same blocks.

A Conv2d or Linear layer (the *producer*) whose output reaches exactly one other Conv2d or Linear
layer (the *consumer*) through channel-wise layers only (BatchNorm, activations, dropout, pooling,
depthwise convolutions) can have its output channels reordered at no cost: the same order applied
to the channel-wise layers' parameters and buffers and to the consumer's input channels leaves the
network's function unchanged (up to float rounding). Inside a ResNet bottleneck both hidden widths
qualify, and so does the hidden width of a transformer's MLP; a channel dimension that reaches a
residual addition, a concatenation, a reshape or two layers is left as it is.

:func:`group_alike_channels` orders each such dimension with :func:`legonet.ops.grouping.alike_row_order`
by the producer's weight rows, so that its blocks of 2 or 4 rows hold rows alike up to sign and
scale (what the per-row gains absorb). Block clustering then represents them with less error: on
ResNet-50's bottlenecks at the 64x file's settings, 7-20 % lower k-means distortion
(docs/design-notes.md). The consumer's input channels move along; they are not part of the
criterion (the measurement above used the rows alone). Found with ``torch.fx``
(:mod:`legonet.graph`: subclasses of the layers count as the layers); a model fx cannot trace is
left unchanged, and the reason is returned as a note.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from legonet.graph import PassNote, graph_or_note
from legonet.ops.grouping import alike_row_order

# parameter-free modules that act on each channel alone (on (N, C, ...) and (..., C) alike)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
                nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout)
# spatial-only modules: channel-wise on (N, C, H, W) only
_SPATIAL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, torch.sigmoid,
                          torch.tanh, F.dropout}


@dataclass(frozen=True)
class ChannelChain:
    """One freely permutable channel dimension: ``producer`` (module name) makes ``channels`` outputs
    that reach ``consumer`` through the modules ``channelwise`` (those holding per-channel tensors)."""

    producer: str
    channelwise: tuple[str, ...]
    consumer: str
    channels: int


def _dense(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _only_input(node: fx.Node, source: fx.Node) -> bool:
    """``node`` takes ``source`` as its first argument and no other graph value."""
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return bool(node.args) and node.args[0] is source and not others


def free_channel_chains(model: nn.Module, notes: list[PassNote] | None = None) -> list[ChannelChain]:
    """Every channel dimension of ``model`` that can be permuted without changing its function.

    Empty when ``torch.fx`` cannot trace the model (a :class:`~legonet.graph.PassNote` saying why is
    appended to ``notes``). A module called more than once is never part of a chain (its channels
    would have to be permuted for every call site alike). Subclasses of Conv2d/Linear/BatchNorm
    count as the layers they derive from.
    """
    gm, note = graph_or_note(model, "channel grouping")
    if gm is None:
        if notes is not None:
            notes.append(note)
        return []
    mods = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    chains = []
    for node in gm.graph.nodes:
        producer = mods.get(node.target) if node.op == "call_module" else None
        if not _dense(producer) or calls[node.target] != 1:
            continue
        conv = isinstance(producer, nn.Conv2d)
        channels = producer.weight.shape[0]
        middle: list[str] = []
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1 or not _only_input(users[0], cur):
                break
            nxt = users[0]
            if nxt.op == "call_function" and nxt.target in _ELEMENTWISE_FUNCTIONS:
                cur = nxt
                continue
            m = mods.get(nxt.target) if nxt.op == "call_module" else None
            if m is None or calls[nxt.target] != 1:
                break
            if _dense(m) and isinstance(m, nn.Conv2d) == conv:
                fan_in = m.in_channels if conv else m.in_features
                if fan_in == channels:
                    chains.append(ChannelChain(node.target, tuple(middle), nxt.target, channels))
                break
            if isinstance(m, _ELEMENTWISE) or (conv and isinstance(m, _SPATIAL)):
                cur = nxt
                continue
            if conv and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == channels:
                middle.append(nxt.target)
                cur = nxt
                continue
            if conv and isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels == channels:
                middle.append(nxt.target)  # depthwise: one filter per channel
                cur = nxt
                continue
            break
    return chains


@torch.no_grad()
def permute_chain(model: nn.Module, chain: ChannelChain, order: torch.Tensor) -> None:
    """Reorder ``chain``'s channels in place by ``order (channels,)``: producer rows (and bias),
    every per-channel tensor of the channel-wise modules, consumer input channels."""
    if sorted(order.tolist()) != list(range(chain.channels)):
        raise ValueError(f"order is not a permutation of {chain.channels} channels")
    mods = dict(model.named_modules())
    producer, consumer = mods[chain.producer], mods[chain.consumer]
    for m in [producer, *(mods[n] for n in chain.channelwise)]:
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t.ndim >= 1 and t.shape[0] == chain.channels:
                t.copy_(t[order.to(t.device)])
    consumer.weight.copy_(consumer.weight[:, order.to(consumer.weight.device)])


def group_alike_channels(model: nn.Module, notes: list[PassNote] | None = None) -> list[ChannelChain]:
    """Permute every free channel dimension of ``model`` in place so that aligned groups of 2 and 4
    channels are alike (see the module docstring); the function of ``model`` does not change.

    Returns:
        The chains permuted (``notes`` receives why none could be looked for, if so).
    """
    chains = free_channel_chains(model, notes)
    for chain in chains:
        rows = dict(model.named_modules())[chain.producer].weight.detach().reshape(chain.channels, -1).cpu()
        permute_chain(model, chain, alike_row_order(rows, group=4))
    return chains
