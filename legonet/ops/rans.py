"""Entropy coding of centroid indices: static-model interleaved rANS, in numpy.

Clustering leaves the centroids unequally used (activation-weighted k-means and the layer fit's
reassignment more so: 5-40 % below the fixed width ``ceil(log2 K)`` on some of ResNet-50's
tensors), so an index stream coded by its own symbol frequencies is smaller than the bit-packed
one. The coder is specified here, not taken from a library, because its bytes are part of the .lego
format: they must decode identically in every legonet version and in a small C decoder.

Stream layout (all little-endian), for ``n`` symbols from an alphabet of ``K``:

* ``K`` bytes of frequency codes (:func:`frequency_codes`): 0 for a symbol that does not occur,
  else an 8-bit float ``c`` standing for the weight ``(16 + c % 16) << (c // 16)``;
* the initial states of the ``lanes(n)`` interleaved rANS coders, 4 bytes each;
* the renormalisation bytes, in the order the decoder reads them.

Decoding: the weights become integer frequencies summing to ``2**PRECISION`` (:func:`frequencies`,
exact integer arithmetic). Symbol ``i`` belongs to lane ``i % N``; the decoder takes the symbols in
order, and for each: ``slot = x & (M - 1)``, ``s`` the symbol whose cumulative range holds ``slot``,
``x = f[s] * (x >> PRECISION) + slot - cum[s]``, then while ``x < 2**23``, ``x = (x << 8) | next byte``.
A valid stream is consumed exactly and leaves every lane's state at ``2**23`` (the encoder's initial
state): a check on top of the file's CRC.

A stream holds at most :data:`MAX_SYMBOLS_PER_BYTE` symbols per byte of its own length: a symbol
that takes every slot costs no bits, so without this bound a few bytes could make a reader allocate
for any number of symbols. The writer bit-packs a stream that would code denser (only a tensor whose
blocks nearly all share one centroid comes near it).
"""

from __future__ import annotations

import math

import numpy as np

from legonet.ops.bitpack import bits_for, pack_bits

PRECISION = 14  # frequencies sum to 2**14
_M = 1 << PRECISION
_L = 1 << 23  # lower bound of a normalised state; states live in [2**23, 2**31)
MAX_SYMBOLS = 4096  # at most this many distinct symbols are entropy-coded (each needs a frequency >= 1)
# at most this many symbols per byte of a coded stream (0.002 bit per symbol): bounds what a reader
# allocates by the bytes it was given
MAX_SYMBOLS_PER_BYTE = 4096
_LANE_SYMBOLS = 4096  # symbols per lane before another lane is added (4 bytes of state each) ...
_MAX_LANES = 256  # ... up to this many: they let numpy decode a lane-step at a time

# the weight of every 8-bit frequency code (index 0, "absent", weighs nothing)
_CODE_WEIGHTS = np.array([0] + [(16 + c % 16) << (c // 16) for c in range(1, 256)], dtype=np.int64)
_LOG_WEIGHTS = np.log2(_CODE_WEIGHTS[1:].astype(np.float64))


def lanes(count: int) -> int:
    """The number of interleaved coders for a stream of ``count`` symbols (a function of the count
    alone, so it is not stored)."""
    return min(_MAX_LANES, max(1, count // _LANE_SYMBOLS))


def frequency_codes(counts: np.ndarray) -> np.ndarray:
    """8-bit codes of a symbol histogram: the largest count gets the largest weight, the others
    their nearest weight in log scale (at least the smallest), absent symbols 0.

    Args:
        counts: ``(K,)`` non-negative integers, at least one positive.
    Returns:
        ``(K,)`` uint8.
    """
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros(counts.shape, dtype=np.uint8)
    present = counts > 0
    if not present.any():
        raise ValueError("no symbol occurs")
    target = np.log2(counts[present] / counts.max()) + _LOG_WEIGHTS[-1]
    pos = np.clip(np.searchsorted(_LOG_WEIGHTS, target), 1, len(_LOG_WEIGHTS) - 1)
    nearer_low = (target - _LOG_WEIGHTS[pos - 1]) < (_LOG_WEIGHTS[pos] - target)
    out[present] = (pos - nearer_low + 1).astype(np.uint8)
    return out


def frequencies(codes: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to ``2**PRECISION`` from :func:`frequency_codes`' codes.

    Every present symbol gets ``1 + floor(w * (M - p) / sum(w))`` (``p`` symbols present, ``M`` the
    total), and what is left of ``M`` goes to the first symbol of largest weight.

    Raises:
        ValueError: no symbol present, or more than :data:`MAX_SYMBOLS`.
    """
    w = _CODE_WEIGHTS[np.asarray(codes, dtype=np.uint8)]
    p = int((w > 0).sum())
    if p == 0:
        raise ValueError("the frequency table has no symbol")
    if p > MAX_SYMBOLS:
        raise ValueError(f"the frequency table has {p} symbols (at most {MAX_SYMBOLS})")
    f = np.where(w > 0, 1 + (w * (_M - p)) // int(w.sum()), 0)
    f[int(np.argmax(w))] += _M - int(f.sum())
    return f


def estimated_nbytes(counts: np.ndarray, count: int) -> int:
    """Coded bytes of ``count`` symbols drawn with the proportions of the histogram ``counts`` (the
    order-0 entropy, the table and the lanes' states; no quantisation loss)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    bits = -float((p * np.log2(p)).sum()) * count
    return len(counts) + 4 * lanes(count) + math.ceil(bits / 8)


def encode(symbols: np.ndarray, codes: np.ndarray) -> bytes:
    """The coded stream (layout in the module docstring) of ``symbols`` under ``codes``.

    Args:
        symbols: ``(n,)`` integers in ``[0, K)``, each with a non-zero code; ``n >= 1``.
        codes: ``(K,)`` uint8 frequency codes (:func:`frequency_codes` of the symbols' histogram
            gives the smallest stream).
    """
    codes = np.asarray(codes, dtype=np.uint8)
    f = frequencies(codes)
    cum = np.concatenate(([0], np.cumsum(f)[:-1]))
    s = np.asarray(symbols, dtype=np.int64).reshape(-1)
    n = s.size
    if n == 0:
        raise ValueError("nothing to encode")
    if s.min() < 0 or s.max() >= len(codes) or (f[s] == 0).any():
        raise ValueError("a symbol is outside the frequency table")
    lane_count = lanes(n)
    steps = -(-n // lane_count)
    if lane_count < _VECTOR_LANES:
        x, stream = _encode_lanes_scalar(s, f, cum, lane_count)
        return codes.tobytes() + x.astype("<u4").tobytes() + stream.tobytes()
    x = np.full(lane_count, _L, dtype=np.int64)
    chunks = []
    for t in range(steps - 1, -1, -1):  # the decoder's order, reversed
        sym = s[t * lane_count : (t + 1) * lane_count][::-1]  # lanes in descending order
        r = sym.size
        fs, cs, xs = f[sym], cum[sym], x[:r][::-1]
        x_max = ((_L >> PRECISION) << 8) * fs
        out = (xs >= x_max).astype(np.int64) + ((xs >> 8) >= x_max)  # bytes emitted: 0, 1 or 2
        emitted = np.stack([xs & 0xFF, (xs >> 8) & 0xFF], axis=1)[np.arange(2) < out[:, None]]
        chunks.append(emitted.astype(np.uint8))
        xs = xs >> (8 * out)
        x[:r] = (((xs // fs) << PRECISION) + xs % fs + cs)[::-1]
    stream = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.uint8)
    return codes.tobytes() + x.astype("<u4").tobytes() + stream.tobytes()


# below this many lanes, array operations on a few elements per step cost more than Python's own
# integers (a 2,304-symbol stream: 18 ms with arrays, a few ms in scalars)
_VECTOR_LANES = 16


def _encode_lanes_scalar(s: np.ndarray, f: np.ndarray, cum: np.ndarray, lane_count: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode`'s final lane states and byte stream, one symbol at a time (same bytes)."""
    n = s.size
    x = [_L] * lane_count
    out = bytearray()
    unit = (_L >> PRECISION) << 8
    freq, start, syms = f.tolist(), cum.tolist(), s.tolist()
    for t in range(-(-n // lane_count) - 1, -1, -1):  # the decoder's order, reversed
        lo = t * lane_count
        for lane in range(min(lane_count, n - lo) - 1, -1, -1):  # lanes in descending order
            sym = syms[lo + lane]
            fs, xs = freq[sym], x[lane]
            x_max = unit * fs
            if xs >= x_max:  # emit one or two low bytes
                out.append(xs & 0xFF)
                xs >>= 8
                if xs >= x_max:
                    out.append(xs & 0xFF)
                    xs >>= 8
            x[lane] = ((xs // fs) << PRECISION) + xs % fs + start[sym]
    out.reverse()
    return np.array(x, dtype=np.int64), np.frombuffer(bytes(out), dtype=np.uint8)


def decode(data: bytes | memoryview | np.ndarray, num_symbols: int, count: int) -> np.ndarray:
    """Inverse of :func:`encode`: ``count`` symbols of an alphabet of ``num_symbols`` as int64.

    Raises:
        ValueError: the stream is too short, too long, or not a valid stream (a bad state, a
            frequency table without symbols, or final states that are not the encoder's start).
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8, copy=False)
    if count < 1:
        raise ValueError("nothing to decode")
    lane_count = lanes(count)
    head = num_symbols + 4 * lane_count
    if buf.size < head:
        raise ValueError(f"coded stream of {buf.size} bytes is shorter than its {head}-byte head")
    f = frequencies(buf[:num_symbols])
    cum = np.concatenate(([0], np.cumsum(f)[:-1]))
    symbol_of_slot = np.repeat(np.arange(num_symbols, dtype=np.int64), f)
    x = buf[num_symbols:head].view("<u4").astype(np.int64)
    if ((x < _L) | (x >= _L << 8)).any():
        raise ValueError("coded stream has an invalid initial state")
    stream = buf[head:].astype(np.int64)
    ptr = 0
    out = np.empty(count, dtype=np.int64)
    steps = -(-count // lane_count)
    for t in range(steps):
        r = min(lane_count, count - t * lane_count)
        xs = x[:r]
        slot = xs & (_M - 1)
        sym = symbol_of_slot[slot]
        out[t * lane_count : t * lane_count + r] = sym
        xs = f[sym] * (xs >> PRECISION) + slot - cum[sym]
        need = (xs < _L).astype(np.int64) + (xs < (_L >> 8))  # bytes to read: 0, 1 or 2
        total = int(need.sum())
        if ptr + total > stream.size:
            raise ValueError("coded stream is truncated")
        at = ptr + np.cumsum(need) - need
        b1 = stream[np.minimum(at, stream.size - 1)] if stream.size else np.zeros(r, np.int64)
        b2 = stream[np.minimum(at + 1, stream.size - 1)] if stream.size else np.zeros(r, np.int64)
        xs = np.where(need == 1, (xs << 8) | b1, xs)
        xs = np.where(need == 2, (xs << 16) | (b1 << 8) | b2, xs)
        x[:r] = xs
        ptr += total
    if ptr != stream.size:
        raise ValueError(f"coded stream has {stream.size - ptr} bytes more than its symbols use")
    if (x != _L).any():
        raise ValueError("coded stream does not end in the encoder's initial state (corrupt)")
    return out


def index_stream(indices: np.ndarray, k: int, entropy_coding: bool) -> tuple[bytes, bool]:
    """The bytes of one tensor's index stream, and whether they are entropy-coded.

    Bit-packed at ``ceil(log2 k)`` bits (:func:`legonet.ops.bitpack.pack_bits`), or, when
    ``entropy_coding`` and it is smaller (table and lanes' states included), coded by :func:`encode`
    with the indices' own histogram.

    Args:
        indices: ``(n,)`` integers in ``[0, k)``.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    fixed = pack_bits(idx, bits_for(k)).tobytes()
    if not entropy_coding or idx.size == 0:
        return fixed, False
    counts = np.bincount(idx, minlength=k)
    if int((counts > 0).sum()) > MAX_SYMBOLS:
        return fixed, False
    coded = encode(idx, frequency_codes(counts))
    if len(coded) < len(fixed) and idx.size <= MAX_SYMBOLS_PER_BYTE * len(coded):
        return coded, True
    return fixed, False
