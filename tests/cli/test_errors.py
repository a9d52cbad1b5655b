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
    (tmp_path / "include.toml").write_text('[lego]\ninclude = ["nope*"]\n')
    (tmp_path / "unshrink.toml").write_text("[lego]\nunshrink = true\n")
    (tmp_path / "nonfinite.toml").write_text("[lego]\nallow_nonfinite = true\nclusters = 4\n")
    (tmp_path / "layer.toml").write_text('[lego]\nscope = "layer"\n')
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
    (["compress", "{d}/m.safetensors", "-o", "{d}/x.lego", "--recipe", "{d}/include.toml"], "include pattern 'nope\\*'"),
    (["compress", "{d}/m.safetensors", "-o", "{d}/x.lego", "--recipe", "{d}/unshrink.toml"],
     "{d}/unshrink.toml: scale_stat and unshrink apply to row gains only"),
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
    result = run("compress", str(files / "nan.safetensors"), "-o", str(out), "-q", "--recipe",
                 str(files / "nonfinite.toml"))
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


def _digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("spell", ["{d}/m.safetensors", "{d}/./m.safetensors", "{d}/link.safetensors",
                                   "{d}/hard.safetensors"])
def test_compress_refuses_to_write_over_its_input(files, spell):
    import os

    src = files / "m.safetensors"
    os.symlink(src, files / "link.safetensors")
    os.link(src, files / "hard.safetensors")
    before = _digest(src)
    line = one_line_error(run("compress", str(src), "-o", spell.format(d=files), "-k", "2"))
    assert "refusing to write" in line and "it is the input" in line
    assert _digest(src) == before and not list(files.glob(".*.partial"))


def test_decompress_and_demo_refuse_to_write_over_their_input(files):
    good = files / "good.lego"
    before = _digest(good)
    line = one_line_error(run("decompress", str(good), "-o", str(good)))
    assert "refusing to write" in line and _digest(good) == before
    import os

    from legonet.cli import bundled

    weights = bundled("resnet20_cifar10.safetensors")
    before = _digest(weights)
    (files / "demo").mkdir()
    os.symlink(weights, files / "demo" / "resnet20-paper.lego")  # where the demo writes its first file
    assert "refusing to write" in one_line_error(run("demo", "-o", str(files / "demo")))
    assert _digest(weights) == before


def test_sharded_input_shards_are_inputs_too(files):
    import json

    shard = files / "m.safetensors"
    (files / "m.index.json").write_text(json.dumps({"weight_map": {"w": "m.safetensors", "b": "m.safetensors"}}))
    before = _digest(shard)
    line = one_line_error(run("compress", str(files / "m.index.json"), "-o", str(shard), "-k", "2"))
    assert "refusing to write" in line and _digest(shard) == before


def test_unreachable_target_is_refused_at_once_with_the_highest_ratio(files):
    import re
    import time

    start = time.perf_counter()
    line = one_line_error(run("compress", str(files / "m.safetensors"), "-o", str(files / "x.lego"),
                              "--target-ratio", "100000"))
    assert time.perf_counter() - start < 30  # no clustering ran (seconds on a busy machine, not minutes)
    most = float(re.search(r"at most ([0-9.]+)x", line)[1])
    assert "out of reach" in line and "--target-ratio" in line and 1 < most < 100000
    # the figure said is the bound the check uses: a target at it is not refused before clustering
    from safetensors.torch import load_file

    from legonet.target import check_reachable, reach

    sd = load_file(str(files / "m.safetensors"))
    assert f"{reach(sd, ['w']).most:.1f}" == f"{most:.1f}"
    check_reachable(sd, ["w"], reach(sd, ["w"]).most)


def test_arch_mismatch_is_found_before_any_work(files, resnet20_path):
    line = one_line_error(run("compress", str(resnet20_path), "-o", str(files / "x.lego"), "--target-ratio", "8",
                              "--arch", "resnet56"))
    assert f"{resnet20_path}: weights do not fit the architecture 'resnet56'" in line


def test_errors_name_the_cli_flags_not_python_arguments(files):
    line = one_line_error(run("compress", str(files / "nan.safetensors"), "-o", str(files / "x.lego")))
    assert "set allow_nonfinite = true in a --recipe" in line
    line = one_line_error(run("compress", str(files / "m.safetensors"), "-o", str(files / "x.lego"), "-k", "100",
                              "--recipe", str(files / "layer.toml")))
    assert 'set scope = "model" in a --recipe' in line and "scope=" not in line and "--clusters" in line


def test_paper_setting_warns_when_the_error_is_that_large(files):
    ok = run("compress", str(files / "m.safetensors"), "-o", str(files / "x.lego"), "-k", "2", "-q")
    assert ok.exit_code == 0
    assert "legonet: warning: lowest tensor SQNR" in ok.stderr and "--target-ratio" in ok.stderr
    fine = run("compress", str(files / "m.safetensors"), "-o", str(files / "y.lego"), "--block", "1",
               "-k", "256", "-q")
    assert fine.exit_code == 0 and "warning" not in fine.stderr


def test_decompress_gives_back_the_input_names_and_dtypes(files):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    src = files / "big.safetensors"
    save_file({"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.randn(64, generator=g),
               "steps": torch.tensor(3)}, str(src))
    assert run("compress", str(src), "-o", str(files / "t.lego"), "--target-ratio", "4", "-q").exit_code == 0
    result = run("decompress", str(files / "t.lego"), "-o", str(files / "t.safetensors"))
    assert result.exit_code == 0, result.output
    a, b = load_file(str(src)), load_file(str(files / "t.safetensors"))
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)


def test_exports_refuse_to_write_over_their_input(files):
    good = files / "good.lego"
    before = _digest(good)
    assert "refusing to write" in one_line_error(run("export-onnx", str(good), "--arch", "resnet20", "-o", str(good)))
    (files / "c").mkdir()
    inside = files / "c" / "model.c"
    inside.write_bytes(good.read_bytes())
    line = one_line_error(run("export-c", str(inside), "--arch", "resnet20", "-o", str(files / "c")))
    assert "refusing to write" in line and _digest(inside) == before == _digest(good)
