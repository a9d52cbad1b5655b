"""Tied weights: a tensor listed under several names is compressed, stored and counted once, and
rebuilt under every name, in the paper's setting, data-free and calibrated target mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import legonet
from legonet.aliases import alias_problem, shared_tensor_aliases, with_aliases
from legonet.clustering import as_state_dict, state_dict_and_aliases
from legonet.config import RefineConfig, TargetConfig
from legonet.errors import ArchitectureError, ConfigError
from legonet.format import deserialize, load
from legonet.report import fp32_bytes

VOCAB, DIM = 2048, 32


class TinyDecoder(nn.Module):
    """Token embedding, one residual MLP layer, a norm and an output head that reuses the embedding
    (``tie=True``, as many language models do) or holds a copy of it; ``(N, T)`` ids in, logits out."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        with torch.no_grad():
            if tie:
                self.head.weight = self.tok.weight
            else:
                self.head.weight.copy_(self.tok.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        x = x + torch.relu(self.mix(x))
        return self.head(self.norm(x))


def _ids(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def _assert_rebuilt_under_every_name(cm: legonet.CompressedModel) -> None:
    sd = cm.to_state_dict()
    assert set(sd) == set(TinyDecoder().state_dict())
    assert sd["head.weight"] is sd["tok.weight"]
    tied = cm.load_into(TinyDecoder())
    assert tied.head.weight is tied.tok.weight and torch.equal(tied.tok.weight, sd["tok.weight"])
    untied = cm.load_into(TinyDecoder(tie=False))
    assert torch.equal(untied.head.weight, sd["tok.weight"]) and torch.equal(untied.tok.weight, sd["tok.weight"])


# -- finding aliases -------------------------------------------------------------------------------
def test_only_the_same_view_of_one_storage_is_an_alias():
    base = torch.randn(6, 4)
    sd = {"a": base, "b": base.view(6, 4), "row": base[1:], "t": base.t(), "as_int": base.view(torch.int32),
          "copy": base.clone(), "empty": torch.empty(0), "empty2": torch.empty(0), "c": base}
    assert shared_tensor_aliases(sd) == {"b": "a", "c": "a"}


def test_a_tied_tensor_is_listed_once_from_a_module_or_its_state_dict():
    model = TinyDecoder()
    for given in (model, model.state_dict()):
        sd, aliases = state_dict_and_aliases(given)
        assert aliases == {"head.weight": "tok.weight"}
        assert "head.weight" not in sd and list(sd) == list(as_state_dict(given))
    assert state_dict_and_aliases(TinyDecoder(tie=False))[1] == {}


def test_alias_problems_are_named():
    names = ["tok.weight", "mix.weight"]
    assert alias_problem({"head.weight": "tok.weight"}, names) is None
    assert "missing tensor 'gone'" in alias_problem({"head.weight": "gone"}, names)
    assert "also the name of a stored tensor" in alias_problem({"mix.weight": "tok.weight"}, names)
    assert "not a pair of tensor names" in alias_problem({"head.weight": 3}, names)
    t = torch.ones(2)
    assert with_aliases({"a": t}, {"b": "a"})["b"] is t


# -- the three modes -------------------------------------------------------------------------------
def test_papers_setting_stores_and_counts_a_tied_tensor_once(tmp_path):
    cfg = legonet.LegoConfig(block=2, clusters=16, scope="layer", codebook_dtype="float16")
    tied, twin = legonet.compress(TinyDecoder(), cfg), legonet.compress(TinyDecoder(tie=False), cfg)
    assert tied.aliases == {"head.weight": "tok.weight"} and twin.aliases == {}
    assert set(tied.clustered) == {"tok.weight", "mix.weight"} and len(tied.codebooks) == 2
    tied_bytes, twin_bytes = tied.save(tmp_path / "tied.lego"), twin.save(tmp_path / "twin.lego")
    # the embedding and its copy are most of the twin's file
    assert 0.45 < tied_bytes / twin_bytes < 0.6, (tied_bytes, twin_bytes)
    rep, twin_rep = tied.report(), twin.report()
    assert rep.original_fp32_bytes == fp32_bytes(as_state_dict(TinyDecoder())) \
        == twin_rep.original_fp32_bytes - 4 * VOCAB * DIM
    assert rep.num_weights == twin_rep.num_weights - VOCAB * DIM
    assert dict(rep.summary_lines())["tied tensors (stored once)"] == "head.weight = tok.weight"
    assert "tied tensors (stored once)" not in dict(twin_rep.summary_lines())
    back = load(tmp_path / "tied.lego")
    assert back.aliases == tied.aliases
    assert torch.equal(back.to_state_dict()["head.weight"], tied.to_state_dict()["head.weight"])
    _assert_rebuilt_under_every_name(back)


def test_data_free_target_mode_counts_a_tied_tensor_once():
    model = TinyDecoder()
    for given in (model, model.state_dict()):  # the data-free pipeline, then target mode tensor by tensor
        cm = legonet.compress(given, target_ratio=8)
        assert cm.aliases == {"head.weight": "tok.weight"} and "head.weight" not in cm.tensors
        assert fp32_bytes(as_state_dict(model)) / len(cm.to_bytes()) >= 8
        assert cm.report().ratio >= 8
        _assert_rebuilt_under_every_name(deserialize(cm.to_bytes()))
    assert model.head.weight is model.tok.weight  # the model given is not changed


def test_calibrated_target_mode_on_a_tied_model():
    model = TinyDecoder().eval()
    ids = _ids()
    cfg = TargetConfig(refine=RefineConfig(epochs=1, batch_size=2))
    cm = legonet.compress(model, cfg, target_ratio=6, calib=ids)
    assert "refinement" in [name for name, _ in cm.log.steps]
    assert cm.aliases == {"head.weight": "tok.weight"} and "head.weight" not in cm.tensors
    assert cm.report().ratio >= 6
    _assert_rebuilt_under_every_name(deserialize(cm.to_bytes()))
    out = cm.load_into(TinyDecoder())
    with torch.no_grad():
        assert out(ids[0]).shape == (2, 8, VOCAB)
    assert model.head.weight is model.tok.weight


# -- what cannot take aliases refuses them in one line ---------------------------------------------
def test_exporters_and_lean_modules_refuse_tied_tensors():
    from legonet.export.c.network import lower_network
    from legonet.export.onnx import build_onnx

    cm = legonet.compress(TinyDecoder(), legonet.LegoConfig(block=4, clusters=8))
    with pytest.raises(ConfigError, match="ONNX export does not support tied tensors: 'head.weight' shares"):
        build_onnx(cm, TinyDecoder(), (8,))
    with pytest.raises(ArchitectureError, match="C export does not support tied tensors"):
        lower_network(cm, TinyDecoder(), (1, 1, 8))
    from legonet.nn.convert import convert

    with pytest.raises(ArchitectureError, match=r"The lean runtime \(legonet.nn\) does not support tied tensors: 'head.weight' shares"):
        convert(TinyDecoder(), cm)
