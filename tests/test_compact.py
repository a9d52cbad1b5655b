import pytest
import torch

import legonet
from legonet.compact import (
    COMPACT_MAX_SQNR_DB,
    compact_by_sqnr,
    recode_compact,
    store_compact,
)
from legonet.errors import ConfigError, FormatError
from legonet.format import deserialize, serialize


def state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(32, 16, 3, 3, generator=g), "b.weight": torch.randn(64, 32, generator=g),
            "b.bias": torch.randn(64, generator=g)}


def layer_model(clusters=4):
    return legonet.compress(state_dict(), legonet.LegoConfig(block=(2, 2), clusters=clusters, scope="layer",
                                                             scales="row", codebook_dtype="float16"))


def test_compact_storage_halves_gains_and_codebooks_and_round_trips():
    plain = layer_model()
    cm = layer_model()
    assert store_compact(cm, ["a.weight", "b.weight"]) == ["a.weight", "b.weight"]
    assert all(t.gain_code is not None for t in cm.clustered.values()) and set(cm.codebook_scales) == {0, 1}
    data = serialize(cm)
    assert len(data) < len(serialize(plain)) - (32 + 64) + 8  # one byte saved per gain at least
    back = deserialize(data)
    assert serialize(back) == data
    for n in cm.tensors:
        assert torch.equal(back.reconstruct(n), cm.reconstruct(n))
    rep = back.report()
    assert rep.compact_tensors == 2 and rep.scale_bytes == 32 + 64
    assert rep.codebook_bytes == sum(cb.numel() for cb in cm.codebooks)  # one byte per value


def test_added_error_is_negligible_beside_a_low_sqnr_clustering():
    sd = state_dict()
    plain, cm = layer_model(), layer_model()
    store_compact(cm, list(cm.clustered))
    for n, ct in plain.clustered.items():
        assert ct.sqnr_db <= COMPACT_MAX_SQNR_DB  # K=4 on random weights: the case compact storage is for
        err = float((plain.reconstruct(n) - sd[n]).pow(2).sum())
        added = float((cm.reconstruct(n) - plain.reconstruct(n)).pow(2).sum())
        assert added < 0.01 * err


def test_a_shared_codebook_is_coded_only_when_all_its_tensors_are():
    sd = state_dict()
    cm = legonet.compress(sd, legonet.LegoConfig(block=(2, 2), clusters=4, scales="row"))  # one codebook
    store_compact(cm, ["a.weight"])
    assert cm.codebook_scales == {} and cm.tensors["a.weight"].gain_code is not None
    assert cm.tensors["b.weight"].gain_code is None
    store_compact(cm, ["a.weight", "b.weight"])
    assert set(cm.codebook_scales) == {0}
    assert torch.equal(deserialize(serialize(cm)).reconstruct("b.weight"), cm.reconstruct("b.weight"))


def test_unknown_or_unclustered_names_are_named():
    cm = layer_model()
    with pytest.raises(ConfigError, match="'nope' is not a clustered tensor"):
        store_compact(cm, ["a.weight", "nope"])
    with pytest.raises(ConfigError, match="'b.bias' is not a clustered tensor"):
        store_compact(cm, ["b.bias"])
    assert cm.codebook_scales == {} and all(t.gain_code is None for t in cm.clustered.values())


def test_values_changed_after_compact_storage_must_be_recoded_before_writing():
    cm = layer_model()
    store_compact(cm, list(cm.clustered))
    cm.tensors["a.weight"].scale = cm.tensors["a.weight"].scale * 3.0  # e.g. a BatchNorm scale folded in
    with pytest.raises(FormatError, match="row gains of 'a.weight' are not on their log code"):
        serialize(cm)
    recode_compact(cm)
    serialize(cm)
    cm.codebooks[1] = cm.codebooks[1] * 1.01
    with pytest.raises(FormatError, match="codebook 1 is not on its int8 grid"):
        serialize(cm)
    before = [cb.clone() for cb in cm.codebooks]
    recode_compact(cm)
    assert torch.allclose(cm.codebooks[1], before[1], rtol=0, atol=float(before[1].abs().max()) / 200)
    assert torch.equal(cm.codebooks[0], before[0])  # on its grid: untouched
    assert torch.equal(deserialize(serialize(cm)).reconstruct("b.weight"), cm.reconstruct("b.weight"))


def test_config_compact_storage_codes_low_sqnr_tensors_only():
    g = torch.Generator().manual_seed(3)
    easy = torch.randn(4, 2, generator=g).repeat(8, 8)  # 32x16 of 2x2 blocks taking 4 values: exact at K=4
    sd = {"easy.weight": easy + 1e-4 * torch.randn(32, 16, generator=g), **state_dict()}
    cfg = legonet.LegoConfig(block=(2, 2), clusters=4, scope="layer", scales="row", compact_storage=True)
    cm = legonet.compress(sd, cfg)
    assert cm.tensors["easy.weight"].sqnr_db > COMPACT_MAX_SQNR_DB and cm.tensors["easy.weight"].gain_code is None
    assert cm.tensors["b.weight"].gain_code is not None
    back = deserialize(serialize(cm))
    assert back.config.compact_storage and back.report().compact_tensors == 2
    assert compact_by_sqnr(layer_model(), max_sqnr_db=-100.0) == []
