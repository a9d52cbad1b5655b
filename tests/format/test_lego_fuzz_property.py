"""Property: a mutated, truncated or extended .lego file loads to the identical model or raises
FormatError; never another exception, never a hang (hypothesis deadline).

The long-running fuzz job is ``benchmarks/fuzz_loader.py``; this is its fast, in-suite sibling.
"""

from __future__ import annotations

import functools
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lego_craft import join, split, tiny_model_bytes

from legonet.errors import FormatError
from legonet.format import deserialize

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def seeds() -> tuple[bytes, ...]:
    return (tiny_model_bytes("model", "float32", 3), tiny_model_bytes("layer", "float16", 2),
            tiny_model_bytes(compact=True), tiny_model_bytes(entropy=True))


def _as_bytes(sd: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + str(v.dtype).encode()
            + str(tuple(v.shape)).encode() for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def expected(i: int) -> dict[str, bytes]:
    return _as_bytes(deserialize(seeds()[i]).to_state_dict())


@st.composite
def mutated(draw) -> tuple[int, bytes]:
    i = draw(st.integers(0, len(seeds()) - 1))
    data = bytearray(seeds()[i])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, ord("9"), ord("["), ord('"'), ord("-")]))
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "header" and len(data) >= 8:  # the 8-byte header length, a favourite of attackers
            data[0:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return i, bytes(data)


def _load_or_format_error(data: bytes, verify: bool):
    try:
        cm = deserialize(data, source="fuzz.lego", verify=verify)
    except FormatError as exc:
        assert str(exc).startswith("fuzz.lego: ") and "\n" not in str(exc)
        return None
    return cm.to_state_dict()  # decoding what was accepted must not fail either


@FUZZ
@given(mutated())
def test_byte_mutations_load_identically_or_raise_format_error(case):
    i, data = case
    sd = _load_or_format_error(data, verify=True)
    if sd is not None:  # checksums on: anything accepted is exactly the original model
        assert _as_bytes(sd) == expected(i)


@FUZZ
@given(mutated())
def test_byte_mutations_without_checksums_still_never_crash(case):
    _load_or_format_error(case[1], verify=False)


_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.sampled_from(["", "inf", "-inf", "F32", "F16", "BOOL", "U8", "I64", "x" * 300]),
    st.lists(st.integers(-2, 2**63), max_size=20), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for j, v in enumerate(obj):
            yield from _paths(v, prefix + (j,))


@st.composite
def meta_mutated(draw) -> bytes:
    """Valid framing and metadata checksum, lying metadata: reaches the structural checks."""
    md, meta, blobs = split(seeds()[draw(st.integers(0, len(seeds()) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(meta) if p]
        path = draw(st.sampled_from(paths))
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(_JUNK)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[path[-1]])))
    return join(md, meta, blobs)


@FUZZ
@given(meta_mutated(), st.booleans())
def test_lying_metadata_with_valid_framing_never_crashes(data, verify):
    _load_or_format_error(data, verify=verify)
