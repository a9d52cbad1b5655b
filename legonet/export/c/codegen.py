"""C99 code generation: ``export_c(cm, arch, out_dir)`` writes model.h, model.c and main.c.

model.c holds the codebook, the packed indices and the dense tensors as ``const`` arrays (flash on a
microcontroller), a few ``static`` float buffers (RAM: activation slots planned by
:mod:`legonet.export.c.graph` and one block-row decode scratch), the runtime kernels it needs
(``templates/runtime.c``) and ``legonet_infer``. It includes only <stdint.h>, <string.h>, <math.h>
and never allocates. The sizes reported are the byte sizes of those generated arrays.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.errors import ArchitectureError, LegoError
from legonet.export.c.graph import Graph, lower
from legonet.io.atomic import atomic_path
from legonet.nn.functional import pack_indices, prepare_codebook
from legonet.ops.bitpack import bits_for


@dataclass(frozen=True)
class ExportInfo:
    """What an export holds, in bytes of the generated arrays.

    Attributes:
        flash_bytes: every ``const`` data array (codebooks, packed indices, dense tensors, mean/std);
            excludes code and the small per-layer descriptors (see ``arm-none-eabi-size`` for those).
        codebook_bytes, index_bytes, dense_bytes, scale_bytes: the parts of ``flash_bytes``
            (``scale_bytes``: optional per-row gains of clustered tensors, as float32).
        ram_bytes: every ``static`` buffer: activation slots plus decode scratch (peak RAM of
            inference; the caller's image and logits buffers are extra: ``io_bytes``).
        activation_bytes, scratch_bytes: the parts of ``ram_bytes``.
        io_bytes: uint8 image plus float logits the caller passes in.
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


def _cname(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _floats(values: np.ndarray) -> str:
    vals = [f"{float(v):.9g}" for v in values.reshape(-1).astype(np.float32)]
    vals = [v + ("f" if any(ch in v for ch in ".e") else ".0f") for v in vals]
    return ",\n".join(", ".join(vals[i:i + 8]) for i in range(0, len(vals), 8))


def _bytes(values: np.ndarray) -> str:
    vals = [f"0x{int(v):02x}" for v in values.reshape(-1)]
    return ",\n".join(", ".join(vals[i:i + 16]) for i in range(0, len(vals), 16))


def _kernels(needed: set[str]) -> str:
    src = (resources.files("legonet.export.c") / "templates" / "runtime.c").read_text()
    parts = re.findall(r"/\*@kernel (\w+)\*/\n(.*?)/\*@end\*/", src, flags=re.S)
    return "\n".join(body for kind, body in parts if kind in needed | {"common"})


class _Emitter:
    def __init__(self, cm: CompressedModel) -> None:
        self.cm = cm
        self.lines: list[str] = []
        self.sizes = {"codebook": 0, "index": 0, "dense": 0, "scale": 0}
        self.done: set[str] = set()
        self.scratch = 1

    def array(self, cname: str, ctype: str, body: str, count: int, part: str, elem: int) -> None:
        self.lines.append(f"static const {ctype} {cname}[{count}] = {{\n{body}\n}};")
        self.sizes[part] += count * elem

    def dense(self, name: str) -> str:
        cname = "lgd_" + _cname(name)
        if name not in self.done:
            t = self.cm.tensors[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ArchitectureError(f"C export: tensor {name!r} must be a dense float tensor")
            self.array(cname, "float", _floats(t.float().numpy()), t.numel(), "dense", 4)
            self.done.add(name)
        return cname

    def weight(self, name: str) -> str:
        """A ``lg_weight`` descriptor for tensor ``name`` (clustered or dense); returns its C name."""
        wname = "lgw_" + _cname(name)
        t = self.cm.tensors[name]
        if isinstance(t, ClusteredTensor):
            scale = getattr(t, "scale", None)  # optional per-row gains (w = blocks * scale[row])
            book = self.cm.codebooks[t.codebook]
            cb = f"lgd_codebook{t.codebook}"
            if scale is None and t.dtype != torch.float32:
                # reconstruct() rounds to the tensor's dtype; rounding the centroids once is the same
                book = prepare_codebook(book, t.dtype, torch.float32)
                cb += "_" + str(t.dtype).removeprefix("torch.")
            if cb not in self.done:
                self.array(cb, "float", _floats(book.numpy()), book.numel(), "codebook", 4)
                self.done.add(cb)
            width = bits_for(book.shape[0])
            packed = pack_indices(t.indices, width).numpy()
            pname = "lgd_" + _cname(name)
            self.array(pname, "uint8_t", _bytes(packed), packed.size, "index", 1)
            sname = "0"
            if scale is not None:
                sname = pname + "_scale"
                self.array(sname, "float", _floats(scale.float().numpy()), scale.numel(), "scale", 4)
            tl = t.tiling
            br, bc = tl.block
            self.scratch = max(self.scratch, br * tl.grid[1] * bc)
            self.lines.append(f"static const lg_weight {wname} = {{0, {cb}, {pname}, {sname}, {tl.rows}u, {tl.cols}u, "
                              f"{br}u, {bc}u, {tl.grid[1]}u, {width}u}};")
        else:
            rows, cols = t.shape[0], t.numel() // t.shape[0]
            self.lines.append(f"static const lg_weight {wname} = {{{self.dense(name)}, 0, 0, 0, {rows}u, {cols}u, "
                              f"1u, 1u, {cols}u, 0u}};")
        return wname


def _forward(g: Graph, em: _Emitter) -> list[str]:
    def buf(v: int) -> str:
        return f"lgb_slot{g.slot_of[v]}"

    body = []
    for op in g.ops:
        c, h, w = g.shapes[op.src[0]] if op.src else g.shapes[op.dst]
        oc, oh, ow = g.shapes[op.dst]
        a = op.attrs
        if op.kind == "conv":
            wn = em.weight(op.layer + ".weight")
            bias = em.dense(op.layer + ".bias") if a["bias"] else "0"
            body.append(f"lg_conv2d({buf(op.src[0])}, {c}u, {h}u, {w}u, {buf(op.dst)}, {oh}u, {ow}u, &{wn}, {bias}, "
                        f"{a['k'][0]}u, {a['k'][1]}u, {a['s'][0]}u, {a['s'][1]}u, {a['p'][0]}u, {a['p'][1]}u, "
                        f"{a['groups']}u, lgb_scratch);  /* {op.layer} */")
        elif op.kind == "bn":
            p = [em.dense(f"{op.layer}.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
            body.append(f"lg_batchnorm({buf(op.dst)}, {oc}u, {oh * ow}u, {', '.join(p)}, {a['eps']!r}f);  /* {op.layer} */")
        elif op.kind == "relu":
            body.append(f"lg_relu({buf(op.dst)}, {oc * oh * ow}u);")
        elif op.kind == "add":
            body.append(f"lg_add({buf(op.dst)}, {buf(op.src[1])}, {oc * oh * ow}u);")
        elif op.kind == "shortcut_a":
            body.append(f"lg_shortcut_a({buf(op.src[0])}, {c}u, {h}u, {w}u, {buf(op.dst)}, {a['pad']}u);")
        elif op.kind == "maxpool":
            body.append(f"lg_maxpool({buf(op.src[0])}, {c}u, {h}u, {w}u, {buf(op.dst)}, {oh}u, {ow}u, "
                        f"{a['k']}u, {a['s']}u, {a['p']}u);")
        elif op.kind == "gap":
            body.append(f"lg_gap({buf(op.src[0])}, {c}u, {h * w}u, {buf(op.dst)});")
        elif op.kind == "linear":
            wn = em.weight(op.layer + ".weight")
            bias = em.dense(op.layer + ".bias") if a["bias"] else "0"
            body.append(f"lg_linear({buf(op.src[0])}, {buf(op.dst)}, &{wn}, {bias}, lgb_scratch);  /* {op.layer} */")
        else:  # pragma: no cover - lower() only emits the kinds above
            raise AssertionError(op.kind)
    return body


def generate(cm: CompressedModel, arch: str) -> tuple[dict[str, str], ExportInfo]:
    """The three files' text and their :class:`ExportInfo`, for zoo architecture ``arch``."""
    from legonet.nn.convert import check_fits
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    with torch.device("meta"):
        model = build(arch)
    check_fits(model, cm)
    g = lower(model, spec.input_size)
    em = _Emitter(cm)
    body = _forward(g, em)
    cin, hin, win = spec.input_size
    if len(spec.mean) != cin or len(spec.std) != cin:
        raise ArchitectureError(f"C export: {arch} normalisation has {len(spec.mean)} channels, input has {cin}")
    em.array("lgd_mean", "float", _floats(np.array(spec.mean)), cin, "dense", 4)
    em.array("lgd_std", "float", _floats(np.array(spec.std)), cin, "dense", 4)
    slots = [f"static float lgb_slot{i}[{n}];" for i, n in enumerate(g.slot_floats)]
    classes = g.shapes[g.output][0]
    act, scratch = 4 * sum(g.slot_floats), 4 * em.scratch
    info = ExportInfo(flash_bytes=sum(em.sizes.values()), codebook_bytes=em.sizes["codebook"],
                      index_bytes=em.sizes["index"], dense_bytes=em.sizes["dense"], ram_bytes=act + scratch,
                      activation_bytes=act, scratch_bytes=scratch, io_bytes=cin * hin * win + 4 * classes,
                      files=("model.h", "model.c", "main.c"), scale_bytes=em.sizes["scale"])
    header = f"""/* Generated by legonet export-c from a .lego file: {arch}, {len(cm.codebooks)} codebook(s). */
#ifndef LEGONET_MODEL_H
#define LEGONET_MODEL_H
#include <stdint.h>

#define LEGONET_IN_C {cin}
#define LEGONET_IN_H {hin}
#define LEGONET_IN_W {win}
#define LEGONET_NUM_CLASSES {classes}
/* Bytes of the const data arrays (flash) and of the static buffers (RAM) in model.c. */
#define LEGONET_FLASH_DATA_BYTES {info.flash_bytes}u
#define LEGONET_RAM_BYTES {info.ram_bytes}u

/* image: LEGONET_IN_H x LEGONET_IN_W x LEGONET_IN_C uint8 RGB (HWC); logits: LEGONET_NUM_CLASSES floats. */
void legonet_infer(const uint8_t *image, float *logits);

#endif
"""
    kinds = {op.kind for op in g.ops}
    inp = f"lgb_slot{g.slot_of[0]}"
    source = "\n".join([
        f"/* Generated by legonet export-c: {arch}. Portable C99, no malloc. */",
        "#include <stdint.h>", "#include <string.h>", "#include <math.h>", '#include "model.h"', "",
        _kernels(kinds), "/* ---- weights (const: flash) ---- */", *em.lines, "",
        "/* ---- buffers (RAM): activation slots and one block-row decode scratch ---- */", *slots,
        f"static float lgb_scratch[{em.scratch}];", "",
        "void legonet_infer(const uint8_t *image, float *logits)", "{",
        "    uint32_t c, i;",
        f"    for (c = 0; c < {cin}u; c++)",
        f"        for (i = 0; i < {hin * win}u; i++)",
        f"            {inp}[c * {hin * win}u + i] = ((float)image[i * {cin}u + c] / 255.0f - lgd_mean[c]) / lgd_std[c];",
        *("    " + line for line in body),
        f"    memcpy(logits, lgb_slot{g.slot_of[g.output]}, sizeof(float) * {classes}u);",
        "}", ""])
    main_c = (resources.files("legonet.export.c") / "templates" / "main.c").read_text()
    return {"model.h": header, "model.c": source, "main.c": main_c}, info


def export_c(cm: CompressedModel, arch: str, out_dir: str | os.PathLike) -> ExportInfo:
    """Write model.h, model.c and main.c for ``cm`` on zoo architecture ``arch`` into ``out_dir``
    (created if needed; each file written atomically). Returns the sizes."""
    files, info = generate(cm, arch)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LegoError(f"cannot create output folder {out}: {exc.strerror}") from None
    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return info
