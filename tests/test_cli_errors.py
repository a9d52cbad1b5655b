"""CLI failures: non-zero exit, exactly one line on stderr naming the problem and the file, no
traceback unless ``--debug``."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import legonet
from legonet.cli import main
from legonet.errors import FormatError


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("legonet: error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)},
              str(tmp_path / "m.safetensors"))
    bad = {"w": torch.randn(16, 16, generator=g), "v": torch.randn(8, 8, generator=g)}
    bad["v"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    cm = legonet.compress({"w": torch.randn(8, 8, generator=g)}, legonet.LegoConfig(block=2, clusters=2))
    good = cm.to_bytes()
    (tmp_path / "good.lego").write_bytes(good)
    (tmp_path / "cut.lego").write_bytes(good[:-40])
    (tmp_path / "newer.lego").write_bytes(good.replace(b'"version":"1"', b'"version":"9"', 1))
    return tmp_path


@pytest.mark.parametrize("args,match", [
    (["info", "{d}/absent.lego"], "{d}/absent.lego: no such file"),
    (["info", "{d}/cut.lego"], "{d}/cut.lego: .*truncated"),
    (["info", "{d}/newer.lego"], "{d}/newer.lego: written by a newer legonet"),
    (["info", "{d}/m.safetensors"], "{d}/m.safetensors: not a .lego file"),
    (["decompress", "{d}/cut.lego", "-o", "{d}/x.safetensors"], "{d}/cut.lego: "),
    (["decompress", "{d}/good.lego", "-o", "{d}/no/x.safetensors"], "cannot write {d}/no/x.safetensors"),
    (["compress", "{d}/absent.pt", "-o", "{d}/x.lego"], "{d}/absent.pt: no such file"),
    (["compress", "{d}/good.lego", "-o", "{d}/no/x.lego", "-k", "2"], "cannot write {d}/no/x.lego"),
    (["compress", "{d}/nan.safetensors", "-o", "{d}/x.lego"], "tensor 'v' holds 1 non-finite value"),
    (["compress", "{d}/m.safetensors", "-o", "{d}/x.lego", "-k", "5000"], "K=5000 is larger than"),
    (["compress", "{d}/m.safetensors", "-o", "{d}/x.lego", "--include", "nope*"], "include pattern 'nope\\*'"),
    (["compress", "{d}/m.safetensors", "-o", "{d}/x.lego", "--unshrink"], "apply to row gains only"),
    (["eval", "--arch", "resnet20", "--weights", "{d}/cut.lego", "--data", "{d}/x.npz"], "{d}/cut.lego: "),
])
def test_failures_are_one_line(files, args, match):
    import re

    line = one_line_error(run(*[a.format(d=files) for a in args]))
    assert re.search(match.format(d=re.escape(str(files))), line), line
    assert not list(files.glob("x.*")) and not list(files.glob(".*.partial"))


@pytest.mark.parametrize("args", [["compress"], ["compress", "a.pt"], ["--bogus"], ["nosuchcommand"],
                                  ["compress", "a", "-o", "b", "-k", "x"], ["compress", "a", "-o", "b", "--block", "0x"]])
def test_usage_errors_are_one_line(args):
    line = one_line_error(run(*args), code=2)
    assert "--help" in line


def test_debug_shows_the_exception(files):
    result = run("--debug", "info", str(files / "cut.lego"))
    assert result.exit_code != 0 and isinstance(result.exception, FormatError)


def test_internal_errors_are_one_line_too(files, monkeypatch):
    def boom(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("legonet.format.load", boom)
    result = run("info", str(files / "good.lego"))
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "legonet: internal error: ZeroDivisionError: a bug (run with --debug for the traceback)"]


def test_allow_nonfinite_keeps_and_reports(files):
    out = files / "kept.lego"
    result = run("compress", str(files / "nan.safetensors"), "-o", str(out), "-k", "4", "-q", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "kept 1 tensor(s) holding NaN/Inf uncompressed: v" in result.stderr
    cm = legonet.load(out)
    assert set(cm.dense) == {"v"} and set(cm.clustered) == {"w"} and cm.config.allow_nonfinite
    info = run("info", str(out), "--per-tensor")
    assert info.exit_code == 0 and "kept" in info.stdout


def test_success_still_exits_zero(files):
    assert run("info", str(files / "good.lego")).exit_code == 0
    assert run("--version").exit_code == 0
    assert run("compress", "--help").exit_code == 0
