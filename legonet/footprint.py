"""Memory of a model's weights under several storage schemes, from the architecture alone.

Every figure is arithmetic on the tensor shapes of the architecture (built on the meta device, so
no weights are needed or allocated). The conventions, stated once:

* the weights are every floating-point tensor of the state dict (parameters and BatchNorm running
  statistics; integer counters are left out);
* "quantizable" tensors are those legonet clusters: floating-point with >= 2 dims; every other
  tensor (biases, BatchNorm) stays fp32 in the int8/int4/palettized/legonet schemes;
* ``fp32``/``fp16``: every weight at 4/2 bytes;
* ``int8``/``int4``: symmetric per-output-channel (per row) quantization: ``ceil(numel*bits/8)``
  bytes per tensor plus one fp32 scale per row;
* ``palettized nbit`` (coremltools-style per-tensor LUT): ``2**n`` fp32 LUT entries plus
  ``ceil(numel*n/8)`` bytes of indices per tensor;
* ``legonet``: exactly the payload of a .lego file (:mod:`legonet.format.lego_file`): the codebook(s)
  ``K x b_r*b_c`` in the codebook dtype, each tensor's ``ceil(num_blocks*ceil(log2 K)/8)`` index
  bytes, and the other tensors at fp32. The file's JSON header (a few KB) is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from legonet.config import LegoConfig
from legonet.errors import ArchitectureError, LegoError
from legonet.io.atomic import atomic_path
from legonet.ops.bitpack import bits_for, packed_nbytes
from legonet.ops.tiling import make_tiling


@dataclass(frozen=True)
class Device:
    """A memory budget: ``kind`` is ``flash``, ``sram`` or ``sdram``."""

    name: str
    kind: str
    nbytes: int


KIB, MIB = 1024, 1024 * 1024
STM32F7 = (
    Device("STM32F746 SRAM (320 KB)", "sram", 320 * KIB),
    Device("STM32F767/769 SRAM (512 KB)", "sram", 512 * KIB),
    Device("STM32F746 flash (1 MB)", "flash", 1 * MIB),
    Device("STM32F767/769 flash (2 MB)", "flash", 2 * MIB),
    Device("32F746G-DISCO SDRAM (8 MB)", "sdram", 8 * MIB),
    Device("32F769I-DISCO SDRAM (16 MB)", "sdram", 16 * MIB),
)


@dataclass(frozen=True)
class Entry:
    """One storage scheme: total bytes of the weights, and average bits per weight."""

    scheme: str
    nbytes: int
    bits_per_weight: float

    def fits(self, device: Device) -> bool:
        return self.nbytes <= device.nbytes


def weight_shapes(arch_or_module: str | nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the floating-point tensors of a zoo architecture or a module (no weights
    are allocated when the architecture is built from its name)."""
    from legonet.zoo import skeleton

    model = skeleton(arch_or_module)
    return {k: tuple(t.shape) for k, t in model.state_dict().items() if t.is_floating_point()}


def _split(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], int]:
    """Quantizable (>= 2-D, non-empty) tensors, and the element count of the rest."""
    quant = {k: s for k, s in shapes.items() if len(s) >= 2 and math.prod(s) > 0}
    rest = sum(math.prod(s) for k, s in shapes.items() if k not in quant)
    return quant, rest


def dense_bytes(shapes: dict[str, tuple[int, ...]], bytes_per_weight: int) -> int:
    return bytes_per_weight * sum(math.prod(s) for s in shapes.values())


def int_bytes(shapes: dict[str, tuple[int, ...]], bits: int) -> int:
    """Per-row symmetric ``bits``-bit weights with one fp32 scale per row; the rest fp32."""
    quant, rest = _split(shapes)
    return sum(packed_nbytes(math.prod(s), bits) + 4 * s[0] for s in quant.values()) + 4 * rest


def palettized_bytes(shapes: dict[str, tuple[int, ...]], bits: int) -> int:
    """Per-tensor LUT of ``2**bits`` fp32 entries plus ``bits``-bit indices; the rest fp32."""
    quant, rest = _split(shapes)
    return sum(4 * 2**bits + packed_nbytes(math.prod(s), bits) for s in quant.values()) + 4 * rest


def legonet_bytes(shapes: dict[str, tuple[int, ...]], config: LegoConfig) -> int:
    """Payload of the .lego file ``compress(model, config)`` would write (codebooks + indices + dense).

    Applies ``config.include``/``exclude`` like :func:`legonet.compress.select_tensors`.
    """
    import fnmatch

    quant, _ = _split(shapes)
    chosen = [k for k in quant if any(fnmatch.fnmatchcase(k, p) for p in config.include)
              and not any(fnmatch.fnmatchcase(k, p) for p in config.exclude)]
    if not chosen:
        raise LegoError("no tensor to cluster in this architecture with these include/exclude patterns")
    k = config.clusters
    width = bits_for(k)
    cb_elem = 4 if config.codebook_dtype == "float32" else 2
    n_books = 1 if config.scope == "model" else len(chosen)
    books = n_books * k * config.block[0] * config.block[1] * cb_elem
    index = sum(packed_nbytes(make_tiling(shapes[n], config.block).num_blocks, width) for n in chosen)
    rest = sum(math.prod(s) for n, s in shapes.items() if n not in set(chosen))
    # per-row gains (a config option added after format version 1's first release): fp16 per row
    scales = 2 * sum(shapes[n][0] for n in chosen) if getattr(config, "scales", "none") == "row" else 0
    return books + index + scales + 4 * rest


def footprint(arch_or_module: str | nn.Module, configs: list[LegoConfig] | None = None,
              palette_bits: tuple[int, ...] = (4,)) -> list[Entry]:
    """Weight memory of ``arch_or_module`` for fp32, fp16, int8, int4, palettized and legonet settings."""
    shapes = weight_shapes(arch_or_module)
    n = sum(math.prod(s) for s in shapes.values())
    if n == 0:
        raise ArchitectureError("the architecture has no floating-point weights")
    rows = [("fp32", dense_bytes(shapes, 4)), ("fp16", dense_bytes(shapes, 2)),
            ("int8 (per-channel)", int_bytes(shapes, 8)), ("int4 (per-channel)", int_bytes(shapes, 4))]
    rows += [(f"palettized {b}-bit LUT", palettized_bytes(shapes, b)) for b in palette_bits]
    for cfg in configs or [LegoConfig()]:
        br, bc = cfg.block
        label = f"legonet {br}x{bc} K={cfg.clusters}" + ("" if cfg.scope == "model" else " per-layer")
        rows.append((label, legonet_bytes(shapes, cfg)))
    return [Entry(name, b, 8 * b / n) for name, b in rows]


def render_table(arch: str, entries: list[Entry], devices: tuple[Device, ...] = STM32F7) -> str:
    """Markdown table: bytes, bits per weight, ratio to fp32 and which budgets each scheme fits."""
    fp32 = entries[0].nbytes
    head = "| scheme | bytes | MiB | bits/weight | vs fp32 | " + " | ".join(d.name for d in devices) + " |"
    lines = [f"**{arch}**", "", head, "|" + "---|" * (5 + len(devices))]
    for e in entries:
        fits = " | ".join("yes" if e.fits(d) else "no" for d in devices)
        lines.append(f"| {e.scheme} | {e.nbytes:,} | {e.nbytes / MIB:.3f} | {e.bits_per_weight:.3f} | "
                     f"{fp32 / e.nbytes:.1f}x | {fits} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on a file-only backend; :class:`LegoError` saying how to install it if absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LegoError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def plot(arch: str, entries: list[Entry], path, devices: tuple[Device, ...] = STM32F7) -> None:
    """Bar chart of the schemes (log scale) with the devices' memories as lines, like the paper's Figure 2."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [e.scheme for e in entries]
    vals = [e.nbytes / MIB for e in entries]
    bars = ax.bar(range(len(vals)), vals, color=["#2a7" if n.startswith("legonet") else "#888" for n in names])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.08, f"{v:.2f}", ha="center", fontsize=8)
    styles = {"sram": ("tab:red", ":"), "flash": ("tab:blue", "--"), "sdram": ("tab:purple", "-.")}
    for d in devices:
        color, ls = styles[d.kind]
        ax.axhline(d.nbytes / MIB, color=color, ls=ls, lw=1, label=d.name)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    ax.set_yscale("log")
    ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("weight memory (MiB, log scale)")
    ax.set_title(f"{arch}: weight memory vs STM32F7 memories")
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise LegoError(f"cannot write a plot as .{fmt}; use .png, .svg or .pdf")
    try:
        with atomic_path(path) as tmp:  # never a half-written image
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
