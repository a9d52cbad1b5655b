"""The .lego file: round trip, determinism, integrity checks and clear errors for bad files."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from lego_craft import container, crc, join, split, tiny_model_bytes

import legonet
from legonet.errors import FormatError
from legonet.format import FORMAT_VERSION, deserialize, load, serialize

ROOT = Path(__file__).resolve().parents[2]


def same_model(a: legonet.CompressedModel, b: legonet.CompressedModel) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    sa, sb = a.to_state_dict(), b.to_state_dict()
    return list(sa) == list(sb) and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(raw(sa[k]), raw(sb[k])) for k in sa)


@pytest.mark.parametrize("scope,dtype,compact", [("model", "float32", False), ("layer", "float16", False),
                                                 ("layer", "float16", True)])
def test_round_trip_is_bit_exact(tmp_path, scope, dtype, compact):
    data = tiny_model_bytes(scope, dtype, compact=compact)
    cm = deserialize(data)
    path = tmp_path / "m.lego"
    assert cm.save(path) == path.stat().st_size == len(data)
    back = load(path)
    assert path.read_bytes() == data  # re-serialising what was read gives the same bytes
    assert same_model(cm, back)
    assert back.tensors["mask"].dtype == torch.bool and back.tensors["half"].dtype == torch.float16
    for name, ct in cm.clustered.items():
        assert torch.equal(ct.indices, back.tensors[name].indices)
    for a, b in zip(cm.codebooks, back.codebooks):
        assert torch.equal(a, b)


def test_serialize_is_deterministic():
    # safetensors' own writer orders the metadata keys differently from call to call
    cm = deserialize(tiny_model_bytes())
    assert len({serialize(cm) for _ in range(8)}) == 1


def test_file_is_a_plain_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "m.lego"
    path.write_bytes(tiny_model_bytes())
    assert sorted(load_file(str(path))) == ["codebooks", "dense", "indices", "legonet.meta"]


def test_negative_infinite_sqnr_round_trips():
    # an all-zero tensor reconstructs with noise > 0 and signal 0: SQNR is -inf, not +inf
    sd = {"zero": torch.zeros(4, 4), "w": torch.randn(8, 8, generator=torch.Generator().manual_seed(1))}
    cm = legonet.compress(sd, legonet.LegoConfig(block=2, clusters=2))
    back = deserialize(cm.to_bytes())
    assert back.tensors["zero"].sqnr_db == cm.tensors["zero"].sqnr_db
    assert cm.tensors["zero"].sqnr_db in (math.inf, -math.inf)


def test_allow_nonfinite_only_written_when_set():
    sd = {"w": torch.randn(8, 8), "bad": torch.full((4, 4), float("nan"))}
    with pytest.raises(legonet.CheckpointError, match="'bad'"):
        legonet.compress(sd, legonet.LegoConfig(block=2, clusters=2))
    cm = legonet.compress(sd, legonet.LegoConfig(block=2, clusters=2, allow_nonfinite=True))
    assert "bad" in cm.dense and "w" in cm.clustered
    back = deserialize(cm.to_bytes())
    assert back.config.allow_nonfinite and torch.isnan(back.tensors["bad"]).all()
    _, meta, _ = split(legonet.compress({"w": torch.randn(8, 8)}, legonet.LegoConfig(block=2, clusters=2)).to_bytes())
    assert "allow_nonfinite" not in meta["config"]


# -- integrity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("blob", ["codebooks", "indices", "dense", "legonet.meta"])
def test_checksum_mismatch_is_named(blob):
    data = tiny_model_bytes()
    md, meta, blobs = split(data)
    b = bytearray(blobs[blob])
    b[len(b) // 2] ^= 0x10
    blobs[blob] = bytes(b)
    if blob == "legonet.meta":  # keep the JSON valid but change a number inside it
        bad = join(md, meta, blobs, fix_crc=False).replace(b'"clusters":3', b'"clusters":4')
        assert bad != join(md, meta, blobs, fix_crc=False)
    else:
        bad = join(md, meta, blobs)
    with pytest.raises(FormatError, match="checksum mismatch"):
        deserialize(bad, source="x.lego")
    if blob != "legonet.meta":
        deserialize(bad, verify=False)  # the sizes are right, so skipping the CRCs loads it


@pytest.mark.parametrize("cut", [0, 3, 8, 20, 200, -500, -17, -1])
def test_truncated_file(cut):
    data = tiny_model_bytes()
    with pytest.raises(FormatError, match="x.lego: .*(truncated|not a .lego|not valid JSON)"):
        deserialize(data[:cut], source="x.lego")


def test_extended_file():
    with pytest.raises(FormatError, match="extended"):
        deserialize(tiny_model_bytes() + b"\0" * 16)


def test_wrong_magic(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(FormatError, match="plain.safetensors: not a .lego file"):
        load(p)
    p.write_bytes(b"PK\x03\x04 this is a zip, not a .lego file")
    with pytest.raises(FormatError, match="not a .lego file"):
        load(p)
    md, meta, blobs = split(tiny_model_bytes())
    with pytest.raises(FormatError, match="not a .lego file"):
        deserialize(join({**md, "format": "legonot"}, meta, blobs))


def test_newer_version_is_named():
    md, meta, blobs = split(tiny_model_bytes())
    newer = FORMAT_VERSION + 1
    with pytest.raises(FormatError, match=f"newer legonet \\(format version {newer}\\).*upgrade"):
        deserialize(join({**md, "version": str(newer)}, meta, blobs))
    for v in ("0", "one", "", "1" * 40):
        with pytest.raises(FormatError, match="format version"):
            deserialize(join({**md, "version": v}, meta, blobs))


def test_missing_file_folder_and_fifo(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load(tmp_path / "absent.lego")
    with pytest.raises(FormatError, match="is a folder"):
        load(tmp_path)
    fifo = tmp_path / "pipe.lego"
    os.mkfifo(fifo)
    timer = threading.Timer(3.0, _unblock_reader, (fifo,))  # so that a blocking open fails the test, not hangs it
    timer.start()
    try:
        with pytest.raises(FormatError, match="not a regular file"):
            load(fifo)
    finally:
        timer.cancel()


def _unblock_reader(fifo: Path) -> None:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader: nothing was blocked
        pass


# -- crafted files with valid checksums: the structural checks themselves -------------------------
def _with_tensor(mutate, name="fc.weight", blob_bytes=None, blob="indices"):
    md, meta, blobs = split(tiny_model_bytes())
    entry = next(e for e in meta["tensors"] if e[0] == name)
    mutate(entry, meta)
    if blob_bytes is not None:
        blobs[blob] = blob_bytes(blobs[blob])
    return join(md, meta, blobs)


def test_index_at_or_above_k_is_rejected():
    # K=3 needs 2 bits, so index 3 is representable but out of range; conv.weight's 56 blocks come
    # first in the index blob (14 bytes): set the first index to 3, with a correct CRC.
    def patch(b):
        b = bytearray(b)
        b[0] |= 0b11
        return bytes(b)

    md, meta, blobs = split(tiny_model_bytes(clusters=3))
    blobs["indices"] = patch(blobs["indices"])
    entry = meta["tensors"][0]
    assert entry[0] == "conv.weight" and len(entry) == 7
    nbytes = (56 * 2 + 7) // 8
    entry[3] = crc(blobs["indices"][:nbytes])
    with pytest.raises(FormatError, match="'conv.weight' has index 3 >= K=3"):
        deserialize(join(md, meta, blobs))


@pytest.mark.parametrize("shape", [[2**40, 2**20], [2**61, 2**61], [2**63, 1], [0, 2**63], [1] * 17, [-1, 4],
                                   [1.5, 2], "big", [True, 4]])
def test_dense_shape_lies_are_rejected(shape):
    def mutate(entry, _meta):
        entry[2] = shape

    with pytest.raises(FormatError, match="'fc.bias' has an invalid shape|dense data too short"):
        deserialize(_with_tensor(mutate, "fc.bias"))


@pytest.mark.parametrize("shape", [[2**40, 2**20], [2**30, 2**30, 2**30], [8, 0], [8]])
def test_clustered_shape_lies_are_rejected(shape):
    def mutate(entry, _meta):
        entry[2] = shape

    match = "tensor 'fc.weight' (has an invalid shape|cannot be a clustered)|index data too short for tensor 'fc.weight'"
    with pytest.raises(FormatError, match=match):
        deserialize(_with_tensor(mutate))


@pytest.mark.parametrize("field,value,msg", [
    (4, 7, "missing codebook"), (4, -1, "missing codebook"), (5, [4, 4], "vectors of 4"),
    (5, [0, 4], "invalid block"), (5, [2**40, 1], "invalid block"), (6, "nan?", "invalid sqnr"),
    (1, "F128", "unknown dtype"), (1, "I32", "cannot be a clustered"), (0, "", "no name"),
    (0, "fc.bias", "appears twice"),
])
def test_clustered_entry_lies_are_rejected(field, value, msg):
    def mutate(entry, _meta):
        entry[field] = value

    with pytest.raises(FormatError, match=msg):
        deserialize(_with_tensor(mutate))


@pytest.mark.parametrize("cb", [[2**17, 4, "F32", "0"], [3, 5000, "F32", "0"], [3, 4, "F64", "0"], [3, 4, "F32"],
                                [0, 4, "F32", "0"], [3.0, 4, "F32", "0"], "cb"])
def test_codebook_entry_lies_are_rejected(cb):
    md, meta, blobs = split(tiny_model_bytes())
    meta["codebooks"][0] = cb
    with pytest.raises(FormatError, match="codebook entry 0 is malformed"):
        deserialize(join(md, meta, blobs))


def test_non_finite_codebook_and_bad_bool_are_rejected():
    md, meta, blobs = split(tiny_model_bytes())
    cb = bytearray(blobs["codebooks"])
    cb[0:4] = struct.pack("<f", float("inf"))
    meta["codebooks"][0][3] = crc(bytes(cb))
    with pytest.raises(FormatError, match="codebook 0 holds non-finite"):
        deserialize(join(md, meta, {**blobs, "codebooks": bytes(cb)}))

    md, meta, blobs = split(tiny_model_bytes())
    off = 0  # dense blob: tensors kept, in order, each at its byte size
    sizes = {"F32": 4, "I64": 8, "BOOL": 1, "F16": 2}
    for e in meta["tensors"]:
        if len(e) == 4:
            n = math.prod(e[2]) * sizes[e[1]]
            if e[0] == "mask":
                d = bytearray(blobs["dense"])
                d[off] = 2
                e[3] = crc(bytes(d[off : off + n]))
                blobs["dense"] = bytes(d)
                break
            off += n
    with pytest.raises(FormatError, match="bool tensor 'mask'"):
        deserialize(join(md, meta, blobs))


@pytest.mark.parametrize("mutate", [
    lambda md, meta, blobs: meta.pop("tensors"),
    lambda md, meta, blobs: meta.update(version=2),
    lambda md, meta, blobs: meta.update(config={"block": [2, 2], "novel": 1}),
    lambda md, meta, blobs: meta.update(config={"clusters": 0}),
    lambda md, meta, blobs: meta.update(config=[1]),
    lambda md, meta, blobs: meta["tensors"].append(["extra", "F32", [2], "0"]),
    lambda md, meta, blobs: meta["tensors"].pop(),
    lambda md, meta, blobs: meta["tensors"].append(["x", "F32", [2], "0", 0]),
])
def test_metadata_lies_are_rejected(mutate):
    md, meta, blobs = split(tiny_model_bytes())
    mutate(md, meta, blobs)
    with pytest.raises(FormatError):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_container_framing_lies_are_rejected():
    data = tiny_model_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    for old, new in [(b'"dtype":"U8"', b'"dtype":"F32"'), (b'"data_offsets":[0,', b'"data_offsets":[1,')]:
        bad = header.replace(old, new, 1)
        with pytest.raises(FormatError):
            deserialize(data[:8] + bad + data[8 + n :])
    nested = b"[" * 100_000
    with pytest.raises(FormatError, match="not valid JSON"):
        deserialize(struct.pack("<Q", len(nested)) + nested)


# -- bounded allocation -----------------------------------------------------------------------------
def _huge_dense_file() -> bytes:
    """Valid checksums, but fc.bias claims 2**40 x 2**20 float32 elements (4 PiB)."""
    md, meta, blobs = split(tiny_model_bytes())
    next(e for e in meta["tensors"] if e[0] == "fc.bias")[2] = [2**40, 2**20]
    return join(md, meta, blobs)


def test_huge_declared_shapes_fail_before_allocating():
    data = _huge_dense_file()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="dense data too short for tensor 'fc.bias'"):
            deserialize(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(data) + (1 << 20)  # Python and numpy allocations, all proportional to the file


def test_huge_declared_shapes_fail_under_a_memory_limit(tmp_path):
    # torch's allocations escape tracemalloc: cap the address space of a child process instead, so
    # that any attempt to allocate even 1 GiB would surface as a MemoryError/RuntimeError, not FormatError.
    path = tmp_path / "huge.lego"
    path.write_bytes(_huge_dense_file())
    md, meta, blobs = split(tiny_model_bytes())
    next(e for e in meta["tensors"] if e[0] == "fc.weight")[2] = [2**16, 2**15]  # 2**29 blocks: 4 GiB as int64
    (tmp_path / "huge2.lego").write_bytes(join(md, meta, blobs))
    code = textwrap.dedent(f"""
        import resource, sys
        import legonet
        from legonet.errors import FormatError
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        for name in ("huge.lego", "huge2.lego"):
            try:
                legonet.load({str(tmp_path)!r} + "/" + name)
            except FormatError as exc:
                print("FormatError", exc)
        sys.exit(0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("FormatError") for line in lines), r.stdout + r.stderr[-2000:]
    assert "too short" in lines[0] and "too short" in lines[1]


# -- constant tensors ("fills", format version 2) ---------------------------------------------------
def _with_constants() -> legonet.CompressedModel:
    cm = deserialize(tiny_model_bytes())
    cm.tensors["bn.running_mean"] = torch.zeros(8)
    cm.tensors["bn.running_var"] = torch.full((8,), 1 - 1e-5).half()
    return cm


def test_constant_tensors_are_written_as_one_value_and_read_back_exactly(tmp_path):
    plain = deserialize(tiny_model_bytes())
    cm = _with_constants()
    data = serialize(cm)
    md, meta, blobs = split(data)
    assert md["version"] == "2" and meta["version"] == 2
    fills = {e[0]: e for e in meta["tensors"] if len(e) == 5}
    assert fills == {"bn.running_mean": ["bn.running_mean", "F32", [8], "fill", 0.0],
                     "bn.running_var": ["bn.running_var", "F16", [8], "fill", float(torch.tensor(1 - 1e-5).half())]}
    assert len(blobs["dense"]) == len(split(serialize(plain))[2]["dense"])  # no dense bytes for them
    back = deserialize(data)
    assert same_model(cm, back) and serialize(back) == data
    # files without a constant tensor stay version 1, readable by legonet versions before fills
    assert split(serialize(plain))[0]["version"] == "1"


def test_fills_are_counted_as_zero_dense_bytes():
    cm = _with_constants()
    rows = {r.name: r for r in cm.report().tensors}
    assert rows["bn.running_mean"].stored_bytes == 0 and rows["bn.running_var"].stored_bytes == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.__setitem__(4, "0"), "invalid value"),
    (lambda e: e.__setitem__(4, True), "invalid value"),
    (lambda e: e.__setitem__(4, 1e400), "not valid JSON|invalid value"),
    (lambda e: e.__setitem__(1, "I64"), "must be floating-point"),
    (lambda e: e.__setitem__(2, [1 << 30]), "exceeds the limit"),
    (lambda e: e.__setitem__(3, "full"), "5 fields"),
])
def test_bad_fills_are_rejected(mutate, message):
    md, meta, blobs = split(serialize(_with_constants()))
    entry = next(e for e in meta["tensors"] if e[0] == "bn.running_mean")
    mutate(entry)
    with pytest.raises(FormatError, match=message):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_fills_have_a_total_limit_and_need_version_2():
    md, meta, blobs = split(serialize(_with_constants()))
    for i in range(5):  # with the two small fills, the fourth of 2**22 elements passes the 2**24 in all
        meta["tensors"].append([f"big{i}", "F32", [1 << 22], "fill", 1.0])
    with pytest.raises(FormatError, match="big3.*exceeds the limit"):
        deserialize(join(md, meta, blobs), source="m.lego")
    md, meta, blobs = split(serialize(_with_constants()))
    md["version"], meta["version"] = "1", 1
    with pytest.raises(FormatError, match="fields"):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_the_writer_keeps_within_the_fill_limits_the_reader_enforces():
    cm = deserialize(tiny_model_bytes())
    for i in range(5):  # 5 * 2**22 constant elements: the first four fit the 2**24 a file may hold
        cm.tensors[f"const{i}"] = torch.ones(1 << 22, dtype=torch.float16)
    cm.tensors["too_big"] = torch.ones((1 << 22) + 1, dtype=torch.float16)  # over the per-fill limit
    data = serialize(cm)
    _, meta, _ = split(data)
    kinds = {e[0]: len(e) == 5 for e in meta["tensors"]}
    assert [kinds[f"const{i}"] for i in range(5)] == [True] * 4 + [False]
    assert kinds["too_big"] is False
    assert same_model(cm, deserialize(data))
    assert cm.report().kept_bytes == 2 * ((1 << 22) + (1 << 22) + 1) + sum(
        t.numel() * t.element_size() for n, t in deserialize(tiny_model_bytes()).tensors.items()
        if isinstance(t, torch.Tensor))


# -- version 3: compressed metadata, int8 codebooks, log-coded gains -------------------------------
def test_compact_files_are_version_3_and_hold_their_codes():
    md, meta, blobs = split(tiny_model_bytes(compact=True))
    assert md["version"] == "3" and meta["version"] == 3
    assert all(len(cb) == 5 and cb[2] == "I8" for cb in meta["codebooks"])
    clustered = [e for e in meta["tensors"] if len(e) >= 7]
    assert clustered and all(len(e) == 9 for e in clustered)
    # codes are float32 bit patterns, 8 hex digits each, read back exactly
    back = deserialize(tiny_model_bytes(compact=True))
    lo, step = back.tensors[clustered[0][0]].gain_code
    assert clustered[0][8] == [_hex(lo), _hex(step)] and meta["codebooks"][0][4] == _hex(back.codebook_scales[0])
    # every other file stays at the version it had before
    assert split(tiny_model_bytes())[0]["version"] == "1"


@pytest.mark.parametrize("raw, message", [
    (b"not zlib at all", "not valid zlib"),
    (zlib.compress(b'{"format":"legonet"}')[:-3], "truncated"),
    (zlib.compress(b'{"format":"legonet"}') + b"xx", "extra bytes"),
])
def test_bad_compressed_metadata_is_named(raw, message):
    md, _meta, blobs = split(tiny_model_bytes(compact=True))
    rebuilt = container(dict(md, meta_crc32=crc(raw)), dict(blobs, **{"legonet.meta": raw}))
    with pytest.raises(FormatError, match=f"x.lego: .*{message}"):
        deserialize(rebuilt, source="x.lego")


def test_metadata_that_inflates_past_the_limit_is_refused(monkeypatch):
    from legonet.format import lego_reader

    data = tiny_model_bytes(compact=True)
    monkeypatch.setattr(lego_reader, "MAX_META_BYTES", 200)
    with pytest.raises(FormatError, match="inflates to more than 200 bytes"):
        deserialize(data)
    md, meta, blobs = split(data)  # a zlib bomb: 100 MB of spaces in a few hundred bytes
    bomb = zlib.compress(b" " * (100 << 20), 9)
    monkeypatch.setattr(lego_reader, "MAX_META_BYTES", 1 << 20)
    with pytest.raises(FormatError, match="inflates to more than"):
        deserialize(container(dict(md, meta_crc32=crc(bomb)), dict(blobs, **{"legonet.meta": bomb})))


def test_compact_entries_need_version_3():
    md, meta, blobs = split(tiny_model_bytes(compact=True))
    md["version"], meta["version"] = "2", 2
    with pytest.raises(FormatError, match="codebook entry 0 is malformed"):
        deserialize(join(md, meta, blobs))
    meta["codebooks"] = [cb[:2] + ["F16"] + cb[3:4] for cb in meta["codebooks"]]
    blobs = dict(blobs, codebooks=bytes(2 * sum(cb[0] * cb[1] for cb in meta["codebooks"])))
    with pytest.raises(FormatError, match="has 9 fields"):
        deserialize(join(md, meta, blobs), verify=False)


def _hex(v: float) -> str:
    return struct.pack(">f", v).hex()


@pytest.mark.parametrize("code", [[_hex(float("nan")), _hex(0.0)], [_hex(0.0), _hex(-0.5)], [_hex(100.0), _hex(0.0)],
                                  [_hex(-120.0), _hex(0.0)], [0.0, 0.0], ["3F800000", _hex(0.0)], ["3f80000", "0"],
                                  [_hex(0.0)], "code", None])
def test_bad_gain_codes_are_rejected(code):
    md, meta, blobs = split(tiny_model_bytes(compact=True))
    next(e for e in meta["tensors"] if len(e) == 9)[8] = code
    with pytest.raises(FormatError, match="invalid gain code"):
        deserialize(join(md, meta, blobs), source="m.lego")


@pytest.mark.parametrize("scale", [_hex(0.0), _hex(-0.25), _hex(float("inf")), _hex(float("nan")), 0.5, "1", None])
def test_bad_int8_codebook_scales_are_rejected(scale):
    md, meta, blobs = split(tiny_model_bytes(compact=True))
    meta["codebooks"][0][4] = scale
    with pytest.raises(FormatError, match="codebook 0 has an invalid int8 scale"):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_gain_code_bytes_are_checked():
    md, meta, blobs = split(tiny_model_bytes(compact=True))
    d = bytearray(blobs["dense"])
    d[0] ^= 0x01
    with pytest.raises(FormatError, match="checksum mismatch"):
        deserialize(join(md, meta, dict(blobs, dense=bytes(d))))
    with pytest.raises(FormatError, match="too short|extra bytes"):
        deserialize(join(md, meta, dict(blobs, dense=bytes(d[:-1]))), verify=False)



# -- version 4: entropy-coded index streams --------------------------------------------------------
def _coded_entry(meta):
    return next(e for e in meta["tensors"] if isinstance(e[3], list))


def test_entropy_coded_files_are_version_4_and_read_back_exactly():
    data = tiny_model_bytes(entropy=True)
    md, meta, blobs = split(data)
    assert md["version"] == "4" and meta["version"] == 4
    entry = _coded_entry(meta)
    assert entry[0] == "sparse.weight" and entry[3][0] == "rans" and isinstance(entry[3][2], int)
    back = deserialize(data)
    assert back.to_bytes() == data
    # the same model without the option: same indices, bit-packed, in a larger file of version 1
    plain = legonet.LegoConfig.from_dict({**back.config.to_dict(), "entropy_coding": False})
    flat = legonet.CompressedModel(config=plain, codebooks=back.codebooks, tensors=back.tensors)
    assert split(flat.to_bytes())[0]["version"] == "1" and len(flat.to_bytes()) > len(data)
    for name, t in deserialize(flat.to_bytes()).clustered.items():
        assert torch.equal(t.indices, back.tensors[name].indices)


@pytest.mark.parametrize("field", [["rans", "00000000"], ["rns", "00000000", 10], ["rans", "00000000", 0],
                                   ["rans", "00000000", "10"], ["rans", 7, 10], ["rans", "00000000", True]])
def test_bad_coded_stream_fields_are_rejected(field):
    md, meta, blobs = split(tiny_model_bytes(entropy=True))
    _coded_entry(meta)[3] = field
    with pytest.raises(FormatError, match="'sparse.weight' has an invalid checksum field"):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_coded_streams_need_version_4():
    md, meta, blobs = split(tiny_model_bytes(entropy=True))
    md["version"], meta["version"] = "3", 3
    with pytest.raises(FormatError, match="invalid checksum field"):
        deserialize(join(md, meta, blobs))


def test_coded_stream_lies_are_rejected():
    md, meta, blobs = split(tiny_model_bytes(entropy=True))
    entry = _coded_entry(meta)
    packed = 32 * 64 // 4 * 4 // 8  # 512 blocks of 4 bits
    entry[3][2] = packed
    with pytest.raises(FormatError, match="longer than its packed indices"):
        deserialize(join(md, meta, blobs), verify=False)
    _md, meta, _blobs = split(tiny_model_bytes(entropy=True))
    entry = _coded_entry(meta)
    entry[3][2] -= 1  # one byte less: the stream is cut, and the next tensor's bytes shift
    with pytest.raises(FormatError, match="invalid entropy-coded index stream|checksum"):
        deserialize(join(md, meta, blobs), verify=False)


def test_damaged_coded_streams_are_named_even_unverified():
    md, meta, blobs = split(tiny_model_bytes(entropy=True))
    start = 0
    for e in meta["tensors"]:  # the coded stream's offset in the indices blob (the others are packed)
        if e[0] == "sparse.weight":
            break
        if len(e) >= 7:
            start += _packed_len(e, meta)
    n = _coded_entry(meta)[3][2]
    for pos in range(start + 16 + 4, start + n, max(1, (n - 20) // 12)):  # past the table and the state
        d = bytearray(blobs["indices"])
        d[pos] ^= 0x3C
        with pytest.raises(FormatError, match="'sparse.weight' has an invalid entropy-coded index stream"):
            deserialize(join(md, meta, dict(blobs, indices=bytes(d))), verify=False)
    with pytest.raises(FormatError, match="checksum mismatch in tensor 'sparse.weight'"):
        deserialize(join(md, meta, dict(blobs, indices=bytes(d))))


def _packed_len(entry, meta):
    from legonet.ops.bitpack import bits_for, packed_nbytes
    from legonet.ops.tiling import make_tiling

    k = meta["codebooks"][entry[4]][0]
    return packed_nbytes(make_tiling(tuple(entry[2]), tuple(entry[5])).num_blocks, bits_for(k))


def _narrowed_model_bytes() -> bytes:
    """Kept float32 tensors stored as float16 (``kept_dtype="float16"``, as target mode does)."""
    g = torch.Generator().manual_seed(0)
    sd = {"fc.weight": torch.randn(8, 12, generator=g), "fc.bias": torch.randn(8, generator=g),
          "half": torch.randn(4, generator=g).half(), "steps": torch.tensor(3)}
    return legonet.compress(sd, legonet.LegoConfig(block=2, clusters=4, kept_dtype="float16")).to_bytes()


def test_narrowed_kept_tensors_come_back_in_their_source_dtype():
    cm = deserialize(_narrowed_model_bytes())
    assert cm.tensors["fc.bias"].dtype == torch.float16  # stored narrow ...
    sd = cm.to_state_dict()
    assert sd["fc.bias"].dtype == torch.float32 and sd["half"].dtype == torch.float16  # ... restored
    assert sd["fc.weight"].dtype == torch.float32 and sd["steps"].dtype == torch.int64
    _md, meta, _blobs = split(_narrowed_model_bytes())
    assert meta["source_dtypes"] == {"F32": ["fc.bias"]}  # not "*": "half" was float16 already
    g = torch.Generator().manual_seed(0)
    uniform = legonet.compress({"w": torch.randn(8, 12, generator=g), "b": torch.randn(8, generator=g),
                                "c": torch.randn(3, generator=g)}, legonet.LegoConfig(block=2, clusters=4,
                                                                                      kept_dtype="float16"))
    assert split(uniform.to_bytes())[1]["source_dtypes"] == {"F32": "*"}
    back = deserialize(uniform.to_bytes()).to_state_dict()
    assert back["b"].dtype == back["c"].dtype == torch.float32
    # files without a narrowed tensor do not carry the key (written as before)
    assert "source_dtypes" not in split(tiny_model_bytes())[1]


@pytest.mark.parametrize("value, message", [
    ([1], "source_dtypes is malformed"),
    ({"I64": ["fc.bias"]}, "invalid entry"),
    ({"F64": "fc.bias"}, "invalid entry"),
    ({"F32": ["nope"]}, "not a kept floating tensor"),
    ({"F32": ["fc.weight"]}, "not a kept floating tensor"),
    ({"F32": ["steps"]}, "not a kept floating tensor"),
    ({"F32": ["fc.bias"], "F64": ["fc.bias"]}, "or twice"),
    ({"F32": "*", "F64": ["fc.bias"]}, "invalid entry"),
    ({"F32": "fc.bias"}, "invalid entry"),
])
def test_source_dtype_lies_are_rejected(value, message):
    md, meta, blobs = split(_narrowed_model_bytes())
    meta["source_dtypes"] = value
    with pytest.raises(FormatError, match=message):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_a_coded_stream_cannot_declare_more_blocks_than_its_bytes_allow():
    # A symbol holding every slot costs no bits: without a bound, a file of a few KB could declare
    # a 2**40-block tensor whose "stream" decodes, and the reader would allocate terabytes.
    md, meta, blobs = split(tiny_model_bytes(entropy=True))
    entry = _coded_entry(meta)
    entry[2] = [1 << 20, 1 << 20]
    with pytest.raises(FormatError, match="more than 4096 per byte"):
        deserialize(join(md, meta, blobs), verify=False)


def test_the_writer_bit_packs_streams_denser_than_the_reader_accepts(monkeypatch):
    from legonet.ops import rans

    idx = torch.zeros(300_000, dtype=torch.long)  # nearly one centroid: a few hundred bytes coded
    idx[0] = 1
    stream, coded = rans.index_stream(idx.numpy(), 4, True)
    assert coded and 300_000 <= rans.MAX_SYMBOLS_PER_BYTE * len(stream)
    monkeypatch.setattr(rans, "MAX_SYMBOLS_PER_BYTE", 300_000 // len(stream) - 1)
    stream, coded = rans.index_stream(idx.numpy(), 4, True)
    assert not coded and len(stream) == 300_000 * 2 // 8


def test_index_streams_are_coded_again_when_their_indices_change():
    """The writer reuses a tensor's coded stream only while its indices, K and coding are the same."""
    import copy

    from legonet.ops.rans import index_stream
    from legonet.target import compress_to_ratio

    g = torch.Generator().manual_seed(0)
    cm, _ = compress_to_ratio({"w": torch.randn(64, 64, generator=g), "v": torch.randn(32, 64, generator=g)}, 8.0)
    first = cm.to_bytes()
    assert cm.to_bytes() == first
    ct = cm.tensors["w"]
    ct.indices[: ct.indices.numel() // 2] = 0  # in place: the same tensor object, other contents
    changed = cm.to_bytes()
    fresh = copy.deepcopy(cm)
    fresh._streams.clear()
    assert changed != first and changed == serialize(fresh)
    k = cm.codebooks[ct.codebook].shape[0]
    assert cm.index_stream("w") == index_stream(ct.indices.numpy(), k, cm.config.entropy_coding)
    assert deserialize(changed).tensors["w"].indices.tolist() == ct.indices.tolist()
