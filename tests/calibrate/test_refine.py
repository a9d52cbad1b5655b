import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from legonet.calibrate.distill import feature_term
from legonet.calibrate.pipeline import calibrated_compress
from legonet.calibrate.refine import lr_factor, refine_codebooks
from legonet.config import LegoConfig, RefineConfig, TargetConfig
from legonet.compact import RECODE_RESERVE
from legonet.datafree.pipeline import datafree_compress
from legonet.errors import ConfigError
from legonet.target import compress_to_ratio
from tests.nets import assert_stored_exactly, conv_bn_net

MENU = (((4, 4), 16), ((2, 2), 16), ((1, 2), 64))


def feature_loss(*args) -> torch.Tensor:
    """The loss of :func:`feature_term` alone."""
    return feature_term(*args)[0]


def _net() -> nn.Module:
    return conv_bn_net(32)


def _kl(model, cm, x) -> float:
    student = _net()
    cm.load_into(student)
    with torch.no_grad():
        t, s = model(x), student.eval()(x)
    return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))


def test_refinement_brings_the_outputs_back_and_keeps_the_file_layout(tmp_path):
    model = _net()
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)
    cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
    indices = {n: ct.indices.clone() for n, ct in cm.clustered.items()}
    size = cm.save(tmp_path / "before.lego")
    before = _kl(model, cm, held_out)
    res = refine_codebooks(model, cm, calib, RefineConfig(epochs=10, batch_size=32, lr=1e-2))
    after = _kl(model, cm, held_out)
    assert res.steps == 40 and res.last_loss < res.first_loss
    assert after < 0.7 * before  # on images the refinement never saw
    for n, ct in cm.clustered.items():
        assert torch.equal(ct.indices, indices[n]) and ct.scale is not None
    assert cm.codebook_scales  # 12x stores some tensors compactly: their tuned values are on their codes
    assert_stored_exactly(cm)  # rounded to float16 or to their 8-bit codes
    # same blobs; only the SQNR numbers and the codes' fixed-width fields in the metadata change
    assert abs(cm.save(tmp_path / "after.lego") - size) <= (8 + RECODE_RESERVE) * len(cm.clustered)
    # the teacher keeps its weights
    torch.testing.assert_close(model.state_dict()["0.weight"], _net().state_dict()["0.weight"])


def test_refinement_is_deterministic():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    runs = []
    for _ in range(2):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        refine_codebooks(model, cm, calib, RefineConfig(epochs=2, batch_size=16, seed=3))
        runs.append(cm.to_bytes())
    assert runs[0] == runs[1]


def test_refining_a_file_with_the_norm_scales_in_its_gains(tmp_path):
    # data-free target mode moves every BatchNorm scale into the row gains (a negative scale makes a
    # negative gain) and stores the scales as the constant 1; refining such a model must keep the
    # signs (clamping the gains positive flips channels) and the constants (tuned, they would be
    # stored element by element: the file would grow)
    model = _net()
    state = model.state_dict()
    state["1.weight"] = state["1.weight"] * torch.where(torch.arange(32) % 2 == 0, -1.0, 1.0)
    model.load_state_dict(state)
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)
    cm, _ = datafree_compress(model, 12.0, menu=MENU)
    negative = cm.tensors["0.weight"].scale < 0
    assert int(negative.sum()) == 16 and bool((cm.tensors["1.weight"] == 1).all())
    size, before = cm.save(tmp_path / "before.lego"), _kl(model, cm, held_out)
    bias = cm.tensors["1.bias"].clone()
    refine_codebooks(model, cm, calib, RefineConfig(epochs=4, batch_size=32, lr=1e-2))
    assert torch.equal(cm.tensors["0.weight"].scale < 0, negative)
    assert bool((cm.tensors["1.weight"] == 1).all()) and not torch.equal(cm.tensors["1.bias"], bias)
    assert abs(cm.save(tmp_path / "after.lego") - size) <= 8 * len(cm.clustered)
    assert _kl(model, cm, held_out) < 0.7 * before


def test_norm_parameters_are_tuned_only_when_asked():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    for tune in (False, True):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        bias = cm.tensors["1.bias"].clone()
        res = refine_codebooks(model, cm, calib, RefineConfig(epochs=1, batch_size=32, tune_norms=tune))
        assert torch.equal(cm.tensors["1.bias"], bias) != tune
        # codebooks, one gain per output row (32 + 32 + 10), + 2 x 64 norm parameters when tuned
        assert res.tuned_parameters == sum(c.numel() for c in cm.codebooks) + 74 + 128 * tune
    # the classifier's bias is a weight, not a norm parameter: never tuned
    assert torch.equal(cm.tensors["7.bias"], model.state_dict()["7.bias"].half())


def test_calibrated_pipeline_refines_by_default():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    _, _, res = calibrated_compress(model, 12.0, calib, menu=MENU,
                                   config=TargetConfig(refine=RefineConfig(epochs=1, batch_size=32)))
    assert res.refine is not None and res.refine.steps == 2
    _, _, none = calibrated_compress(_net(), 12.0, calib, menu=MENU, config=TargetConfig(refine=None))
    assert none.refine is None


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(lr=0), dict(lr=2.0), dict(loss="l1"),
                                 dict(schedule="linear"), dict(feature_weight=-1.0), dict(feature_weight="1"),
                                 dict(feature_gate="soft"), dict(feature_fallback="l2"),
                                 dict(average=1.0), dict(average=-0.1), dict(average="0.9"),
                                 dict(precision="float16"), dict(precision="bf16"),
                                 dict(boundary_share=1.5), dict(boundary_share=-0.1), dict(boundary_share="0.5")])
def test_refine_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        RefineConfig(**bad)


def test_bfloat16_refinement_brings_the_outputs_back_as_float32_does():
    # the student's passes in bfloat16, everything tuned and stored as before; the held-out KL
    # falls by as much as float32 refinement's, within a margin for the coarser gradients
    model = _net()
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)
    after = {}
    for precision in ("float32", "bfloat16"):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        before = _kl(model, cm, held_out)
        res = refine_codebooks(model, cm, calib, RefineConfig(epochs=10, batch_size=32, lr=1e-2, precision=precision))
        after[precision] = _kl(model, cm, held_out)
        assert res.steps == 40 and after[precision] < 0.7 * before
        assert all(cb.dtype == torch.float32 for cb in cm.codebooks)
        assert_stored_exactly(cm)
    assert after["bfloat16"] < 1.2 * after["float32"]
    # and the two are not the same run: the option reaches the passes
    assert after["bfloat16"] != after["float32"]


def test_refinement_needs_clustered_tensors_and_images():
    model = _net()
    cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
    with pytest.raises(ConfigError, match="holds no samples"):
        refine_codebooks(model, cm, torch.empty(0, 3, 8, 8))
    from legonet import compress

    kept = compress(model, LegoConfig(include=("0.weight",), block=1, clusters=4))
    kept.tensors["0.weight"] = model.state_dict()["0.weight"].clone()
    with pytest.raises(ConfigError, match="nothing to refine"):
        refine_codebooks(model, kept, torch.randn(4, 3, 8, 8))


def test_average_writes_back_the_moving_average_of_the_steps():
    # two steps p1, p2 averaged with decay d: (d * p1 + p2) / (1 + d); the starting point not at all
    model = _net()
    calib = torch.randn(32, 3, 8, 8)
    start, _ = compress_to_ratio(model, 12.0, menu=MENU)
    runs = {}
    for key, epochs, decay in (("p1", 0.5, 0.0), ("p2", 1.0, 0.0), ("avg", 1.0, 0.75), ("one", 0.5, 0.75)):
        cm = copy.deepcopy(start)
        res = refine_codebooks(model, cm, calib, RefineConfig(epochs=epochs, batch_size=16, lr=1e-2, average=decay))
        assert res.steps == round(2 * epochs)
        runs[key] = cm
    # values are stored rounded: to float16, or to 8-bit codes (one int8 step, one log step each)
    for i, before in enumerate(start.codebooks):
        p1, p2 = runs["p1"].codebooks[i], runs["p2"].codebooks[i]
        assert not torch.equal(before, p1) and not torch.equal(p1, p2)
        grid = 2 * runs["avg"].codebook_scales.get(i, 0.0)
        tol = dict(rtol=2e-3, atol=2e-3 * float(before.abs().max()) + grid)
        torch.testing.assert_close(runs["avg"].codebooks[i], (0.75 * p1 + p2) / 1.75, **tol)
        torch.testing.assert_close(runs["one"].codebooks[i], p1, **tol)  # one step: its own value
    for name in start.clustered:
        p1, p2 = runs["p1"].clustered[name].scale, runs["p2"].clustered[name].scale
        code = runs["avg"].clustered[name].gain_code
        rtol = 2e-3 + (2 * code[1] if code else 0.0)
        torch.testing.assert_close(runs["avg"].clustered[name].scale, (0.75 * p1 + p2) / 1.75, rtol=rtol, atol=1e-4)


def test_cosine_schedule_decays_the_rate_to_near_zero():
    assert lr_factor(0, 64, "cosine") == 1.0
    assert lr_factor(32, 64, "cosine") == pytest.approx(0.5)
    assert lr_factor(63, 64, "cosine") < 0.001
    assert all(lr_factor(s, 64, "constant") == 1.0 for s in range(64))


def test_the_schedule_changes_the_refined_codebooks():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    refined = {}
    for schedule in ("constant", "cosine"):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        refine_codebooks(model, cm, calib, RefineConfig(epochs=4, batch_size=32, lr=1e-2, schedule=schedule))
        refined[schedule] = cm.codebooks
    assert any(not torch.equal(a, b) for a, b in zip(refined["constant"], refined["cosine"]))


def _feature_error(model, cm, x) -> float:
    """Relative squared error of the classifier's input features (those of ``model[-1]``)."""
    student = cm.load_into(_net()).eval()
    with torch.no_grad():
        t, s = model[:-1](x), student[:-1](x)
    return float((s - t).pow(2).sum() / t.pow(2).sum())


@pytest.mark.parametrize("cached", [True, False])
def test_feature_term_matches_the_classifier_input(cached):
    model = _net()
    calib, held_out = torch.randn(128, 3, 8, 8), torch.randn(64, 3, 8, 8)
    runs = {}
    for weight in (0.0, 10.0):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        before = _feature_error(model, cm, held_out)
        # 4 passes are cached teacher outputs, 1 pass (with flips: every image at most once) is per step
        cfg = RefineConfig(epochs=4 if cached else 1, batch_size=16, lr=1e-2, feature_weight=weight)
        res = refine_codebooks(model, cm, calib, cfg)
        runs[weight] = (res, before, _feature_error(model, cm, held_out))
    plain, features = runs[0.0], runs[10.0]
    assert plain[0].feature_layer is None and features[0].feature_layer == "7"  # the Linear head
    assert not model[-1]._forward_pre_hooks  # the caller's model keeps no hook
    assert features[0].first_loss > plain[0].first_loss  # the feature term adds to the loss
    assert features[2] < features[1] and features[2] < plain[2]


def test_feature_gate_scales_the_term_by_the_explained_share():
    teacher = torch.randn(8, 32)
    # no gate: weight x relative error
    s = (0.5 * teacher).requires_grad_(True)
    assert float(feature_loss(s, teacher, 10.0, "none").detach()) == pytest.approx(10.0 * 0.25, rel=1e-5)
    # explained: weight x (1 - 0.25) x 0.25, and the factor carries no gradient
    loss = feature_loss(s, teacher, 10.0, "explained")
    assert float(loss.detach()) == pytest.approx(10.0 * 0.75 * 0.25, rel=1e-5)
    loss.backward()
    plain = (0.5 * teacher).requires_grad_(True)
    (7.5 * (plain - teacher).pow(2).sum() / teacher.pow(2).sum()).backward()
    assert torch.allclose(s.grad, plain.grad)
    # features no closer than zeros (relative error >= 1): the term is off
    for far in (torch.zeros_like(teacher), -teacher, 3 * teacher):
        far = far.clone().requires_grad_(True)
        off = feature_loss(far, teacher, 10.0, "explained")
        assert float(off.detach()) == 0.0
        off.backward()
        assert not far.grad.abs().any()
    # an exact match: the full weight (and a zero term)
    assert float(feature_loss(teacher.clone(), teacher, 10.0, "explained")) == 0.0


def test_closed_gate_falls_back_to_the_cosine_distance():
    teacher = torch.randn(8, 4, 2)
    # relative error >= 1 (no closer than zeros): cosine distance per image, whatever the scale
    assert feature_term(3.0 * teacher, teacher, 1.0, "explained", "cosine")[1]
    assert not feature_term(teacher, teacher, 1.0, "explained", "cosine")[1]
    assert not feature_term(3.0 * teacher, teacher, 1.0, "none", "cosine")[1]
    assert not feature_term(3.0 * teacher, teacher, 1.0, "explained", "none")[1]
    assert float(feature_loss(3.0 * teacher, teacher, 10.0, "explained", "cosine")) == pytest.approx(0.0, abs=1e-5)
    assert float(feature_loss(-teacher, teacher, 10.0, "explained", "cosine")) == pytest.approx(20.0, rel=1e-5)
    far = (3.0 * teacher + torch.randn(8, 4, 2)).requires_grad_(True)
    loss = feature_loss(far, teacher, 10.0, "explained", "cosine")
    cos = torch.nn.functional.cosine_similarity(far.detach().flatten(1), teacher.flatten(1), dim=1)
    assert float(loss.detach()) == pytest.approx(10.0 * float((1 - cos).mean()), rel=1e-5)
    loss.backward()
    assert far.grad.abs().sum() > 0
    # without the fallback the closed gate is off; an open gate is unchanged by the fallback
    assert float(feature_loss(far.detach(), teacher, 10.0, "explained", "none")) == 0.0
    near = 0.5 * teacher
    assert float(feature_loss(near, teacher, 10.0, "explained", "cosine")) == pytest.approx(10.0 * 0.75 * 0.25, rel=1e-5)
    # gate "none": the relative term always, the fallback never
    assert float(feature_loss(3.0 * teacher, teacher, 1.0, "none", "cosine")) == pytest.approx(4.0, rel=1e-5)


def test_refinement_counts_the_steps_that_fell_back():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    results, codebooks = {}, {}
    for fallback in ("cosine", "none"):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        # every layer below the head scaled up: the head's input features are far off, the gate closed
        head = cm.clustered["7.weight"].codebook
        with torch.no_grad():
            for i, codebook in enumerate(cm.codebooks):
                if i != head:
                    codebook.mul_(4.0)
        results[fallback] = refine_codebooks(model, cm, calib, RefineConfig(epochs=1, batch_size=16,
                                                                           feature_fallback=fallback))
        codebooks[fallback] = [c.clone() for c in cm.codebooks]
    assert results["cosine"].fallback_steps > 0 and results["none"].fallback_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(codebooks["cosine"], codebooks["none"]))


def test_feature_term_without_a_linear_layer_refines_on_the_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 10, 6), nn.Flatten()).eval()
    cm, _ = compress_to_ratio(model, 8.0, menu=MENU)
    res = refine_codebooks(model, cm, torch.randn(32, 3, 8, 8), RefineConfig(epochs=1, batch_size=16,
                                                                             feature_weight=1.0))
    assert res.feature_layer is None and res.last_loss == res.last_loss


def test_refinement_restores_the_deterministic_algorithms_setting():
    # refinement asks for deterministic kernels while it runs (oneDNN weight gradients), then
    # hands the process-wide setting back as it found it
    model = _net()
    cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    refine_codebooks(model, cm, torch.randn(16, 3, 8, 8), RefineConfig(epochs=1, batch_size=16))
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_refinement_draws_from_the_images_and_their_boundary_views():
    model = _net()
    calib = torch.randn(64, 3, 8, 8)
    said = []
    runs = {}
    for share in (0.5, 0.0):
        cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
        runs[share] = refine_codebooks(model, cm, calib, RefineConfig(epochs=2, batch_size=16, boundary_share=share),
                                       say=said.append)
        runs[share, "file"] = cm.to_bytes()
    # as many views as images; the steps still count passes over the images
    assert runs[0.5].boundary_views == 64 and runs[0.5].steps == 8 and runs[0.5].views_skipped is None
    assert runs[0.0].boundary_views == 0 and runs[0.0].steps == 8 and runs[0.0].views_skipped is None
    assert runs[0.5, "file"] != runs[0.0, "file"]  # the views changed what was refined
    assert len(said) == 1 and said[0].startswith("boundary views of 64 images (share 0.5)")


def test_refinement_says_why_it_made_no_boundary_views():
    # one output per image: no runner-up class to move towards; refined on the images alone
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 1)).eval()
    cm, _ = compress_to_ratio(model, 4.0, menu=MENU)
    said = []
    res = refine_codebooks(model, cm, torch.randn(32, 3, 8, 8), RefineConfig(epochs=1, batch_size=16, loss="mse"),
                           say=said.append)
    assert res.boundary_views == 0 and "(N, classes >= 2)" in res.views_skipped
    assert said == [f"no boundary views: {res.views_skipped}"]


def test_chunked_batches_give_the_steps_of_whole_ones(monkeypatch):
    """Chunks accumulate the gradient of the whole batch: with the feature term ungated (a sum over
    the batch) the refined codebooks are those of whole batches, within float32 rounding."""
    import legonet.calibrate.refine as refine

    model = _net()
    calib = torch.randn(48, 3, 8, 8)
    cm, _ = compress_to_ratio(model, 12.0, menu=MENU)
    cfg = RefineConfig(epochs=2, batch_size=16, lr=1e-2, feature_gate="none", boundary_share=0.0)
    whole, chunked = copy.deepcopy(cm), copy.deepcopy(cm)
    said = []
    refine_codebooks(model, whole, calib, cfg, say=said.append)
    assert not any("chunks" in m for m in said)  # a tiny net's batch fits
    monkeypatch.setattr(refine, "_chunk_size", lambda *_a: 5)
    refine_codebooks(model, chunked, calib, cfg, say=said.append)
    assert any("chunks of 5" in m for m in said)
    a, b, start = (torch.cat([cb.flatten() for cb in m.codebooks]) for m in (whole, chunked, cm))

    def sqnr(x, y):  # dB of x against the difference y - x
        return 10 * torch.log10(x.pow(2).sum() / (y - x).pow(2).sum().clamp(min=1e-30))

    # float16 storage rounds a few values one step apart; refinement itself moved them far more
    assert sqnr(a, b) > 45 and sqnr(a, start) < 35


def test_chunk_size_keeps_the_saved_activations_within_the_budget():
    from legonet.calibrate.refine import _chunk_size

    class Wide(nn.Module):  # saves 4 MiB of activations per 1x64x64x64 sample, its input aside
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean((2, 3))

    net = Wide()
    x = torch.randn(2, 64, 64, 64)
    weights = lambda: {}  # noqa: E731 (the parameters themselves require gradients)
    assert _chunk_size(net, weights, x, RefineConfig(batch_size=64, activation_mib=4096), False) == 64
    small = _chunk_size(net, weights, x, RefineConfig(batch_size=64, activation_mib=16), False)
    assert 1 <= small < 16 and -(-64 // small) * small - 64 < -(-64 // small)  # equal chunks
    assert _chunk_size(net, weights, x, RefineConfig(batch_size=64, activation_mib=1), False) == 1
    # bfloat16 passes save half the bytes: larger chunks
    assert _chunk_size(net, weights, x, RefineConfig(batch_size=64, activation_mib=16), True) > small
