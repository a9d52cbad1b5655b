"""The command's plumbing: tables, plots, argument errors."""

from __future__ import annotations

import csv
import json

import pytest

from benchmarks import experiments as ex
from benchmarks.reproduce import main, write_outputs, write_table


def test_write_table_csv_and_json(tmp_path):
    rows = [{"a": 1, "s": {"block": [4, 4]}}, {"a": 2.5, "b": None}]
    write_table(rows, tmp_path / "t.csv")
    got = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert got[0]["s"] == '{"block": [4, 4]}' and got[1]["a"] == "2.5" and got[1]["b"] == ""
    assert json.loads((tmp_path / "t.json").read_text()) == rows


def test_unknown_model_or_experiment_is_one_line_error(capsys):
    assert main(["--models", "nope", "--out", "/nonexistent"]) == 1
    assert "unknown model or experiment: nope" in capsys.readouterr().err


def test_outputs_include_plots_and_tables(bench, tmp_path):
    pytest.importorskip("matplotlib")
    res = {"bench": bench, "plan": {"sweep_images": 64},
           "fig4": ex.fig4(bench, 64, ks=(2, 8)), "peers": ex.peers(bench, 64, [("rtn", {"bits": 4})])}
    res["fig3"], res["fig3_points"] = ex.fig3(bench, 64, blocks=(2,), tolerances=(100.0,), ks=(2, 4))
    written = {p.name for p in write_outputs({"tiny": res}, tmp_path)}
    assert {"fig4_tiny.png", "fig3_tiny.png", "pareto_tiny.png", "fig4.csv", "peers.csv", "best_within.csv"} <= written
    assert (tmp_path / "pareto_tiny.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_order_defers_large_headlines_and_runs_target_mode_last():
    from benchmarks.reproduce import stage_order

    plans = {"small": {}, "large": {"defer_headline": True}}
    order = stage_order(["headline", "fig4", "peers", "target"], plans)
    assert order == [("headline", "small"), ("fig4", "small"), ("fig4", "large"), ("peers", "small"),
                     ("peers", "large"), ("headline", "large"), ("target", "small"), ("target", "large")]
    assert stage_order(["fig4"], plans) == [("fig4", "small"), ("fig4", "large")]


def test_default_run_is_the_paper_and_the_peers_target_mode_opt_in():
    from benchmarks.reproduce import DEFAULT_EXPERIMENTS, EXPERIMENTS

    assert "target" not in DEFAULT_EXPERIMENTS and set(DEFAULT_EXPERIMENTS) | {"target"} == set(EXPERIMENTS)


def test_pareto_plot_overlays_target_mode_points(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plots import plot_pareto

    recs = [{"model": "m", "method": "rtn", "setting": {"bits": b}, "ratio": 32 / b, "top1": t}
            for b, t in ((8, 0.8), (4, 0.7))]
    tm = {"test_images": 10000, "baseline_top1": 0.81,
          "rows": [{"mode": "data-free", "file_ratio": 6.1, "top1": 0.80}, {"mode": "data-free", "file_ratio": 8.2, "top1": 0.79},
                   {"mode": "peer rtn", "bits": 4, "file_ratio": 7.4, "top1": 0.78}]}
    path = plot_pareto(recs, {"top1": 0.8, "n": 100}, tmp_path / "p.png", tm)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cached_only_rebuild_keeps_the_timed_runs_info(tmp_path):
    (tmp_path / "run_info.json").write_text(json.dumps({"seconds": 1234.5, "fresh": True, "cpus": 2}))
    assert main(["--quick", "--cached-only", "--out", str(tmp_path)]) == 0  # empty cache: nothing measured
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["seconds"] == 1234.5 and info["fresh"] is True and info["tables_rebuilt"]
    assert "wall time 1234.5 s on 2 CPUs" in (tmp_path / "summary.md").read_text()
