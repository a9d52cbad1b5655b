"""``legonet.compress``: one entry point for the paper's setting, data-free and calibrated target mode,
on models built in code (including a model that takes keyword arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import legonet
from legonet import ConfigError, LegoConfig, RefineConfig, TargetConfig
from tests.nets import cli_net, conv_bn_net


def fp32_bytes(model: nn.Module) -> int:
    return sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
               for t in model.state_dict().values())


def test_the_papers_setting_on_a_module_or_a_state_dict():
    model = conv_bn_net()
    a = legonet.compress(model, LegoConfig(block=2, clusters=8))
    b = legonet.compress(model.state_dict(), LegoConfig(block=2, clusters=8))
    assert a.to_bytes() == b.to_bytes() and len(a.codebooks) == 1
    assert legonet.compress(model).config == LegoConfig()  # the paper's 4x4, K=32 by default


def test_data_free_target_mode_meets_the_ratio_and_leaves_the_model_alone():
    model = cli_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = legonet.compress(model, target_ratio=3)
    assert fp32_bytes(model) / len(cm.to_bytes()) >= 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    steps = [name for name, _ in cm.log.steps]
    assert steps[:2] == ["estimating settings", "clustering"] and "bias correction" in steps
    assert any(n.startswith("data-free bias correction") for n in cm.log.notes)


def test_a_state_dict_is_compressed_without_the_passes_that_need_the_structure():
    cm = legonet.compress(cli_net().state_dict(), target_ratio=3)
    assert "bias correction" not in [name for name, _ in cm.log.steps]


def test_calibrated_target_mode_with_a_tensor_of_images():
    model = cli_net()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = TargetConfig(refine=RefineConfig(epochs=1, batch_size=8))
    cm = legonet.compress(model, cfg, target_ratio=3, calib=x)
    assert fp32_bytes(model) / len(cm.to_bytes()) >= 3
    steps = [name for name, _ in cm.log.steps]
    for step in ("input statistics", "layer fit", "BatchNorm re-estimation", "refinement"):
        assert step in steps
    # the model given is not changed: channel grouping and the compressed weights went to a copy
    fresh = cli_net()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    # and the file fits the original architecture: grouping reorders channels consistently
    out = cm.load_into(cli_net())
    with torch.no_grad():
        assert out(x).shape == (16, 10)


class TokenModel(nn.Module):
    """A tiny language model taking keyword arguments, returning an object with ``logits`` (as
    Hugging Face models do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.emb(input_ids)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        if attention_mask is not None:
            h = h * attention_mask[..., None]

        class Output(dict):
            pass

        return Output(logits=self.head(h))


@pytest.mark.parametrize("form", ["dict", "tuple", "generator"])
def test_calibration_takes_what_the_model_takes(form):
    model = TokenModel().eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 50, (4, 12), generator=g) for _ in range(3)]
    mask = torch.ones(4, 12)
    batches = {"dict": [{"input_ids": i, "attention_mask": mask} for i in ids],
               "tuple": [(i, mask) for i in ids],
               "generator": ({"input_ids": i} for i in ids)}[form]
    cfg = TargetConfig(refine=RefineConfig(epochs=2), batch_size=4)
    cm = legonet.compress(model, cfg, target_ratio=2.5, calib=batches)
    assert fp32_bytes(model) / len(cm.to_bytes()) >= 2.5
    assert any("no boundary views" in n for n in cm.log.notes)  # images only: said, not silently skipped
    assert any("refined codebooks on 12 calibration samples" in n for n in cm.log.notes)
    with torch.no_grad():
        out = cm.load_into(TokenModel())(ids[0])["logits"]
        ref = model(ids[0])["logits"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("kwargs, says", [
    ({"config": TargetConfig()}, "needs target_ratio"),
    ({"calib": torch.zeros(2, 3, 8, 8)}, "give target_ratio as well"),
    ({"target_ratio": 4, "config": LegoConfig()}, "takes a TargetConfig"),
    ({"target_ratio": 1.0}, "must be a number > 1"),
    ({"target_ratio": True}, "must be a number > 1"),
    ({"config": "4x4"}, "must be a LegoConfig or a TargetConfig"),
])
def test_settings_that_do_not_fit_the_mode_are_refused(kwargs, says):
    with pytest.raises(ConfigError, match=says):
        legonet.compress(conv_bn_net(), **kwargs)


def test_calibration_needs_the_module():
    with pytest.raises(ConfigError, match="needs the model itself"):
        legonet.compress(conv_bn_net().state_dict(), target_ratio=3, calib=torch.zeros(2, 3, 8, 8))


def test_progress_reaches_the_callback():
    seen = []
    legonet.compress(conv_bn_net(), target_ratio=3, progress=lambda task, done, total: seen.append((task, done, total)))
    assert ("estimating settings", 1, 3) in seen and any(t == "clustering" for t, _, _ in seen)


def test_target_config_rejects_unknown_keys_and_reads_nested_mappings():
    with pytest.raises(ConfigError, match="unknown target config key"):
        TargetConfig.from_dict({"refine_epochs": 3})
    cfg = TargetConfig.from_dict({"refine": {"epochs": 2}, "layer_fit": False, "seed": 3})
    assert cfg.refine == RefineConfig(epochs=2) and cfg.layer_fit is None and cfg.seed == 3
    assert TargetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="refine config key"):
        TargetConfig.from_dict({"refine": {"epoch": 2}})
