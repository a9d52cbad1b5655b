import pytest
import torch
from torch import nn

import legonet
from legonet.errors import ConfigError
from legonet.ops.bitpack import bits_for, packed_nbytes
from legonet.ops.scalar_codes import COMPACT_MIN_DISTORTION
from legonet.ops.tiling import make_tiling
from legonet.target import Choice, allocate, compress_to_ratio, evaluate_menu

# a short menu keeps these tests fast; the default menu is exercised once below
MENU = (((4, 8), 4), ((4, 4), 16), ((2, 2), 16), ((1, 2), 64))


def model_sd(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(256, 32))
    return m.state_dict()


@pytest.mark.parametrize("ratio, menu", [(6.0, MENU), (12.0, None), (20.0, MENU)])
def test_meets_the_ratio_in_file_bytes(ratio, menu, tmp_path):
    sd = model_sd()
    cm, plan = compress_to_ratio(sd, ratio, **({"menu": menu} if menu else {}))
    n = cm.save(tmp_path / "t.lego")
    fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in sd.values())
    assert fp32 / n >= ratio
    assert set(plan) == set(cm.clustered)
    back = legonet.load(tmp_path / "t.lego")
    assert all(torch.equal(back.reconstruct(k), cm.reconstruct(k)) for k in cm.tensors)


def test_higher_ratio_costs_accuracy_of_weights():
    sd = model_sd()
    errs = []
    for r in (6.0, 20.0):
        cm, _ = compress_to_ratio(sd, r, menu=MENU)
        errs.append(sum(float((cm.reconstruct(n).float() - sd[n]).pow(2).sum() / sd[n].pow(2).sum())
                        for n in cm.clustered))
    assert errs[0] < errs[1]


def test_allocate_spends_bytes_where_they_cut_distortion_most():
    tables = {
        "a": [Choice((4, 4), 2, 10, 1.0), Choice((4, 4), 16, 100, 0.1)],
        "b": [Choice((4, 4), 2, 10, 1.0), Choice((4, 4), 16, 100, 0.9)],
    }
    plan = allocate(tables, 115)
    assert plan["a"].clusters == 16 and plan["b"].clusters == 2
    assert sum(c.nbytes for c in allocate(tables, 1000).values()) == 200
    with pytest.raises(ConfigError, match="out of reach"):
        allocate(tables, 15)


def test_allocate_spends_what_the_lagrangian_search_leaves():
    # the hull steps from "a"'s 1x to its 100x entry; below that the search leaves 80 bytes unused,
    # which "b"'s middle entry (off its hull: not reachable by any lambda) fits in
    tables = {
        "a": [Choice((4, 4), 2, 10, 1.0), Choice((4, 4), 16, 200, 0.0)],
        "b": [Choice((4, 4), 2, 10, 1.0), Choice((4, 4), 4, 60, 0.8), Choice((4, 4), 16, 70, 0.3)],
    }
    plan = allocate(tables, 100)
    assert sum(c.nbytes for c in plan.values()) <= 100
    assert plan["a"].clusters == 2 and plan["b"].clusters == 16
    # nothing left that fits would lower the distortion
    free = 100 - sum(c.nbytes for c in plan.values())
    assert not any(c.distortion < plan[n].distortion and c.nbytes - plan[n].nbytes <= free
                   for n, t in tables.items() for c in t)


def test_bad_targets():
    with pytest.raises(ConfigError):
        compress_to_ratio(model_sd(), 0.5)
    with pytest.raises(ConfigError, match="out of reach|could not meet"):
        compress_to_ratio(model_sd(), 5000.0, menu=MENU)


def test_report_names_the_mixed_codebook_settings():
    cm, plan = compress_to_ratio(model_sd(), 12.0, menu=MENU)
    rep = cm.report()
    assert sum(n for _, n in rep.codebook_settings) == len(cm.codebooks) == len(plan)
    expected = {f"{c.block[0]}x{c.block[1]} K={c.clusters}" for c in plan.values()}
    assert {s for s, _ in rep.codebook_settings} == expected
    line = dict(rep.summary_lines())["codebooks"]
    assert line.startswith(f"{len(cm.codebooks)}") and rep.codebook_settings[0][0] in line
    # each tensor's own setting is in its row; no file-wide setting that no tensor uses
    rows = {r.name: r for r in rep.tensors}
    assert all(rows[n].block == c.block and rows[n].clusters == c.clusters for n, c in plan.items())
    assert len(expected) > 1 and rep.block is None and rep.clusters is None
    assert all(rows[n].indices in ("packed", "entropy-coded") and rows[n].gains in ("float16", "8-bit")
               for n in plan)


def test_unreachable_targets_are_refused_before_any_clustering(monkeypatch):
    from legonet import target

    def no_kmeans(*_a, **_k):
        raise AssertionError("clustered before refusing")

    monkeypatch.setattr(target, "evaluate_menu", no_kmeans)
    with pytest.raises(ConfigError, match=r"out of reach .* at most [0-9.]+x"):
        compress_to_ratio(model_sd(), 5000.0, menu=MENU)
    sd = model_sd()
    r = target.reach(sd, [n for n, t in sd.items() if t.ndim >= 2])
    assert r.fewest_bytes < r.packed_bytes and r.most > r.packed > 1


def test_menu_tries_each_gain_statistic_and_the_plan_uses_it():
    from legonet.ops.quant import choose_row_scales
    from legonet.target import evaluate_menu

    torch.manual_seed(3)
    # heavy-tailed rows: the statistics give different normalisations, hence different errors
    w = torch.distributions.StudentT(2.0).sample((32, 72))
    table = evaluate_menu(w, (((1, 1), 16), ((2, 2), 16)))
    assert sorted((c.block, c.scale_stat) for c in table) == [
        ((1, 1), "absmax"), ((1, 1), "rms"), ((2, 2), "absmax"), ((2, 2), "rms")]
    assert len({c.distortion for c in table}) == 4
    only = evaluate_menu(w, (((1, 1), 16),), scale_stats=("rms",))
    assert [c.scale_stat for c in only] == ["rms"]
    cm, plan = compress_to_ratio(model_sd(), 8.0, menu=MENU)
    assert cm.config.unshrink and cm.config.scales == "row"
    sd = model_sd()
    for name, choice in plan.items():
        # the stored gain is the chosen statistic times the unshrink factor (>= 1, small)
        factor = cm.clustered[name].scale / choose_row_scales(sd[name], stat=choice.scale_stat)
        assert float(factor.min()) > 0.99 and float(factor.max()) < 1.5


def test_caller_given_sensitivity_moves_bytes_to_the_sensitive_tensor():
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(128, 128, generator=g), "b": torch.randn(128, 128, generator=g)}
    menu = (((1, 1), 4), ((1, 1), 16), ((1, 1), 256))
    _, equal = compress_to_ratio(sd, 6.0, menu=menu)
    _, weighted = compress_to_ratio(sd, 6.0, menu=menu, sensitivity={"a": 100.0, "b": 0.01})
    # alike tensors, alike shares (to within the entropy estimates of their samples)
    assert equal["a"].clusters == equal["b"].clusters and abs(equal["a"].nbytes - equal["b"].nbytes) < 0.01 * equal["a"].nbytes
    assert weighted["a"].clusters > weighted["b"].clusters
    with pytest.raises(ConfigError, match="no sensitivity given for tensor 'b'"):
        compress_to_ratio(sd, 6.0, menu=menu, sensitivity={"a": 1.0})


def test_output_ranking_ignores_errors_the_inputs_never_see():
    from legonet.target import evaluate_menu

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    menu = (((1, 4), 4), ((1, 4), 64))
    cov = torch.zeros(64, 64)
    cov[:4, :4] = torch.eye(4)  # only the first 4 inputs are ever non-zero
    weights_only = evaluate_menu(w, menu, scale_stats=("rms",))
    outputs = evaluate_menu(w, menu, covariance=cov, scale_stats=("rms",))
    assert [(c.block, c.clusters, c.nbytes) for c in outputs] == [(c.block, c.clusters, c.nbytes) for c in weights_only]
    assert all(0 <= c.distortion <= 1 for c in outputs)
    # with identity inputs the output error is the weight error (after each row's best gain)
    same = evaluate_menu(w, menu, covariance=torch.eye(64), scale_stats=("rms",))
    assert same[1].distortion < same[0].distortion
    assert same[1].distortion == pytest.approx(weights_only[1].distortion, rel=0.5)
    assert outputs[0].distortion != pytest.approx(same[0].distortion, rel=0.05)


def test_gain_fitted_errors_are_scale_free_and_bounded():
    from legonet.ops.output_lsq import gain_fitted_errors

    torch.manual_seed(0)
    w, h = torch.randn(5, 8), torch.eye(8)
    assert torch.allclose(gain_fitted_errors(w, 3 * w, h), torch.zeros(5), atol=1e-6)
    assert torch.equal(gain_fitted_errors(w, -w, h), torch.ones(5))  # no positive gain helps
    ortho = torch.zeros(5, 8)
    ortho[:, 0] = 1.0
    w2 = w.clone()
    w2[:, 0] = 0.0
    assert torch.allclose(gain_fitted_errors(w2, ortho, h), torch.ones(5))
    assert torch.equal(gain_fitted_errors(torch.zeros(5, 8), w, h), torch.zeros(5))


def test_kernel_aligned_settings_are_offered_to_spatial_convolutions_only():
    from legonet.target import DEFAULT_MENU, KERNEL_MENU, menu_for

    conv = menu_for((64, 32, 3, 3))
    assert conv[: len(DEFAULT_MENU)] == list(DEFAULT_MENU)
    assert conv[len(DEFAULT_MENU):] == [((r, n * 9), k) for (r, n), k in KERNEL_MENU]
    assert menu_for((64, 32, 1, 1)) == list(DEFAULT_MENU)  # a 1x1 kernel: nothing to align to
    assert menu_for((64, 32)) == list(DEFAULT_MENU)
    assert menu_for((64, 32, 3, 3), kernel_menu=()) == list(DEFAULT_MENU)
    # a kernel of 2 makes (1, 2) blocks, already on the menu: offered once
    both = menu_for((8, 4, 1, 2), menu=(((1, 2), 64),), kernel_menu=(((1, 1), 64), ((1, 1), 8)))
    assert both == [((1, 2), 64), ((1, 2), 8)]


def test_kernel_aligned_blocks_win_where_kernels_repeat_a_few_patterns():
    from legonet.target import evaluate_menu

    # every 3x3 kernel is one of 8 patterns or its negative: a few whole-kernel centroids almost
    # suffice (the row gains scale the patterns a little differently per row), while square blocks
    # straddle kernels and see many more combinations
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(8, 9, generator=g)
    pick = torch.randint(0, 8, (64 * 32,), generator=g)
    sign = torch.where(torch.rand(64 * 32, generator=g) < 0.5, -1.0, 1.0)
    w = (patterns[pick] * sign[:, None]).reshape(64, 32, 3, 3)
    menu = (((1, 9), 16), ((4, 4), 256))
    aligned, square = evaluate_menu(w, menu, scale_stats=("rms",))
    assert aligned.nbytes < square.nbytes / 3 and aligned.distortion < square.distortion / 5
    cm, plan = compress_to_ratio({"w": w}, 16.0, menu=(((4, 4), 16), ((4, 4), 256)))
    assert plan["w"].block == (1, 9)
    assert float((cm.reconstruct("w") - w).pow(2).sum() / w.pow(2).sum()) < 0.01


def test_tensors_planned_with_a_large_error_store_gains_and_codebooks_in_8_bits():
    sd = model_sd()
    cm, plan = compress_to_ratio(sd, 20.0, menu=MENU)
    compact = {n for n, c in plan.items() if c.compact}
    assert compact and compact != set(plan)  # at 20x some tensors, not all
    assert all(c.compact == (c.distortion >= COMPACT_MIN_DISTORTION) for c in plan.values())
    assert {n for n, t in cm.clustered.items() if t.gain_code is not None} == compact
    assert {cm.tensors[n].codebook for n in compact} == set(cm.codebook_scales)
    assert cm.config.compact_storage
    # the bytes the plan counted are the bytes the file holds
    rep = cm.report()
    assert rep.scale_bytes == sum(sd[n].shape[0] * (1 if c.compact else 2) for n, c in plan.items())
    assert rep.index_bytes + rep.codebook_bytes + rep.scale_bytes == sum(c.nbytes for c in plan.values())


def test_a_choice_counts_indices_codebook_and_gains():
    w = model_sd()["2.weight"]
    for c in evaluate_menu(w, MENU, scale_stats=("rms",)):
        per_value = 1 if c.compact else 2
        blocks = make_tiling(tuple(w.shape), c.block).num_blocks
        assert c.nbytes == packed_nbytes(blocks, bits_for(c.clusters)) + per_value * (
            c.clusters * c.block[0] * c.block[1] + w.shape[0])


def test_entropy_estimates_that_miss_are_planned_again_until_the_file_fits(monkeypatch):
    import legonet.allocation as allocation
    import legonet.target as target

    g = torch.Generator().manual_seed(3)
    sd = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 64, generator=g)}
    # estimates far too low: the first plan overshoots the file, the next ones plan with more overhead
    monkeypatch.setattr(allocation, "estimated_stream_nbytes", lambda labels, k, count: 1)
    plans = []
    monkeypatch.setattr(target, "allocate", lambda tables, budget: plans.append(allocate(tables, budget)) or plans[-1])
    cm, plan = compress_to_ratio(sd, 6.0)
    assert cm.report().ratio >= 6.0
    assert len(plans) >= 2
