"""``legonet export-c`` and ``legonet footprint`` from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import legonet
from legonet.cli import main
from legonet.zoo import build


def test_footprint_cli_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    r = CliRunner().invoke(main, ["footprint", "--arch", "resnet20", "--block", "4", "--block", "8", "-k", "32",
                                  "-k", "256", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[: r.output.rindex("}") + 1])
    names = [e["scheme"] for e in data["entries"]]
    assert names[-2:] == ["legonet 4x4 K=32", "legonet 8x8 K=256"]
    assert png.stat().st_size > 1000


def test_footprint_cli_mismatched_settings_is_one_line():
    r = CliRunner().invoke(main, ["footprint", "--arch", "resnet20", "--block", "4", "--block", "8",
                                  "-k", "32", "-k", "64", "-k", "128"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--clusters" in r.output


def test_export_c_cli(tmp_path):
    cm = legonet.compress(build("resnet20"), legonet.LegoConfig(block=4, clusters=8,
                                                                kmeans=legonet.KMeansConfig(max_iters=3)))
    cm.save(tmp_path / "m.lego")
    r = CliRunner().invoke(main, ["export-c", str(tmp_path / "m.lego"), "--arch", "resnet20", "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"model.h", "model.c", "main.c", "firmware_main.c",
                                                           "firmware_startup.c", "mps2_an500.ld", "Makefile"}
    assert "flash (const arrays)" in r.output and "peak RAM" in r.output and "activation arena" in r.output
    bad = CliRunner().invoke(main, ["export-c", str(tmp_path / "m.lego"), "--arch", "resnet56", "-o", str(tmp_path / "d")])
    assert bad.exit_code == 1 and bad.output.startswith("legonet: error:") and bad.output.count("\n") == 1
    assert not (tmp_path / "d").exists()


ARCH_FILE = """
import torch.nn as nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
"""


def test_export_c_cli_architecture_from_a_file(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH_FILE)
    spec = {}
    exec(ARCH_FILE, spec)  # noqa: S102 - the test's own source
    cm = legonet.compress(spec["tiny"](), legonet.LegoConfig(block=2, clusters=4, kmeans=legonet.KMeansConfig(max_iters=2)))
    cm.save(tmp_path / "m.lego")
    args = ["export-c", str(tmp_path / "m.lego"), "--arch", f"{tmp_path / 'arch.py'}:tiny", "-o", str(tmp_path / "c")]
    r = CliRunner().invoke(main, [*args, "--input-size", "3,20,20"])
    assert r.exit_code == 0, r.output
    assert "#define LEGONET_IN_H 20" in (tmp_path / "c" / "model.h").read_text()
    assert "#define LEGONET_NUM_CLASSES 4" in (tmp_path / "c" / "model.h").read_text()
    missing = CliRunner().invoke(main, [*args[:3], f"{tmp_path / 'nope.py'}:tiny", "-o", str(tmp_path / "d")])
    assert missing.exit_code == 1 and "nope.py" in missing.output and missing.output.count("\n") == 1


def test_footprint_plot_errors_are_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    for target, words in ((tmp_path / "no" / "x.png", "does not exist"), (tmp_path / "x.foo", ".foo")):
        r = CliRunner().invoke(main, ["footprint", "--arch", "resnet20", "--plot", str(target)])
        assert r.exit_code == 1 and words in r.output.splitlines()[-1]
        assert not target.exists()
