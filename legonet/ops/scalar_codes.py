"""Byte codes for the small per-tensor overheads: 8-bit log-coded row gains and int8 codebooks.

At 0.25-0.5 bit per weight a file's row gains (2 bytes per output channel as float16) and its
float16 codebooks are 10-12 % of its bytes (ResNet-50 at 128x: 52 + 34 KiB of 711 KiB), bytes the
index stream could use. Where a tensor's clustering error is large, storing them in 8 bits adds an
error that is negligible beside it (see :data:`COMPACT_MIN_DISTORTION`).

Pure functions on tensors, no model or file involved:

* row gains ``g`` ``(rows,)``: one byte each, bit 7 the sign, bits 0-6 a level: level 0 is exactly
  0, level ``l >= 1`` is ``exp(lo + step * (l - 1))`` (evaluated in float64, rounded to float32),
  with ``lo``/``step`` float32 per tensor spanning the tensor's own range of ``log |g|`` in 126 steps;
* codebooks ``(K, d)``: int8 values ``q`` times one float32 ``scale`` per codebook
  (``scale = max |c| / 127``), decoded as the float32 product ``q * scale``.

Encoding then decoding gives values that encode to the same bytes again (:func:`gain_levels`,
:func:`codebook_levels` check that exactly; the file writer relies on it).
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import torch

# Largest gain level; level 0 is reserved for an exact zero (a row of zeros has gain 0).
_GAIN_LEVELS = 127
_SIGN_BIT = 0x80

# The smallest estimated relative error (distortion) at which a tensor's gains and codebook are
# stored in 8 bits: 1/16, an SQNR of 12 dB. A log code over a range of log-gains R adds a relative
# gain error of (R / 252)^2 / 3 in energy: for R = 11 (ResNet-50's widest, where BatchNorm scales
# near zero and of both signs sit in the gains) that is 6.4e-4, about 1 % of an error of 1/16; an
# int8 codebook adds (max|c| / 254)^2 / 3 relative to its mean square, about 1e-4 for centroids
# of normalised rows. Below this error (more bits per weight) the tensor keeps float16.
COMPACT_MIN_DISTORTION = 1.0 / 16.0


def _f32(x: float) -> float:
    return float(np.float32(x))


def _decode_magnitudes(levels: np.ndarray, lo: float, step: float) -> np.ndarray:
    mags = np.exp(np.float64(lo) + np.float64(step) * (levels.astype(np.float64) - 1.0))
    return np.where(levels == 0, 0.0, mags).astype(np.float32)


def choose_gain_code(gains: torch.Tensor) -> tuple[float, float]:
    """``(lo, step)`` (float32 values) of the log code spanning ``gains``' nonzero magnitudes.

    Args:
        gains: ``(rows,)`` finite floats.
    """
    mags = gains.detach().double().abs().cpu().numpy()
    nz = mags[mags > 0]
    if nz.size == 0:
        return 0.0, 0.0
    lo, hi = float(np.log(nz.min())), float(np.log(nz.max()))
    step = _f32((hi - lo) / (_GAIN_LEVELS - 1)) if hi > lo else 0.0
    return _f32(lo), step


def encode_gains(gains: torch.Tensor, lo: float, step: float) -> torch.Tensor:
    """``(rows,)`` uint8 codes of ``gains`` under the log code ``(lo, step)`` (nearest level)."""
    g = gains.detach().double().cpu().numpy()
    mags = np.abs(g)
    with np.errstate(divide="ignore"):
        logs = np.log(np.where(mags > 0, mags, 1.0))
    levels = np.ones_like(mags) if step == 0 else np.rint((logs - lo) / step) + 1.0
    levels = np.clip(levels, 1, _GAIN_LEVELS).astype(np.uint8)
    levels[mags == 0] = 0
    codes = levels | np.where(np.signbit(g) & (mags > 0), _SIGN_BIT, 0).astype(np.uint8)
    return torch.from_numpy(codes.astype(np.uint8))


def decode_gains(codes: torch.Tensor, lo: float, step: float) -> torch.Tensor:
    """``(rows,)`` float32 gains of ``(rows,)`` uint8 ``codes`` under the log code ``(lo, step)``."""
    c = codes.cpu().numpy().astype(np.uint8)
    mags = _decode_magnitudes(c & _GAIN_LEVELS, lo, step)
    return torch.from_numpy(np.where(c & _SIGN_BIT, -mags, mags).astype(np.float32))


def gain_levels(gains: torch.Tensor, lo: float, step: float) -> torch.Tensor | None:
    """The codes of ``gains`` if they are exactly representable under ``(lo, step)``, else None."""
    codes = encode_gains(gains, lo, step)
    exact = torch.equal(decode_gains(codes, lo, step), gains.detach().float().cpu())
    return codes if exact else None


def valid_gain_code(lo: object, step: object) -> bool:
    """Whether ``(lo, step)`` can be a stored log code: finite float32 values, ``step >= 0``, and
    no level overflowing float32."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, step)):
        return False
    return step >= 0 and _f32(lo) == lo and _f32(step) == step and lo + step * (_GAIN_LEVELS - 1) < 88.0 \
        and lo > -104.0


_HEX32 = re.compile(r"[0-9a-f]{8}")


def float32_hex(v: float) -> str:
    """A float32 value as the 8 hex digits of its big-endian bit pattern (fixed width, exact)."""
    return struct.pack(">f", v).hex()


def float32_from_hex(text: object) -> float | None:
    """The float32 value of :func:`float32_hex`'s digits, or None for anything else."""
    if not (isinstance(text, str) and _HEX32.fullmatch(text)):
        return None
    return struct.unpack(">f", bytes.fromhex(text))[0]


def choose_codebook_scale(codebook: torch.Tensor) -> float:
    """The float32 scale of ``codebook``'s int8 code: ``max |c| / 127`` (1 for an all-zero codebook)."""
    m = float(codebook.detach().abs().max()) if codebook.numel() else 0.0
    return _f32(m / 127.0) if m > 0 else 1.0


def encode_codebook(codebook: torch.Tensor, scale: float) -> torch.Tensor:
    """``(K, d)`` int8 values of ``codebook`` on the grid ``scale * q`` (nearest, clipped to +-127)."""
    q = torch.round(codebook.detach().float().cpu() / np.float32(scale)).clamp(-127, 127)
    return q.to(torch.int8)


def decode_codebook(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``(K, d)`` float32 codebook of int8 values ``q``: the float32 products ``q * scale``."""
    return q.float() * torch.tensor(scale, dtype=torch.float32)


def codebook_levels(codebook: torch.Tensor, scale: float) -> torch.Tensor | None:
    """The int8 values of ``codebook`` if it is exactly ``scale`` times them, else None."""
    q = encode_codebook(codebook, scale)
    return q if torch.equal(decode_codebook(q, scale), codebook.detach().float().cpu()) else None


def valid_codebook_scale(scale: object) -> bool:
    """Whether ``scale`` can be a stored int8 codebook scale: a finite positive float32 value."""
    return (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
            and scale > 0 and _f32(scale) == scale)
