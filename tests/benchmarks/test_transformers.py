"""The transformer benchmark's command: legonet as table peers, failed rows, the time limit, the report."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from benchmarks.transformer_models import lm_perplexity
from benchmarks.transformer_peers import PEERS, Peer
from benchmarks.transformer_quant import original_bytes
from benchmarks.transformer_table import Task, run_task
from benchmarks.transformers import LegonetOvertime, LegonetPeers, family, main, markdown, selected
from tests.benchmarks.test_transformer_peers import calib_batches, tiny_lm


def tiny_task() -> Task:
    text = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)
    return Task("tiny", tiny_lm(), calib_batches(), lambda m: lm_perplexity(m, text, context=16))


def broken(model, calib):  # noqa: ARG001
    raise RuntimeError("no good\nsecond line")


def test_a_failing_method_is_a_row_with_its_one_line_error_and_the_table_goes_on():
    lines: list[str] = []
    peers = [Peer("broken", broken), next(p for p in PEERS if p.name == "rtn-int8-row")]
    result = run_task(tiny_task(), peers, lines.append)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["broken"]["failed"] == "RuntimeError: no good"
    assert "ratio" not in rows["broken"] and rows["rtn-int8-row"]["ratio"] > 3
    assert any("Traceback" in line and "broken" in line for line in lines)


def test_legonet_peers_compress_to_the_ratio_keep_their_log_and_leave_the_model_alone():
    task = tiny_task()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    legonet_peers = LegonetPeers(threads=1)
    peers = selected(legonet_peers.peers(), "datafree-8x,calibrated-8x")
    assert [p.name for p in peers] == ["legonet-datafree-8x", "legonet-calibrated-8x"]
    assert [p.calibrated for p in peers] == [False, True]
    result = run_task(task, peers, lambda _line: None)
    rows = {r["method"]: r for r in result["rows"]}
    for name in ("legonet-datafree-8x", "legonet-calibrated-8x"):
        assert 7 < rows[name]["ratio"] < 10, rows[name]
        assert rows[name]["file_bytes"] == round(original_bytes(task.model) / rows[name]["ratio"])
        assert abs(rows[name]["perplexity"] - rows["fp32 (original)"]["perplexity"]) < 20
        log = legonet_peers.logs[name]
        assert log["steps"] and log["threads"] == [1] and log["compress_seconds"] >= 0
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())


def test_a_legonet_run_past_the_limit_is_stopped():
    start = time.perf_counter()
    with pytest.raises(LegonetOvertime, match="x stopped after 1 s"), LegonetPeers(limit_s=1)._time_limit("x"):
        time.sleep(5)
    assert time.perf_counter() - start < 3
    with LegonetPeers(limit_s=0)._time_limit("x"):  # no limit: nothing armed
        pass


def test_families_group_peers_and_split_legonet_modes():
    assert family("rtn-int4-g64") == family("rtn-int8-row") == "rtn"
    assert family("legonet-datafree-8x") == "legonet data-free"
    assert family("legonet-calibrated-16x") == "legonet calibrated"


def lm_table() -> dict:
    def row(method, ratio, ppl):
        return {"method": method, "file_bytes": int(1000 / ratio), "ratio": ratio, "seconds": 1.0,
                "perplexity": ppl, "bits_per_byte": 3.3}
    return {"rows": [row("fp32 (original)", 1.0, 9.75), row("fp16 (every tensor)", 2.0, 9.75),
                     row("rtn-int4-g64", 7.3, 9.8), row("legonet-datafree-8x", 8.3, 9.78),
                     row("legonet-datafree-16x", 16.2, 10.1),
                     {"method": "legonet-calibrated-8x", "failed": "LegonetOvertime: stopped", "seconds": 900.0}]}


def encoder_table() -> dict:
    def row(method, ratio, cos):
        return {"method": method, "file_bytes": int(1000 / ratio), "ratio": ratio, "seconds": 1.0,
                "cosine": {"mean": cos, "min": cos - 0.01}, "nn_agreement": 0.9}
    return {"rows": [row("fp32 (original)", 1.0, 1.0), row("rtn-int8-row", 3.9, 0.9999991),
                     row("kmeans-2bit", 15.1, 0.98), row("legonet-calibrated-8x", 8.2, 0.99999)]}


def test_render_only_redraws_table_and_plots_from_the_json(tmp_path, capsys):
    result = {"quick": True, "torch": "x", "threads": 2, "legonet_threads": "legonet's choice",
              "load_avg_start": [1, 1, 1], "load_avg_end": [2, 2, 2], "commit": "abc", "legonet_uncommitted_changes": False,
              "models": {"byte-gpt": lm_table(), "byte-encoder": encoder_table()}}
    (tmp_path / "transformers.json").write_text(json.dumps(result))
    main(["--render-only", "--out", str(tmp_path)])
    table = (tmp_path / "transformers.md").read_text()
    assert table == markdown(result) and table in capsys.readouterr().out
    assert "| byte-gpt | legonet-calibrated-8x | - | failed: LegonetOvertime: stopped | 900.0 |" in table
    assert "| byte-encoder | legonet-calibrated-8x | 8.20 | cos 0.99999 (min 0.98999, NN 0.900) | 1.0 |" in table
    for name in ("lm", "encoder"):
        assert (tmp_path / f"transformers_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
