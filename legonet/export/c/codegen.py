"""C99 code generation: ``export_c(cm, arch_or_module, out_dir)`` writes a self-contained C model.

model.c holds the weights as ``const`` arrays (flash on a microcontroller; encodings in
:mod:`legonet.export.c.weights`), two ``static`` float buffers (RAM: the activation arena laid out by
:mod:`legonet.export.c.memory`, and a scratch that four weight rows are decoded into), the runtime
kernels the network needs (``templates/runtime.c``) and ``legonet_infer``. It includes only <stdint.h>, <string.h> and
<math.h> and never allocates. Beside it: model.h, an example host driver (main.c, images on stdin,
logits on stdout) and a Cortex-M7 firmware for the emulated MPS2-AN500 board
(:mod:`legonet.export.c.firmware`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from torch import nn

from legonet.artifact import CompressedModel
from legonet.errors import OutputError
from legonet.export.c.firmware import FIRMWARE_FILES, firmware_files
from legonet.export.c.graph import ACTIVATIONS, Graph, Op, Post, chw
from legonet.export.c.memory import MemoryPlan, plan_memory
from legonet.export.c.network import Network, lower_network
from legonet.export.c.weights import FlashData, cname, float_literal
from legonet.io.atomic import atomic_path

_SCALAR_OPS = ("add", "sub", "rsub", "mul", "div", "rdiv")
_BINARY_OPS = ("add", "sub", "mul", "div")
# runtime sections each op kind needs besides "common"
_SECTIONS = {"conv": ("weights", "conv"), "linear": ("weights", "linear"), "maxpool": ("pool", "maxpool"),
             "avgpool": ("pool", "avgpool"), "concat": ("concat",)}


@dataclass(frozen=True)
class ExportInfo:
    """What an export holds, in bytes.

    Attributes:
        flash_bytes: every ``const`` data array (``lgd_*``: codebooks, packed indices, row gains,
            dense tensors, per-channel multipliers/offsets of folded BatchNorm and biases, input
            mean/std); excludes code and the small per-layer descriptors (``lgw_*``/``lgp_*``; see
            ``arm-none-eabi-size`` for those).
        codebook_bytes, index_bytes, scale_bytes, dense_bytes: the parts of ``flash_bytes``
            (``scale_bytes``: the row gains of clustered tensors).
        ram_bytes: every ``static`` buffer (``lgb_*``): the activation arena plus the decode scratch
            (the peak RAM of inference; the caller's image and logits buffers are extra: ``io_bytes``).
        activation_bytes: the arena; ``activation_sum_bytes``: every activation buffer added up,
            the arena it would take without reuse.
        scratch_bytes: four decoded weight rows (the conv and linear kernels take four outputs at a time).
        io_bytes: the uint8 image plus the float outputs the caller passes in.
        ops: operations in ``legonet_infer``; files: the files written.
    """

    flash_bytes: int
    codebook_bytes: int
    index_bytes: int
    dense_bytes: int
    ram_bytes: int
    activation_bytes: int
    scratch_bytes: int
    io_bytes: int
    files: tuple[str, ...]
    scale_bytes: int = 0
    activation_sum_bytes: int = 0
    ops: int = 0


# every file export_c writes into its folder
OUTPUT_FILES = ("model.h", "model.c", "main.c", *FIRMWARE_FILES)


def _kernels(sections: set[str]) -> str:
    src = (resources.files("legonet.export.c") / "templates" / "runtime.c").read_text()
    parts = re.findall(r"/\*@kernel (\w+)\*/\n(.*?)/\*@end\*/", src, flags=re.S)
    return "\n".join(body for kind, body in parts if kind in sections | {"common"})


class _Writer:
    """Turns the ops into C calls, collecting the descriptors they reference."""

    def __init__(self, net: Network, plan: MemoryPlan, flash: FlashData) -> None:
        self.g: Graph = net.graph
        self.plan, self.flash = plan, flash
        self.descriptors: list[str] = []

    def buf(self, v: int) -> str:
        off = self.plan.offsets[v]
        return f"lgb_arena + {off}" if off else "lgb_arena"

    def post(self, name: str, post: Post) -> str:
        """The initialiser of an ``lg_post``, its arrays emitted to flash."""
        mul = self.flash.floats(f"lgd_{name}_mul", post.mul) if post.mul is not None else "0"
        add = self.flash.floats(f"lgd_{name}_add", post.add) if post.add is not None else "0"
        lo, hi = (float_literal(post.lo), float_literal(post.hi))
        return f"{{{mul}, {add}, {ACTIVATIONS.index(post.act)}u, {lo}, {hi}}}"

    def call(self, i: int, op: Op) -> list[str]:
        g, a, name = self.g, op.attrs, f"{i}_{cname(op.name)}"
        out = self.buf(op.output)
        src = self.buf(op.inputs[0]) if op.inputs else ""
        n = g.numel(op.output)
        if op.kind == "conv":
            (c, h, w), (o, oh, ow) = chw(g.shapes[op.inputs[0]]), chw(g.shapes[op.output])
            fields = [c, h, w, o, oh, ow, *a["kernel"], *a["stride"], *a["dilation"], *a["pad"], a["groups"]]
            self.descriptors.append(f"static const lg_conv_params lgp_{name} = {{{', '.join(f'{v}u' for v in fields)}, "
                                    f"{self.post(name, a['post'])}}};")
            return [f"lg_conv2d({src}, {out}, &{self.flash.weight(a['weight'])}, &lgp_{name}, lgb_scratch);"]
        if op.kind == "linear":
            w = self.flash.weight(a["weight"])
            rows = n // g.shapes[op.output][-1]
            self.descriptors.append(f"static const lg_post lgp_{name} = {self.post(name, a['post'])};")
            return [f"lg_linear({src}, {out}, &{w}, {rows}u, &lgp_{name}, lgb_scratch);"]
        if op.kind in ("pointwise", "scalar", "binary"):
            self.descriptors.append(f"static const lg_post lgp_{name} = {self.post(name, a['post'])};")
            channels = g.shapes[op.output][1] if len(g.shapes[op.output]) > 1 else 1
            if op.kind == "pointwise":
                return [f"lg_pointwise({src}, {out}, {channels}u, {n // channels}u, &lgp_{name});"]
            if op.kind == "scalar":
                code = _SCALAR_OPS.index(a["op"])
                return [f"lg_scalar({src}, {out}, {n}u, {code}u, {float_literal(a['value'])}, &lgp_{name});"]
            full = [int(g.numel(v) == n) for v in op.inputs]
            return [f"lg_binary({src}, {self.buf(op.inputs[1])}, {out}, {channels}u, {n // channels}u, {full[0]}u, "
                    f"{full[1]}u, {_BINARY_OPS.index(a['op'])}u, &lgp_{name});"]
        if op.kind in ("maxpool", "avgpool"):
            (c, h, w), (_, oh, ow) = chw(g.shapes[op.inputs[0]]), chw(g.shapes[op.output])
            dil = a.get("dilation", (1, 1))
            fields = [c, h, w, oh, ow, *a["kernel"], *a["stride"], *a["pad"], *dil, int(a.get("count_include_pad", 0)),
                      a.get("divisor", 0)]
            values = ", ".join(f"{v}u" for v in fields)
            self.descriptors.append(f"static const lg_pool_params lgp_{name} = {{{values}}};")
            return [f"lg_{op.kind}({src}, {out}, &lgp_{name});"]
        if op.kind == "mean":
            c, h, w = chw(g.shapes[op.inputs[0]])
            return [f"lg_mean({src}, {out}, {c}u, {h * w}u);"]
        if op.kind == "pad":
            (c, h, w), (oc, oh, ow) = chw(g.shapes[op.inputs[0]]), chw(g.shapes[op.output])
            starts = [p[0] for p in a["pads"]]
            return [f"lg_pad({src}, {out}, {c}u, {h}u, {w}u, {oc}u, {oh}u, {ow}u, {starts[0]}u, {starts[1]}u, "
                    f"{starts[2]}u, {float_literal(a['value'])});"]
        if op.kind == "slice":
            (_, h, w), (oc, oh, ow) = chw(g.shapes[op.inputs[0]]), chw(g.shapes[op.output])
            return [f"lg_slice({src}, {out}, {h}u, {w}u, {oc}u, {oh}u, {ow}u, "
                    + ", ".join(f"{v}u" for v in (*a["start"], *a["step"])) + ");"]
        if op.kind == "concat":
            shape, d = g.shapes[op.output], a["dim"]
            outer, stride, lines, at = math.prod(shape[:d]), math.prod(shape[d:]), [], 0
            for v in op.inputs:
                chunk = math.prod(g.shapes[v][d:])
                lines.append(f"lg_copy({self.buf(v)}, {out} + {at}, {outer}u, {chunk}u, {stride}u);")
                at += chunk
            return lines
        if op.kind == "alias":
            return []
        raise AssertionError(op.kind)  # lowering emits only the kinds above


def _input_lines(net: Network, plan: MemoryPlan) -> list[str]:
    c, h, w = net.input_shape
    dst = f"(lgb_arena + {plan.offsets[0]})" if plan.offsets[0] else "lgb_arena"
    return [f"for (c = 0; c < {c}u; c++)",
            f"    for (i = 0; i < {h * w}u; i++)",
            f"        {dst}[c * {h * w}u + i] = ((float)image[i * {c}u + c] / 255.0f - lgd_mean[c]) / lgd_std[c];"]


def generate(cm: CompressedModel, arch_or_module: str | nn.Module, input_shape=None, *, mean=None, std=None
             ) -> tuple[dict[str, str], ExportInfo]:
    """The files' text and their :class:`ExportInfo` (see :func:`export_c` for the arguments)."""
    net = lower_network(cm, arch_or_module, input_shape, mean, std)
    plan = plan_memory(net.graph)
    flash = FlashData(cm)
    writer = _Writer(net, plan, flash)
    body: list[str] = []
    for i, op in enumerate(net.graph.ops):
        if op.kind == "input":
            body += _input_lines(net, plan)
            continue
        lines = writer.call(i, op)
        if lines:
            lines[0] += f"  /* {op.name} */"
        body += lines
    flash.floats("lgd_mean", net.mean)
    flash.floats("lgd_std", net.std)
    c, h, w = net.input_shape
    outputs = net.graph.numel(net.graph.output)
    scratch = max(1, flash.scratch_floats)
    arena = max(1, plan.arena_floats)
    sections = {s for op in net.graph.ops for s in _SECTIONS.get(op.kind, (op.kind,))} - {"input", "alias"}
    files = {"model.h": _header(net, outputs, sum(flash.sizes.values()), 4 * (arena + scratch), 4 * arena),
             "model.c": "\n".join([
                 f"/* Generated by legonet export-c from a .lego file: {net.label}. Portable C99, no malloc. */",
                 "#include <stdint.h>", "#include <string.h>", "#include <math.h>", '#include "model.h"', "",
                 _kernels(sections), "/* ---- weights and constants (const: flash) ---- */", *flash.lines, "",
                 "/* ---- per-layer settings (const: flash) ---- */", *writer.descriptors, "",
                 "/* ---- RAM: the activation arena and four decoded weight rows ---- */",
                 f"static float lgb_arena[{arena}];", f"static float lgb_scratch[{scratch}];", "",
                 "void legonet_infer(const uint8_t *image, float *logits)", "{", "    uint32_t c, i;",
                 *("    " + line for line in body),
                 f"    memcpy(logits, {writer.buf(net.graph.output)}, sizeof(float) * {outputs}u);", "}", ""]),
             "main.c": (resources.files("legonet.export.c") / "templates" / "main.c").read_text()}
    sizes = flash.sizes
    info = ExportInfo(flash_bytes=sum(sizes.values()), codebook_bytes=sizes["codebook"], index_bytes=sizes["index"],
                      dense_bytes=sizes["dense"], scale_bytes=sizes["gain"], ram_bytes=4 * (arena + scratch),
                      activation_bytes=4 * arena, scratch_bytes=4 * scratch, io_bytes=c * h * w + 4 * outputs,
                      activation_sum_bytes=4 * plan.activation_floats, files=(),
                      ops=sum(op.kind not in ("input", "alias") for op in net.graph.ops))
    files.update(firmware_files(info))
    return files, replace(info, files=tuple(files))


def _header(net: Network, outputs: int, flash: int, ram: int, arena: int) -> str:
    c, h, w = net.input_shape
    return f"""/* Generated by legonet export-c from a .lego file: {net.label}. */
#ifndef LEGONET_MODEL_H
#define LEGONET_MODEL_H
#include <stdint.h>

#define LEGONET_IN_C {c}
#define LEGONET_IN_H {h}
#define LEGONET_IN_W {w}
#define LEGONET_NUM_CLASSES {outputs}
/* Bytes of the const data arrays (flash), of all static buffers (RAM) and of the activation arena. */
#define LEGONET_FLASH_DATA_BYTES {flash}u
#define LEGONET_RAM_BYTES {ram}u
#define LEGONET_ARENA_BYTES {arena}u

/* image: LEGONET_IN_H x LEGONET_IN_W x LEGONET_IN_C uint8 (HWC), normalised as the network expects;
 * logits: LEGONET_NUM_CLASSES floats (the network's output, flattened). */
void legonet_infer(const uint8_t *image, float *logits);

#endif
"""


def export_c(cm: CompressedModel, arch_or_module: str | nn.Module, out_dir: str | os.PathLike, input_shape=None, *,
             mean=None, std=None) -> ExportInfo:
    """Write the C export of ``cm`` into ``out_dir`` (created if needed; each file written atomically).

    Args:
        cm: a compressed model (e.g. ``legonet.format.load(path)``), every kind legonet writes.
        arch_or_module: a zoo architecture name (or ``"module:callable"``) or an ``nn.Module``
            whose state dict ``cm`` fits; any CNN ``torch.fx`` can trace, within the supported ops.
        input_shape: ``(C, H, W)``; defaults to the zoo entry's, required for a module.
        mean, std: per-channel normalisation of the uint8 image, ``(x/255 - mean) / std``;
            default: the zoo entry's, the module's ``legonet_mean``/``legonet_std``, else 0 and 1.
    Returns:
        The sizes (:class:`ExportInfo`): flash data, arena and scratch RAM.
    Raises:
        ArchitectureError: naming the first fx node the runtime cannot run, or tensors that do not fit.
    """
    files, info = generate(cm, arch_or_module, input_shape, mean=mean, std=std)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror}") from None
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return info
