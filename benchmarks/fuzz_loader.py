"""Fuzz the .lego loader for a bounded time; write benchmarks/results/fuzz_loader.json.

    python benchmarks/fuzz_loader.py --seconds 300

Two engines share the time budget (``--atheris-share`` of it goes to the first):

* ``atheris`` (coverage-guided libFuzzer, if ``pip install atheris`` works): byte-level mutations
  of a seed corpus of valid .lego files, run in a child process with libFuzzer's RSS limit
  (``--rss-limit-mb``) and per-input timeout, so an unbounded allocation or a hang is a failure.
* ``structured`` (always; seeded, no extra dependency): mutations of the JSON metadata with the
  checksum recomputed, plus byte mutations, in-process under an address-space limit and a
  per-input alarm. This reaches the structural checks that CRCs shield from blind byte flips.

Every input is loaded with ``verify=True`` and ``verify=False``; anything accepted is fully decoded
(``to_state_dict``). The only acceptable failure is :class:`legonet.errors.FormatError`; any other
exception, a hang or running out of memory counts as a crash and its input is saved under
``benchmarks/results/fuzz_crashes/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


# -- seeds ---------------------------------------------------------------------------------------------
def seed_corpus() -> list[bytes]:
    """Valid .lego files of several shapes: both scopes, both codebook dtypes, 1..16-bit indices."""
    import torch

    import legonet
    from legonet.io.checkpoints import read_state_dict

    g = torch.Generator().manual_seed(0)
    tiny = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "fc.weight": torch.randn(5, 12, generator=g),
            "fc.bias": torch.randn(5, generator=g), "steps": torch.tensor(7), "mask": torch.tensor([True, False]),
            "half": torch.randn(2, 6, generator=g).half(), "empty": torch.zeros(0, 3)}
    out = []
    for scope, dtype, k, block in [("model", "float32", 3, (2, 2)), ("layer", "float16", 2, (1, 4)),
                                   ("model", "float32", 1, (3, 3)), ("model", "float16", 200, (1, 1))]:
        cfg = legonet.LegoConfig(block=block, clusters=k, scope=scope, codebook_dtype=dtype)
        out.append(legonet.compress(tiny, cfg).to_bytes())
    # format version 3: compressed metadata, int8 codebooks, log-coded row gains
    compact = legonet.LegoConfig(block=(2, 2), clusters=2, scope="layer", scales="row", compact_storage=True)
    out.append(legonet.compress(tiny, compact).to_bytes())
    # format version 4: an entropy-coded index stream (a sparse tensor's blocks are mostly one centroid)
    sparse = torch.randn(32, 64, generator=g) * (torch.rand(32, 64, generator=g) < 0.15)
    coded = legonet.LegoConfig(block=(2, 2), clusters=16, scope="layer", entropy_coding=True)
    out.append(legonet.compress({**tiny, "sparse.weight": sparse}, coded).to_bytes())
    # A slice of the bundled ResNet-20 (a real checkpoint's names and shapes), small enough that one
    # input costs milliseconds, not the ~0.3 s of decoding the whole model.
    sd = read_state_dict(ROOT / "legonet" / "data" / "resnet20_cifar10.safetensors")
    part = {k: v for k, v in sd.items() if k.startswith(("conv1", "bn1", "layer1.0.", "linear"))}
    out.append(legonet.compress(part, legonet.LegoConfig(block=4, clusters=16)).to_bytes())
    return out


def check_one(data: bytes) -> list[str]:
    """Load ``data`` both ways; raise anything that is not a FormatError.

    Returns the outcome of each load: ``"loaded"`` or the FormatError's message with names and
    numbers blanked out (so that outcomes can be counted by kind).
    """
    from legonet.errors import FormatError
    from legonet.format import deserialize

    out = []
    for verify in (True, False):
        try:
            cm = deserialize(data, source="fuzz", verify=verify)
        except FormatError as exc:
            out.append(re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "_", str(exc).removeprefix("fuzz: "))[:70])
            continue
        cm.to_state_dict()
        out.append("loaded")
    return out


# -- structured engine ----------------------------------------------------------------------------
_JUNK = [None, True, False, 0, -1, 1, 2, 3, 255, 256, 4096, 4097, 65536, 65537, 2**31, 2**62, 2**63, 2**64, -(2**63),
         1.5, float("nan"), "", "inf", "-inf", "F32", "F16", "BF16", "BOOL", "U8", "I64", "x" * 100, [], [0], [1, 1],
         [2**40, 2**20], [0, 2**63], [1] * 17, {}, {"a": 1}]


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    blobs = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    raw = blobs["legonet.meta"]
    if int(header["__metadata__"]["version"]) >= 3:  # compressed metadata
        raw = zlib.decompress(raw)
    return header["__metadata__"], json.loads(raw), blobs


def _join(md, meta, blobs) -> bytes:
    raw = json.dumps(meta, separators=(",", ":")).encode()
    blobs = dict(blobs, **{"legonet.meta": zlib.compress(raw) if int(md.get("version", "1")) >= 3 else raw})
    md = dict(md, meta_crc32=f"{zlib.crc32(blobs['legonet.meta']) & 0xFFFFFFFF:08x}")
    header, off = {"__metadata__": md}, 0
    for k in sorted(blobs):
        header[k] = {"dtype": "U8", "shape": [len(blobs[k])], "data_offsets": [off, off + len(blobs[k])]}
        off += len(blobs[k])
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs[k] for k in sorted(blobs))


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def mutate(rng: random.Random, seed: bytes) -> bytes:
    if rng.random() < 0.6:  # lie in the metadata, with a valid checksum
        md, meta, blobs = _split(seed)
        for _ in range(rng.randint(1, 3)):
            paths = [p for p in _paths(meta) if p]
            path = rng.choice(paths)
            parent = meta
            for k in path[:-1]:
                parent = parent[k]
            r = rng.random()
            if r < 0.6:
                parent[path[-1]] = copy.deepcopy(rng.choice(_JUNK))  # fresh: no shared or circular lists
            elif r < 0.8:
                del parent[path[-1]]
            elif isinstance(parent, list):
                parent.insert(rng.randint(0, len(parent)), json.loads(json.dumps(parent[path[-1]])))
        if rng.random() < 0.3:
            name = rng.choice(["codebooks", "indices", "dense"])
            b = bytearray(blobs[name])
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            blobs[name] = bytes(b[: rng.randint(0, len(b))] if rng.random() < 0.3 else b)
        return _join(md, meta, blobs)
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op, pos = rng.randrange(6), rng.randrange(max(1, len(data)))
        if op == 0 and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 64))
        elif op == 3:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del data[pos : pos + rng.randint(1, 16)]
        elif len(data) >= 8:
            data[0:8] = rng.randrange(2**64).to_bytes(8, "little")
    return bytes(data)


class _Timeout(BaseException):
    pass


def run_structured(seeds: list[bytes], seconds: float, seed: int, memory_mb: int, crash_dir: Path) -> dict:
    rng = random.Random(seed)
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (memory_mb << 20), resource.RLIM_INFINITY))

    def on_alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    tried, crashes, kinds, outcomes = 0, [], {}, {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = mutate(rng, rng.choice(seeds))
        tried += 1
        signal.alarm(10)
        try:
            for o in check_one(data):
                outcomes[o] = outcomes.get(o, 0) + 1
        except (_Timeout, MemoryError, Exception) as exc:  # noqa: BLE001 - every non-FormatError is a finding
            kind = "hang" if isinstance(exc, _Timeout) else type(exc).__name__
            kinds[kind] = kinds.get(kind, 0) + 1
            if len(crashes) < 20:
                crash_dir.mkdir(parents=True, exist_ok=True)
                path = crash_dir / f"structured-{tried}.lego"
                path.write_bytes(data)
                crashes.append({"input": str(path.relative_to(ROOT)), "error": kind,
                                "where": traceback.format_exc().splitlines()[-1][:300]})
        finally:
            signal.alarm(0)
    return {"engine": "structured (seeded metadata lies with valid CRCs + byte mutations)", "seconds": seconds,
            "rng_seed": seed, "address_space_limit_mb_above_baseline": memory_mb, "per_input_timeout_s": 10,
            "inputs_tried": tried, "crashes": sum(kinds.values()), "crash_kinds": kinds, "crash_inputs": crashes,
            "outcomes_of_loads": dict(sorted(outcomes.items(), key=lambda kv: -kv[1]))}


# -- atheris engine ---------------------------------------------------------------------------------
def atheris_child(corpus: str, seconds: int, rss_mb: int, artifacts: str, max_len: int) -> None:
    import atheris
    import torch  # imported before instrumentation so that only legonet is instrumented

    torch.set_num_threads(1)

    with atheris.instrument_imports(include=["legonet"]):
        import legonet.format.lego_file  # noqa: F401
        import legonet.format.lego_reader  # noqa: F401
        import legonet.ops.bitpack  # noqa: F401

    def one_input(data: bytes) -> None:
        check_one(data)

    argv = [sys.argv[0], corpus, f"-max_total_time={seconds}", f"-rss_limit_mb={rss_mb}", "-timeout=10",
            "-print_final_stats=1", f"-artifact_prefix={artifacts}/", f"-max_len={max_len}", "-seed=1"]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_atheris(seeds: list[bytes], seconds: int, rss_mb: int, crash_dir: Path) -> dict:

    with tempfile.TemporaryDirectory(prefix="legonet-fuzz-") as tmp:
        corpus, artifacts = Path(tmp) / "corpus", Path(tmp) / "artifacts"
        corpus.mkdir()
        artifacts.mkdir()
        for i, s in enumerate(seeds):
            (corpus / f"seed{i}.lego").write_bytes(s)
        cmd = [sys.executable, __file__, "--atheris-child", str(corpus), str(seconds), str(rss_mb), str(artifacts),
               str(2 * max(len(s) for s in seeds))]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 600)
        wall = time.monotonic() - t0
        stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", proc.stderr))
        found = sorted(artifacts.iterdir())
        crashes = []
        for f in found:
            crash_dir.mkdir(parents=True, exist_ok=True)
            dest = crash_dir / f"atheris-{f.name}"
            dest.write_bytes(f.read_bytes())
            crashes.append({"input": str(dest.relative_to(ROOT)), "kind": f.name.split("-")[0]})
        corpus_size = len(list(corpus.iterdir()))
    tail = proc.stderr.strip().splitlines()[-12:]
    from importlib.metadata import version

    return {"engine": f"atheris {version('atheris')} (libFuzzer, coverage-guided on legonet)",
            "seconds": seconds, "wall_s": round(wall, 1), "rss_limit_mb": rss_mb, "per_input_timeout_s": 10,
            "inputs_tried": int(stats.get("number_of_executed_units", 0)), "exit_code": proc.returncode,
            "crashes": len(crashes) + (0 if proc.returncode == 0 or crashes else 1), "crash_inputs": crashes,
            "corpus_final": corpus_size, "peak_rss_mb": int(stats.get("peak_rss_mb", 0)),
            "stderr_tail": tail if proc.returncode else tail[-3:]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--atheris-child":
        c, s, r, a, m = sys.argv[2:7]
        atheris_child(c, int(s), int(r), a, int(m))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="total fuzzing time, both engines")
    ap.add_argument("--atheris-share", type=float, default=0.6, help="fraction of the time for atheris")
    ap.add_argument("--rss-limit-mb", type=int, default=1536, help="atheris: libFuzzer RSS limit")
    ap.add_argument("--memory-mb", type=int, default=512, help="structured: address space allowed above baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fuzz_loader.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # a fair per-input cost on a shared machine; the loader is not parallel
    seeds = seed_corpus()
    crash_dir = RESULTS / "fuzz_crashes"
    runs = []
    try:
        import atheris  # noqa: F401

        have_atheris = True
    except ImportError:
        have_atheris = False
    t_atheris = int(args.seconds * args.atheris_share) if have_atheris else 0
    if t_atheris:
        runs.append(run_atheris(seeds, t_atheris, args.rss_limit_mb, crash_dir))
        print(f"atheris: {runs[-1]['inputs_tried']} inputs, {runs[-1]['crashes']} crashes", flush=True)
    runs.append(run_structured(seeds, args.seconds - t_atheris, args.seed, args.memory_mb, crash_dir))
    print(f"structured: {runs[-1]['inputs_tried']} inputs, {runs[-1]['crashes']} crashes", flush=True)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {
        "command": "python benchmarks/fuzz_loader.py " + " ".join(sys.argv[1:]),
        "target": "legonet.format.deserialize(data, verify=True and False) + to_state_dict()",
        "seed_files": [len(s) for s in seeds], "seconds_total": args.seconds,
        "inputs_tried": sum(r["inputs_tried"] for r in runs), "crashes": sum(r["crashes"] for r in runs),
        "runs": runs, "commit": commit, "python": platform.python_version(), "machine": platform.machine(),
        "atheris_available": have_atheris,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: {result['inputs_tried']} inputs in {args.seconds} s, {result['crashes']} crashes")
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
