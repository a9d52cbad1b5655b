"""The compressed model's tensors as C ``const`` arrays, each in the smallest exact encoding.

A clustered tensor stays a codebook plus bit-packed indices (``ceil(log2 K)`` bits per block, the
.lego file's layout; entropy-coded files are re-packed, since the kernels need random access) and
optional per-row gains. Every value the C runtime decodes equals ``CompressedModel.reconstruct``:

* codebooks: int8 times a float32 scale where the file stores them so
  (``CompressedModel.codebook_scales``), else float16 bits where every centroid is a float16 value,
  else float32;
* row gains: 8-bit log codes become one byte per row (sign and an index into a table of the
  distinct magnitudes used), float16 gains stay float16, others float32; whichever is smallest;
* kept (dense) weights: float16 or bfloat16 bits when they are stored so, else float32.

The decode multiplies a centroid by its row's gain in float32 and then, for a tensor of another
dtype (a float16 model), rounds to that dtype, as ``reconstruct`` does.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.nn.functional import pack_indices, prepare_codebook
from legonet.ops.bitpack import bits_for
from legonet.ops.scalar_codes import codebook_levels

# element formats of the runtime (templates/runtime.c)
F32, F16, BF16, I8, LOG8 = 0, 1, 2, 3, 4
_ROUND = {torch.float16: 1, torch.bfloat16: 2}
# rows the convolution and linear kernels decode at once (templates/runtime.c): the scratch holds them
ROWS_DECODED = 4
_PER_LINE = 12


def cname(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def float_literal(v: float) -> str:
    if not np.isfinite(v):
        return "NAN" if np.isnan(v) else "INFINITY" if v > 0 else "-INFINITY"
    s = f"{float(np.float32(v)):.9g}"
    return s + ("f" if any(ch in s for ch in ".e") else ".0f")


def _lines(items: list[str]) -> str:
    return ",\n".join(", ".join(items[i:i + _PER_LINE]) for i in range(0, len(items), _PER_LINE))


def _exact(values: torch.Tensor, dtype: torch.dtype) -> bool:
    v = values.float()
    return bool(torch.isfinite(v).all()) and torch.equal(v.to(dtype).float(), v)


def _bits16(values: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return values.float().to(dtype).contiguous().view(torch.int16).numpy().astype(np.uint16)


class FlashData:
    """Collects the ``const`` arrays (flash) and weight descriptors of one export.

    ``sizes`` counts the bytes of the data arrays by part (codebook, index, gain, dense);
    ``scratch_floats`` is the RAM the runtime decodes weight rows into: :data:`ROWS_DECODED` of the longest.
    """

    def __init__(self, cm: CompressedModel) -> None:
        self.cm = cm
        self.lines: list[str] = []
        self.sizes = {"codebook": 0, "index": 0, "gain": 0, "dense": 0}
        self.scratch_floats = 0
        self._books: dict[str, tuple[str, int, float]] = {}

    # -- raw arrays ---------------------------------------------------------------------------------
    def _array(self, name: str, ctype: str, items: list[str], elem: int, part: str) -> str:
        self.lines.append(f"static const {ctype} {name}[{len(items)}] = {{\n{_lines(items)}\n}};")
        self.sizes[part] += len(items) * elem
        return name

    def floats(self, name: str, values, part: str = "dense") -> str:
        return self._array(name, "float", [float_literal(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)],
                           4, part)

    def _halves(self, name: str, bits: np.ndarray, part: str) -> str:
        return self._array(name, "uint16_t", [f"0x{int(b):04x}" for b in bits.reshape(-1)], 2, part)

    def _bytes(self, name: str, data: np.ndarray, part: str, ctype: str = "uint8_t") -> str:
        fmt = (lambda b: f"{int(b)}") if ctype == "int8_t" else (lambda b: f"0x{int(b):02x}")
        return self._array(name, ctype, [fmt(b) for b in data.reshape(-1)], 1, part)

    def values(self, name: str, t: torch.Tensor, part: str, int8_scale: float | None = None) -> tuple[str, int, float]:
        """``t`` in its smallest exact format: ``(array name, format, int8 scale or 0)``."""
        if int8_scale is not None and (q := codebook_levels(t, int8_scale)) is not None:
            return self._bytes(name, q.numpy(), part, "int8_t"), I8, int8_scale
        for fmt, dtype in ((F16, torch.float16), (BF16, torch.bfloat16)):
            if _exact(t, dtype):
                return self._halves(name, _bits16(t, dtype), part), fmt, 0.0
        return self.floats(name, t.double().numpy(), part), F32, 0.0

    # -- tensors ------------------------------------------------------------------------------------
    def _codebook(self, ct: ClusteredTensor) -> tuple[str, int, float]:
        book = self.cm.codebooks[ct.codebook]
        key = f"lgd_codebook{ct.codebook}"
        if ct.scale is None and ct.dtype not in (torch.float32, torch.float64):
            # reconstruct() rounds to the tensor's dtype; rounding the centroids once is the same
            book = prepare_codebook(book, ct.dtype, torch.float32)
            key += "_" + str(ct.dtype).removeprefix("torch.")
        if key not in self._books:
            self._books[key] = self.values(key, book, "codebook", self.cm.codebook_scales.get(ct.codebook))
        return self._books[key]

    def _gains(self, base: str, ct: ClusteredTensor) -> tuple[str, str, int]:
        """``(gain array, magnitude table or "0", format)`` of a tensor's row gains."""
        g = ct.scale.detach().float().cpu()
        options = []
        if ct.gain_code is not None:
            table, index = np.unique(g.abs().numpy(), return_inverse=True)
            if len(table) <= 128:
                codes = index.astype(np.uint8) | np.where(np.signbit(g.numpy()), 0x80, 0).astype(np.uint8)
                options.append((len(g) + 4 * len(table), LOG8, codes, table))
        if _exact(g, torch.float16):
            options.append((2 * len(g), F16, None, None))
        options.append((4 * len(g), F32, None, None))
        _, fmt, codes, table = min(options, key=lambda o: o[0])
        if fmt == LOG8:
            return self._bytes(base + "_gains", codes, "gain"), self.floats(base + "_gain_levels", table, "gain"), LOG8
        if fmt == F16:
            return self._halves(base + "_gains", _bits16(g, torch.float16), "gain"), "0", F16
        return self.floats(base + "_gains", g.double().numpy(), "gain"), "0", F32

    def _clustered(self, base: str, t: ClusteredTensor) -> list:
        book, fmt, book_scale = self._codebook(t)
        width = bits_for(self.cm.codebooks[t.codebook].shape[0])
        packed = pack_indices(t.indices, width).numpy()
        # the runtime reads 1, 2, 4 or 8 bytes from an index's first byte (templates/runtime.c)
        span = 1 if width == 8 else 2 if width == 16 else 4 if width <= 25 else 8
        need = ((t.tiling.num_blocks - 1) * width >> 3) + span
        packed = np.concatenate([packed, np.zeros(max(0, need - packed.size), np.uint8)])
        idx = self._bytes(base, packed, "index")
        gains, table, gain_fmt = ("0", "0", F32) if t.scale is None else self._gains(base, t)
        round_to = _ROUND.get(t.dtype, 0) if t.scale is not None else 0
        tl = t.tiling
        self.scratch_floats = max(self.scratch_floats, ROWS_DECODED * tl.cols)
        return [book, idx, gains, table, float_literal(book_scale), f"{tl.rows}u", f"{tl.cols}u",
                f"{tl.block[0]}u", f"{tl.block[1]}u", f"{tl.grid[1]}u", f"{width}u", f"{fmt}u", f"{gain_fmt}u",
                f"{round_to}u"]

    def _dense(self, base: str, t: torch.Tensor) -> list:
        dense = t.detach().cpu()
        rows, cols = dense.shape[0], dense.numel() // dense.shape[0]
        if dense.dtype in (torch.float16, torch.bfloat16):
            book = self._halves(base, _bits16(dense, dense.dtype), "dense")
            fmt = F16 if dense.dtype == torch.float16 else BF16
            self.scratch_floats = max(self.scratch_floats, ROWS_DECODED * cols)  # float32 rows are read in place
        else:
            book, fmt = self.floats(base, dense.double().numpy(), "dense"), F32
        return [book, "0", "0", "0", "0.0f", f"{rows}u", f"{cols}u", "1u", f"{cols}u", "1u", "0u", f"{fmt}u",
                f"{F32}u", "0u"]

    def weight(self, name: str) -> str:
        """The ``lg_weight`` descriptor of tensor ``name`` (emitted once); returns its C name."""
        desc = "lgw_" + cname(name)
        if desc not in self._books:
            t, base = self.cm.tensors[name], "lgd_" + cname(name)
            fields = self._clustered(base, t) if isinstance(t, ClusteredTensor) else self._dense(base, t)
            self.lines.append(f"static const lg_weight {desc} = {{{', '.join(fields)}}};")
            self._books[desc] = (desc, 0, 0.0)
        return desc
