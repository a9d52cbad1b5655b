"""Several target ratios share one analysis of the weights, and give the files single runs give."""

from __future__ import annotations

import torch
from torch import nn

import legonet
from legonet.menu_cache import MenuCache


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.Flatten(), nn.LazyLinear(10)).eval()


def _model() -> nn.Module:
    m = _net()
    m(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    return m


def test_ratio_list_equals_single_runs_and_reuses_estimates(monkeypatch):
    import legonet.target as target

    model = _model()
    calls = []
    real = target.evaluate_menu
    monkeypatch.setattr(target, "evaluate_menu", lambda *a, **k: calls.append(1) or real(*a, **k))
    many = legonet.compress(model, target_ratio=[4, 6])
    once = len(calls)
    assert isinstance(many, list) and len(many) == 2
    assert once == 3  # each of the three clustered tensors analysed once for both ratios
    for cm, r in zip(many, (4, 6)):
        single = legonet.compress(model, target_ratio=r)
        assert cm.to_bytes() == single.to_bytes()
    assert len(calls) == once + 2 * 3  # single runs analyse again


def test_cache_hits_on_same_weights_misses_on_changed_ones():
    cache = MenuCache()
    w = torch.randn(8, 8)
    calls = []
    key = MenuCache.key("w", w, ((1, 1), 4), 0, True)
    cache.get_or_evaluate(key, lambda: calls.append(1) or ["a"])
    assert cache.get_or_evaluate(MenuCache.key("w", w.clone(), ((1, 1), 4), 0, True), lambda: ["b"]) == ["a"]
    w2 = w.clone()
    w2[0, 0] += 1
    assert cache.get_or_evaluate(MenuCache.key("w", w2, ((1, 1), 4), 0, True), lambda: ["c"]) == ["c"]
    assert cache.get_or_evaluate(MenuCache.key("w", w, ((1, 1), 4), 1, True), lambda: ["d"]) == ["d"]
    assert (cache.hits, cache.misses, len(cache)) == (1, 3, 3)


def test_empty_ratio_list_is_refused():
    import pytest

    with pytest.raises(legonet.errors.ConfigError, match="empty"):
        legonet.compress(_model(), target_ratio=[])


def test_a_bad_ratio_in_a_list_is_refused_before_any_work(monkeypatch):
    import pytest

    import legonet.target as target

    monkeypatch.setattr(target, "evaluate_menu", lambda *a, **k: pytest.fail("compressed before checking"))
    with pytest.raises(legonet.errors.ConfigError, match="must be a number > 1, got 0.5"):
        legonet.compress(_model(), target_ratio=[8, 0.5])
