"""The target-mode part of the speed benchmark: its summary, the merge with a previous file, its table."""

from __future__ import annotations

import math

import pytest

from benchmarks.speed import BUSY, TARGET_ROWS, merge_target_rows, target_markdown, target_summary


def measured(label: str, idle: float, busy: float, how: str = "api", limit: float | None = None,
             ratios: tuple[float, ...] = (8.0,)) -> dict:
    def run(seconds: float) -> dict:
        calls = [{"ratio": r, "compress_seconds": seconds / len(ratios), "threads": [2], "steps": ["clustering: 0.1 s"],
                  "file_bytes": 100, "file_ratio": r + 0.5} for r in ratios]
        return {"seconds": seconds, "run_seconds": [seconds], "calls": calls, "load_before": [1.0, 1.0, 1.0],
                "load_after": [1.5, 1.0, 1.0]}

    return {"row": label, "label": label, "arch": "resnet56", "ratios": list(ratios), "how": how, "limit_s": limit,
            "idle": run(idle), BUSY: run(busy)}


def test_summary_marks_the_time_limit_and_the_busy_slowdown():
    s = target_summary([measured("fast", 4.0, 7.9, limit=10), measured("slow", 12.0, 30.0, limit=10)])
    assert s["fast"]["idle_met"] and s["fast"]["busy_met"]
    assert not s["slow"]["idle_met"] and not s["slow"]["busy_met"]
    assert math.isclose(s["slow"]["busy_over_idle"], 2.5)


def test_summary_without_a_limit_has_no_idle_verdict_and_skipped_rows_are_left_out():
    s = target_summary([measured("free", 5.0, 5.0), {"label": "gone", "skipped": "weights not found: x"}])
    assert "idle_met" not in s["free"] and "gone" not in s


def test_summary_compares_one_call_over_the_ratios_with_one_call_per_ratio():
    ratios = (8.0, 12.0, 16.0)
    s = target_summary([measured("once", 6.0, 9.0, "cli", ratios=ratios),
                        measured("apart", 12.0, 12.0, "cli-separately", ratios=ratios)])
    assert s["once"]["at_once_over_separately"] == pytest.approx({"idle": 0.5, BUSY: 0.75})
    other = measured("apart", 12.0, 12.0, "cli-separately", ratios=(8.0,))  # not the same ratios
    unpaired = target_summary([measured("once", 6.0, 9.0, "cli", ratios=ratios), other])
    assert "at_once_over_separately" not in unpaired["once"]


def test_merge_keeps_previous_rows_not_measured_now_in_the_order_of_the_rows():
    first, second = TARGET_ROWS[0].label, TARGET_ROWS[1].label
    previous = [measured(second, 1.0, 1.0), measured(first, 1.0, 1.0), measured("retired", 1.0, 1.0)]
    merged = merge_target_rows(previous, [measured(second, 3.0, 3.0)])
    assert [r["label"] for r in merged] == [first, second, "retired"]
    assert merged[1]["idle"]["seconds"] == 3.0


def test_markdown_marks_met_and_missed_and_names_skipped_rows():
    rows = [measured("fast", 4.0, 5.0, limit=10), measured("slow", 12.0, 30.0, limit=10),
            {"label": "gone", "ratios": [8.0], "skipped": "weights not found: /x"}]
    text = "\n".join(target_markdown({"rows": rows, "summary": target_summary(rows), "busy_warmup_s": 5.0}))
    fast = next(line for line in text.splitlines() if line.startswith("| fast "))
    slow = next(line for line in text.splitlines() if line.startswith("| slow "))
    assert "missed" not in fast and fast.count("met") == 2
    assert slow.count("**missed**") == 2
    assert "skipped: weights not found: /x" in text
    assert all(line.count("|") == 12 for line in text.splitlines() if line.startswith("| "))
