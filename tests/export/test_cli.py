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
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"model.h", "model.c", "main.c"}
    assert "flash (const arrays)" in r.output and "peak RAM" in r.output
    bad = CliRunner().invoke(main, ["export-c", str(tmp_path / "m.lego"), "--arch", "resnet56", "-o", str(tmp_path / "d")])
    assert bad.exit_code == 1 and bad.output.startswith("legonet: error:") and bad.output.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_footprint_plot_errors_are_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    for target, words in ((tmp_path / "no" / "x.png", "does not exist"), (tmp_path / "x.foo", ".foo")):
        r = CliRunner().invoke(main, ["footprint", "--arch", "resnet20", "--plot", str(target)])
        assert r.exit_code == 1 and words in r.output.splitlines()[-1]
        assert not target.exists()
