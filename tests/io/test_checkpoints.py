import json

import pytest
import torch
from safetensors.torch import save_file

import legonet
from legonet.errors import CheckpointError
from legonet.io.checkpoints import read_state_dict


def test_safetensors_and_torch_and_lego(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    torch.save(sd, tmp_path / "m.pt")
    legonet.compress(sd, legonet.LegoConfig(block=2, clusters=4)).save(tmp_path / "m.lego")
    for name in ("m.safetensors", "m.pt"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert set(read_state_dict(tmp_path / "m.lego")) == set(sd)


def test_sharded_index(tmp_path, tiny_model):
    sd = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    keys = list(sd)
    a, b = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    save_file({k: sd[k] for k in a}, tmp_path / "s1.safetensors")
    save_file({k: sd[k] for k in b}, tmp_path / "s2.safetensors")
    wm = {k: "s1.safetensors" for k in a} | {k: "s2.safetensors" for k in b}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    got = read_state_dict(tmp_path / "m.safetensors.index.json")
    assert list(got) == keys

    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard s2.safetensors named in the index is missing"):
        read_state_dict(tmp_path / "m.safetensors.index.json")
    save_file({k: sd[k] for k in keys}, tmp_path / "s2.safetensors")  # now duplicates s1's keys
    with pytest.raises(CheckpointError, match="appears in both"):
        read_state_dict(tmp_path / "m.safetensors.index.json")


class Evil:
    """Any non-tensor object: weights_only loading must refuse to rebuild it."""


def test_refuses_pickled_objects(tmp_path):
    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pt")


@pytest.mark.parametrize("content, msg", [
    (b"", "empty file"), (b"hello world, not weights", "not a checkpoint"),
    (b"{not json", "not a valid JSON index"), (b'{"a": 1}', "no weight_map"),
])
def test_bad_files(tmp_path, content, msg):
    p = tmp_path / "bad.bin"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        read_state_dict(p)


def test_truncated_safetensors(tmp_path, tiny_model):
    p = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, p)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(p)


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "nope.safetensors")
