"""Thread choice: a pure function of (cores, load, own share of the load); a scope that restores."""

from __future__ import annotations

import time

import pytest
import torch

from legonet import threads
from legonet.errors import ConfigError
from legonet.threads import choose_threads, using_threads


@pytest.mark.parametrize(
    "cores,load,own,expected",
    [
        (2, 0.0, 0.0, 2),  # idle machine: every core
        (2, 2.0, 2.0, 2),  # the load is this process's own threads
        (2, 2.0, 0.0, 1),  # two busy processes beside a fresh one: one thread
        (2, 1.0, 0.0, 1),  # one busy process: the one free core
        (2, 0.4, 0.0, 2),  # a light background load does not take a core away
        (2, 0.6, 0.0, 1),  # most of a core taken: counts as busy
        (2, 9.0, 1.0, 1),  # overloaded: never fewer than one
        (16, 5.0, 1.0, 12),
        (16, 3.0, 4.0, 16),  # own share above the load (averaging lag): no negative load
        (1, 0.0, 0.0, 1),
    ],
)
def test_choice_is_the_free_cores_rounded_and_at_least_one(cores, load, own, expected):
    assert choose_threads(cores, load, own) == expected


def test_choice_never_grows_with_the_load():
    counts = [choose_threads(8, load / 4, 0.0) for load in range(0, 64)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 8 and counts[-1] == 1


def test_choice_rejects_no_cores():
    with pytest.raises(ConfigError):
        choose_threads(0, 0.0, 0.0)


def test_auto_threads_feeds_the_rule_what_the_os_reports_now(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_now", lambda: (3.0, 1.0))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # not consulted
    assert threads.auto_threads() == 2


def test_auto_threads_falls_back_on_the_load_average(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_now", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    monkeypatch.setattr(threads, "own_load", lambda: 1.0)
    assert threads.auto_threads() == 2


def test_auto_threads_without_any_report_uses_every_core(monkeypatch):
    def missing():
        raise OSError("no load average")

    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.setattr(threads, "busy_now", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", missing)
    assert threads.auto_threads() == 3


def test_busy_now_sees_a_busy_process_beside_it():
    import subprocess
    import sys

    idle = threads.busy_now(0.2)
    if idle is None:
        pytest.skip("/proc/stat is not readable here")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.3)
        busy, own = threads.busy_now(0.3)
    finally:
        spinner.kill()
    assert busy >= 0.7 and own < 0.2  # the spinner's core, not this process's


def test_load_share_counts_a_young_process_for_little_and_an_old_one_for_its_threads():
    assert threads.load_share(3.0, 3.0) < 0.06  # one busy core for 3 s: the average barely moved
    assert threads.load_share(1200.0, 600.0) == pytest.approx(2.0, abs=1e-3)  # two cores for 10 min
    assert threads.load_share(0.0, 100.0) == 0.0


def test_own_load_of_this_process_is_within_its_cores():
    assert 0.0 <= threads.own_load() <= threads.usable_cores()


def test_using_threads_sets_and_restores():
    before = torch.get_num_threads()
    with using_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_using_threads_restores_when_the_block_raises():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with using_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_using_threads_none_chooses_automatically(monkeypatch):
    monkeypatch.setattr(threads, "auto_threads", lambda: 1)
    before = torch.get_num_threads()
    with using_threads(None) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_nested_scopes_restore_in_order():
    before = torch.get_num_threads()
    with using_threads(2):
        with using_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_using_threads_rejects_bad_counts_without_touching_the_setting(bad):
    before = torch.get_num_threads()
    with pytest.raises(ConfigError):
        with using_threads(bad):
            pass
    assert torch.get_num_threads() == before
