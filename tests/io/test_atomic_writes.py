"""Atomic output: a writer killed mid-way leaves no partial target and earlier files intact.

The kill tests run the real CLI in a child process. To kill it at a known point *during* the write,
the child wraps one function (``os.replace``, or the ``open`` used by the .lego writer) so that it
announces itself and sleeps there; the parent then sends SIGTERM or SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from legonet.cli import main
from legonet.errors import OutputError
from legonet.format import load
from legonet.io.atomic import atomic_path, stale_partials

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

CHILD = textwrap.dedent("""
    import builtins, os, sys, time
    hook, args = sys.argv[1], sys.argv[2:]

    def announce(tmp):
        print("MIDWRITE", tmp, os.path.getsize(tmp), flush=True)
        time.sleep(60)

    if hook == "before-rename":  # everything written, not yet renamed
        real_replace = os.replace
        def replace(src, dst):
            announce(src)
            real_replace(src, dst)
        os.replace = replace
    elif hook == "half-written":  # the .lego writer has written half of its bytes
        import legonet.format.lego_file as lf
        class Half:
            def __init__(self, path): self.f, self.path = builtins.open(path, "wb"), path
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                announce(self.path)
                self.f.write(data[len(data) // 2 :])
        lf.open = lambda path, mode: Half(path)
    from legonet.cli import main
    main(args, prog_name="legonet")
""")


def _checkpoint(path: Path, n: int = 64) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(n, n, generator=g), "a.bias": torch.randn(n, generator=g),
               "b.weight": torch.randn(10, n, generator=g)}, str(path))
    return path


def _run_and_kill(hook: str, args: list[str], sig: int) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, hook, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    try:
        line = p.stdout.readline()
        assert line.startswith("MIDWRITE"), line + p.stderr.read()
        _, tmp, size = line.split()
        assert Path(tmp).name.endswith(".partial") and Path(tmp).exists() and int(size) > 0
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial"))


def _compress_here(src: Path, out: Path, k: int) -> None:
    result = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "-k", str(k), "-q"])
    assert result.exit_code == 0, result.output


def test_compress_killed_by_sigterm_mid_write_leaves_nothing(tmp_path):
    src, out = _checkpoint(tmp_path / "m.safetensors"), tmp_path / "m.lego"
    rc, err = _run_and_kill("half-written", ["compress", str(src), "-o", str(out), "-k", "4", "-q"], signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert not out.exists()
    assert _partials(tmp_path) == []  # SIGTERM is caught: the temporary file is removed too
    assert "Traceback" not in err


def test_compress_killed_by_sigkill_keeps_earlier_file_and_next_run_sweeps(tmp_path):
    src, out = _checkpoint(tmp_path / "m.safetensors"), tmp_path / "m.lego"
    _compress_here(src, out, 2)
    earlier = out.read_bytes()
    rc, _ = _run_and_kill("half-written", ["compress", str(src), "-o", str(out), "-k", "8", "-q"], signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert out.read_bytes() == earlier  # the earlier file is intact
    assert len(_partials(tmp_path)) == 1  # SIGKILL cannot be caught: its temporary file stays...
    assert stale_partials(out) == _partials(tmp_path)  # ...and is recognised as stale (its writer is gone)
    _compress_here(src, out, 8)
    assert _partials(tmp_path) == []  # ...until the next write to the same target sweeps it
    assert load(out).codebooks[0].shape[0] == 8


def test_decompress_killed_before_rename_keeps_earlier_file(tmp_path):
    src, lego, out = _checkpoint(tmp_path / "m.safetensors"), tmp_path / "m.lego", tmp_path / "dense.safetensors"
    _compress_here(src, lego, 2)
    out.write_bytes(b"earlier file")
    rc, _ = _run_and_kill("before-rename", ["decompress", str(lego), "-o", str(out)], signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert out.read_bytes() == b"earlier file"
    assert len(_partials(tmp_path)) == 1
    result = CliRunner().invoke(main, ["decompress", str(lego), "-o", str(out)])
    assert result.exit_code == 0 and _partials(tmp_path) == []
    assert out.read_bytes()[:8] != b"earlier "


def test_compress_killed_at_an_arbitrary_moment(tmp_path):
    """No hook: a compression taking tens of seconds, killed part-way through, whatever it is doing."""
    src, out = _checkpoint(tmp_path / "big.safetensors", n=1448), tmp_path / "big.lego"
    out.write_bytes(b"earlier")
    # K=1024 on 0.5 M blocks takes tens of seconds (K=256 finished in 3.4 s on a fast machine, and
    # the kill came too late)
    p = subprocess.Popen([sys.executable, "-m", "legonet", "compress", str(src), "-o", str(out), "-k", "1024",
                          "--block", "2", "-q"], env=ENV, stderr=subprocess.PIPE)
    time.sleep(3.0)  # importing torch, reading, k-means: far from done
    assert p.poll() is None, "the compression finished before the kill: the workload is too small"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert out.read_bytes() == b"earlier"


# -- the helper itself --------------------------------------------------------------------------------
def test_failure_inside_leaves_target_and_no_partial(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new, half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _partials(tmp_path) == []


def test_success_replaces_with_plain_permissions(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0o600
    target.chmod(0o640)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data2")
    assert target.stat().st_mode & 0o777 == 0o640


def test_only_stale_partials_of_the_same_target_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.bin.{dead_pid}.abc123.partial"
    live = tmp_path / f".out.bin.{os.getpid()}.def456.partial"
    other = tmp_path / f".other.bin.{dead_pid}.abc123.partial"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert stale_partials(tmp_path / "out.bin") == [stale]
    with atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"y")
    assert not stale.exists() and live.exists() and other.exists()


def test_unwritable_targets_raise_output_error(tmp_path):
    with pytest.raises(OutputError, match="folder .* does not exist"), atomic_path(tmp_path / "no" / "x"):
        pass
    with pytest.raises(OutputError, match="is a folder"), atomic_path(tmp_path):
        pass
    with pytest.raises(OutputError, match="cannot write"), atomic_path(tmp_path / "x") as tmp:
        tmp.unlink()
        os.mkdir(tmp)
        (tmp / "f").write_bytes(b"")  # a non-empty folder where the file should be: the rename fails
    with pytest.raises(OutputError, match="cannot write /proc/x.lego"), atomic_path("/proc/x.lego"):
        pass
