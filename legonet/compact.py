"""Compact storage of a compressed model's row gains and codebooks (8 bits instead of 16).

:func:`store_compact` puts chosen tensors' row gains on an 8-bit log code and their codebooks on an
int8 grid (the pure codes are :mod:`legonet.ops.scalar_codes`); the model then holds exactly the
values its file will hold, and files with such tensors are written in format version 3. Steps that
change gains or codebooks afterwards (layer fit, refinement, BatchNorm folding) end with
:func:`recode_compact`, which puts the changed values back on their codes.

Target mode (:func:`legonet.target.compress_to_ratio`) stores a tensor compactly when the setting it
plans for it has an estimated relative error of at least
:data:`~legonet.ops.scalar_codes.COMPACT_MIN_DISTORTION`, and counts the bytes saved in its budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from legonet.artifact import ClusteredTensor, CompressedModel
from legonet.errors import ConfigError
from legonet.ops.scalar_codes import (
    COMPACT_MIN_DISTORTION,
    choose_codebook_scale,
    choose_gain_code,
    codebook_levels,
    decode_codebook,
    decode_gains,
    encode_codebook,
    encode_gains,
    gain_levels,
)

# SQNR (dB) at or below which :func:`compact_by_sqnr` stores a tensor compactly (12.04 dB).
COMPACT_MAX_SQNR_DB = -10.0 * math.log10(COMPACT_MIN_DISTORTION)
# Bytes to leave free per clustered tensor for a later recode: its codes are 3 fixed-width fields
# of 8 hex digits in the compressed metadata, whose new digits compress no worse than written out.
RECODE_RESERVE = 24


def _code_gains(ct: ClusteredTensor) -> None:
    lo, step = choose_gain_code(ct.scale)
    ct.scale = decode_gains(encode_gains(ct.scale, lo, step), lo, step).to(ct.scale.device)
    ct.gain_code = (lo, step)


def _code_codebook(cm: CompressedModel, i: int) -> None:
    cb = cm.codebooks[i]
    scale = choose_codebook_scale(cb)
    cm.codebooks[i] = decode_codebook(encode_codebook(cb, scale), scale).to(cb.device)
    cm.codebook_scales[i] = scale


def store_compact(cm: CompressedModel, names: Iterable[str]) -> list[str]:
    """Store the row gains of the clustered tensors ``names`` as 8-bit log codes, and as int8 every
    codebook whose tensors are all among ``names`` (in place).

    Returns:
        The names whose gains are now coded (tensors without row gains have none to code).
    Raises:
        ConfigError: naming a tensor that is not a clustered tensor of ``cm``.
    """
    chosen = list(dict.fromkeys(names))
    for n in chosen:
        if not isinstance(cm.tensors.get(n), ClusteredTensor):
            raise ConfigError(f"compact storage: {n!r} is not a clustered tensor of this model")
    done = []
    for n in chosen:
        ct = cm.tensors[n]
        if ct.scale is not None:
            _code_gains(ct)
            done.append(n)
    chosen_set = set(chosen)
    users: dict[int, list[str]] = {}
    for n, ct in cm.clustered.items():
        users.setdefault(ct.codebook, []).append(n)
    for i, who in users.items():
        if all(n in chosen_set for n in who):
            _code_codebook(cm, i)
    return done


def compact_by_sqnr(cm: CompressedModel, max_sqnr_db: float = COMPACT_MAX_SQNR_DB) -> list[str]:
    """:func:`store_compact` for every clustered tensor whose measured SQNR is at most ``max_sqnr_db``."""
    names = [n for n, ct in cm.clustered.items() if ct.sqnr_db is not None and ct.sqnr_db <= max_sqnr_db]
    return store_compact(cm, names)


def recode_compact(cm: CompressedModel) -> None:
    """Put every compactly stored gain vector and codebook of ``cm`` back on its code after its values
    changed (a new code is chosen for each that no longer fits its own; the others are untouched)."""
    for ct in cm.clustered.values():
        if ct.gain_code is not None:
            if ct.scale is None:
                ct.gain_code = None
            elif gain_levels(ct.scale, *ct.gain_code) is None:
                _code_gains(ct)
    for i, scale in list(cm.codebook_scales.items()):
        if codebook_levels(cm.codebooks[i], scale) is None:
            _code_codebook(cm, i)
