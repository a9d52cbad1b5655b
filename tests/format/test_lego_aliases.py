"""Format version 5: ``aliases``, one stored tensor under several names (tied weights)."""

from __future__ import annotations

import pytest
import torch
from lego_craft import join, split

import legonet
from legonet.errors import FormatError
from legonet.format import deserialize, load


def _tied_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 8, generator=g)
    bias = torch.randn(3, generator=g)
    # "out.weight" is the embedding itself (a tied head), "out.bias" a kept tensor shared too
    return {"emb.weight": emb, "fc.weight": torch.randn(3, 8, generator=g), "fc.bias": bias,
            "out.weight": emb, "out.bias": bias}


def _tied_bytes(**config) -> bytes:
    return legonet.compress(_tied_state_dict(), legonet.LegoConfig(block=(2, 2), clusters=4, **config)).to_bytes()


def test_aliases_are_stored_once_in_version_5_and_read_back(tmp_path):
    data = _tied_bytes()
    md, meta, blobs = split(data)
    assert md["version"] == "5" and meta["version"] == 5
    assert meta["aliases"] == {"out.weight": "emb.weight", "out.bias": "fc.bias"}
    assert [e[0] for e in meta["tensors"]] == ["emb.weight", "fc.weight", "fc.bias"]
    path = tmp_path / "tied.lego"
    path.write_bytes(data)
    back = load(path)
    sd = back.to_state_dict()
    assert list(sd) == ["emb.weight", "fc.weight", "fc.bias", "out.weight", "out.bias"]
    assert sd["out.weight"] is sd["emb.weight"] and sd["out.bias"] is sd["fc.bias"]
    assert torch.equal(back.reconstruct("out.bias"), _tied_state_dict()["fc.bias"])
    assert back.to_bytes() == data  # written again byte for byte


def test_files_without_aliases_keep_their_version():
    sd = _tied_state_dict()
    untied = {k: v.clone() for k, v in sd.items()}
    md, meta, _ = split(legonet.compress(untied, legonet.LegoConfig(block=(2, 2), clusters=4)).to_bytes())
    assert md["version"] == "1" and "aliases" not in meta


def test_aliases_keep_the_other_features_of_the_file():
    data = _tied_bytes(scope="layer", scales="row", compact_storage=True, entropy_coding=True, kept_dtype="float16")
    md, meta, _ = split(data)
    assert md["version"] == "5" and "source_dtypes" in meta and len(meta["tensors"][0]) == 9  # 8-bit gains
    sd = deserialize(data).to_state_dict()
    assert sd["out.bias"].dtype == torch.float32  # the source's dtype restored for the alias too


@pytest.mark.parametrize("aliases,message", [
    ({"out.weight": "gone.weight"}, "alias 'out.weight' refers to a missing tensor 'gone.weight'"),
    ({"fc.bias": "emb.weight"}, "alias 'fc.bias' is also the name of a stored tensor"),
    ({"out.weight": "out.bias", "out.bias": "fc.bias"}, "refers to a missing tensor 'out.bias'"),
    ({"out.weight": 3}, "not a pair of tensor names"),
    ({"": "emb.weight"}, "not a pair of tensor names"),
    (["out.weight", "emb.weight"], "aliases is malformed"),
])
def test_bad_aliases_are_rejected_naming_the_file(aliases, message):
    md, meta, blobs = split(_tied_bytes())
    meta["aliases"] = aliases
    with pytest.raises(FormatError, match=f"^m.lego: .*{message}"):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_aliases_need_version_5():
    md, meta, blobs = split(_tied_bytes())  # otherwise a valid version-4 file (its metadata compressed)
    md["version"], meta["version"] = "4", 4
    with pytest.raises(FormatError, match="m.lego: aliases need format version 5, the file says 4"):
        deserialize(join(md, meta, blobs), source="m.lego")


def test_the_writer_refuses_an_alias_without_its_tensor():
    cm = legonet.compress(_tied_state_dict(), legonet.LegoConfig(block=(2, 2), clusters=4))
    del cm.tensors["fc.bias"]
    with pytest.raises(FormatError, match="cannot write the model: alias 'out.bias' refers to a missing tensor"):
        cm.to_bytes()
