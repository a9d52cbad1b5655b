"""Weight quantizers of the transformer peers, as pure tensor functions, and their byte accounting.

Quantizers (each takes a ``(rows, cols)`` float weight, rows = output channels, and returns the
dequantized weight exactly as a reader of the stored codes would rebuild it, i.e. with scales,
zero-points and codebooks already rounded to float16):

* :func:`rtn_rows_symmetric`: signed integers, one scale per row (the int8 baseline).
* :func:`rtn_groups`: unsigned integers with one scale and one integer zero-point per group of
  ``group`` consecutive input columns of a row (the whole row when it is shorter), the min/max
  grouping of LLM weight quantization; as in GPTQ's quantizer the range is widened to contain 0, so
  0 is exact and the error is at most half a step.
* :func:`gptq_groups`: GPTQ (Frantar et al. 2022): the same grid, but columns are quantized one at
  a time and the error of each is spread over the not-yet-quantized columns through the inverse
  Hessian of the layer's calibration inputs (Cholesky form, lazy block updates, optional act-order
  with groups fixed beforehand so that no column permutation needs storing).
* :func:`kmeans_scalar`: one scalar codebook of K entries per tensor (Lloyd, linear initialisation).

Byte accounting (:func:`file_bytes`), the same for every peer, "file bytes, everything counted":

1. every quantized tensor costs its codes bit-packed per tensor (``ceil(numel * bits / 8)``), plus
   its float parameters (scales, float zero-points, codebook entries) at 2 bytes each (float16),
   plus its integer zero-points bit-packed at the code width;
2. every tensor left unquantized costs 2 bytes per element (float16) if floating, else its own size;
3. one fixed header of :data:`HEADER_BYTES` per file;
4. a tensor shared by several modules (a tied embedding / output head) is counted once.

The original size is every floating tensor at 4 bytes per element (others at their own size), each
shared tensor once: the same baseline as legonet's ratio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

# A real file also frames its tensors (names, shapes, offsets); every peer gets this flat allowance
# for it, which is below what a container with one entry per tensor costs, so it favours the peers.
HEADER_BYTES = 256


@dataclass(frozen=True)
class Stored:
    """How one quantized tensor is stored: ``numel`` codes of ``code_bits`` bits plus its parameters."""

    numel: int
    code_bits: int
    fp16_values: int = 0  # scales, float zero-points, codebook entries
    int_values: int = 0  # integer zero-points, packed at int_bits
    int_bits: int = 0

    @property
    def nbytes(self) -> int:
        return (math.ceil(self.numel * self.code_bits / 8) + 2 * self.fp16_values
                + math.ceil(self.int_values * self.int_bits / 8))


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state tensors, each shared tensor once under its first name (tied weights)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def original_bytes(model: nn.Module) -> int:
    """Floating tensors at 4 bytes per element, others at their own size, shared tensors once."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for t in unique_tensors(model).values())


def file_bytes(model: nn.Module, stored: Mapping[str, Stored]) -> int:
    """Bytes of the model with the tensors named in ``stored`` quantized (see the module rules)."""
    tensors = unique_tensors(model)
    unknown = set(stored) - set(tensors)
    if unknown:
        raise KeyError(f"quantized tensors not in the model (or tied duplicates): {sorted(unknown)}")
    kept = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
               for name, t in tensors.items() if name not in stored)
    return HEADER_BYTES + kept + sum(s.nbytes for s in stored.values())


def quantized_names(model: nn.Module) -> list[str]:
    """The tensors every peer quantizes: floating, 2-D (Linear weights and embedding tables), each once."""
    return [n for n, t in unique_tensors(model).items() if t.is_floating_point() and t.ndim == 2]


# -- scalar grids ------------------------------------------------------------------------------------------
def fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 values ``>= x`` (as float32): a stored step never shrinks the range it covers."""
    h = x.half()
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    return h.float()


def rtn_rows_symmetric(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` times one float16 scale per row.

    Returns:
        the ``(rows, cols)`` dequantized weight and the ``(rows,)`` scales.
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    scale = fp16_at_least(w.abs().amax(1) / qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return torch.round(w / scale[:, None]).clamp_(-qmax, qmax) * scale[:, None], scale


def minmax_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid of each row of ``x`` (``(rows, n)``): float16 ``scale`` and integer ``zero``, ``(rows,)``.

    The range ``[min(x_min, 0), max(x_max, 0)]`` is split into ``2^bits - 1`` steps; value
    ``(q - zero) * scale`` for codes ``q`` in ``[0, 2^bits - 1]``.
    """
    maxq = 2**bits - 1
    lo = x.amin(1).clamp(max=0.0)
    hi = x.amax(1).clamp(min=0.0)
    scale = fp16_at_least((hi - lo) / maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, maxq)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``x`` to the grid ``(q - zero) * scale``; scale and zero broadcast against ``x``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def group_width(w: torch.Tensor, group: int) -> int:
    """Columns per group of ``w`` (``(rows, cols)``): ``group``, or the whole row when a row is shorter."""
    width = min(group, w.shape[1]) if w.ndim == 2 else 0
    if width == 0 or w.shape[1] % width:
        raise ValueError(f"weight of shape {tuple(w.shape)}: columns must be a multiple of group size {group}")
    return width


def rtn_groups(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest on the min/max grid of every group of ``group`` columns of a row.

    Args:
        w: ``(rows, cols)``, ``cols % group == 0``.
    Returns:
        ``(rows, cols)`` float32 dequantized weight.
    """
    group = group_width(w, group)
    x = w.float().reshape(-1, group)  # (rows * cols / group, group): consecutive columns of one row
    scale, zero = minmax_grid(x, bits)
    return fake_quant(x, scale[:, None], zero[:, None], bits).reshape(w.shape)


def group_cost(w: torch.Tensor, bits: int, group: int) -> Stored:
    """Storage of a grouped asymmetric tensor: codes, a float16 scale and a ``bits``-bit zero per group."""
    groups = w.numel() // group_width(w, group)
    return Stored(w.numel(), bits, fp16_values=groups, int_values=groups, int_bits=bits)


# -- GPTQ -------------------------------------------------------------------------------------------------
def hessian_update(h: torch.Tensor, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of ``2 x x^T`` over input rows: ``h`` ``(cols, cols)`` float64, ``x`` ``(..., cols)``."""
    x = x.reshape(-1, x.shape[-1]).double()
    n = x.shape[0]
    h = h * (count / (count + n)) + (2.0 / (count + n)) * (x.T @ x)
    return h, count + n


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``."""
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_groups(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, *, block: int = 128,
                damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """GPTQ onto the same grid as :func:`rtn_groups` (a scale and integer zero per ``group`` columns).

    Args:
        w: ``(rows, cols)`` weight of a layer ``y = x @ w.T``.
        h: ``(cols, cols)`` Hessian of the layer's squared output error, ``2 E[x x^T]`` over calibration inputs.
        block: columns updated together before the lazy update of the rest (a multiple of ``group``).
        damp: added to the diagonal, as a fraction of its mean.
        act_order: visit columns by decreasing ``diag(H)``; the groups' grids are then fixed from the
            original weight first, so the stored layout stays that of :func:`rtn_groups`.
    Returns:
        ``(rows, cols)`` float32 dequantized weight.
    """
    group = group_width(w, group)
    block = max(block // group, 1) * group
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs that never fire: any value is exact, quantize them as zeros
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    static = None
    if act_order:
        static = minmax_grid(w.reshape(-1, group), bits)  # per (row, group), original column order
        static = tuple(t.reshape(w.shape[0], -1).double() for t in static)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    q = torch.zeros_like(w)
    scale = zero = None
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        wb, err = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop])
        hb = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if static is not None:
                g = int(perm[col]) // group
                scale, zero = static[0][:, g], static[1][:, g]
            elif col % group == 0:  # the grid of a group is set from its columns as updated so far
                scale, zero = (t.double() for t in minmax_grid(wb[:, i:i + group].float(), bits))
            q[:, col] = fake_quant(wb[:, i], scale, zero, bits)
            err[:, i] = (wb[:, i] - q[:, col]) / hb[i, i]
            wb[:, i:] -= err[:, i:i + 1] * hb[i, i:][None, :]
        w[:, stop:] -= err @ hinv[start:stop, stop:]
    return q[:, torch.argsort(perm)].float()


# -- scalar k-means ---------------------------------------------------------------------------------------
def kmeans_scalar(w: torch.Tensor, k: int, iters: int = 50) -> torch.Tensor:
    """Every weight replaced by the nearest of ``k`` float16 centroids fitted to the whole tensor."""
    from benchmarks.peers import kmeans_1d_linear  # the CNN peers' Deep Compression weight sharing

    flat = w.reshape(-1).float()
    centroids, _ = kmeans_1d_linear(flat, min(k, flat.numel()), iters)
    centroids = torch.unique(centroids.half().float())  # sorted; stored as float16
    labels = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
    return centroids[labels].reshape(w.shape)
