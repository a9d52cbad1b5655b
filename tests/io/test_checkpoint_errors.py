"""Input checkpoints: no unpickling of arbitrary objects, and a clear CheckpointError for every bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import legonet
from legonet.errors import CheckpointError, ConfigError
from legonet.io.checkpoints import read_state_dict


class _Payload:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_with_code_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, zipped)
    raw = tmp_path / "evil.bin"
    raw.write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=4))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=f"{path.name}: .*weights_only=True"):
            read_state_dict(path)
    assert not marker.exists()


def test_plain_torch_state_dicts_load(tmp_path):
    sd = {"w": torch.randn(3, 3), "n": torch.tensor(4)}
    torch.save(sd, tmp_path / "a.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        back = read_state_dict(tmp_path / name)
        assert list(back) == ["w", "n"] and torch.equal(back["w"], sd["w"])
    torch.save({"lr": 0.1}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt: .*not hold a state dict of tensors"):
        read_state_dict(tmp_path / "c.pt")


def _shards(tmp_path: Path, weight_map: dict[str, str], shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_sharded_checkpoint_loads_in_index_order(tmp_path):
    index = _shards(tmp_path, {"b": "s2.safetensors", "a": "s1.safetensors"},
                    {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"b": torch.zeros(3)}})
    assert list(read_state_dict(index)) == ["b", "a"]


@pytest.mark.parametrize("case,match", [
    ("missing", "shard s2.safetensors named in the index is missing"),
    ("duplicate", "tensor 'a' appears in both s1.safetensors and s2.safetensors"),
    ("not-in-shard", "listed in the index are not in their shard, e.g. 'c'"),
    ("outside", "points outside the index's folder"),
    ("empty", "weight_map is empty"),
    ("no-map", "no weight_map"),
])
def test_sharded_checkpoint_errors(tmp_path, case, match):
    s1 = {"s1.safetensors": {"a": torch.ones(2)}}
    if case == "missing":
        index = _shards(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"}, s1)
    elif case == "duplicate":
        index = _shards(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"},
                        {**s1, "s2.safetensors": {"a": torch.ones(2), "b": torch.ones(1)}})
    elif case == "not-in-shard":
        index = _shards(tmp_path, {"a": "s1.safetensors", "c": "s1.safetensors"}, s1)
    elif case == "outside":
        index = _shards(tmp_path, {"a": "../s1.safetensors"}, s1)
    elif case == "empty":
        index = _shards(tmp_path, {}, s1)
    else:
        index = tmp_path / "model.safetensors.index.json"
        index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=match) as info:
        read_state_dict(index)
    assert str(info.value).startswith(str(index))


def test_files_that_are_not_checkpoints(tmp_path):
    cases = {"empty.safetensors": b"", "junk.bin": b"\x00\x01garbage" * 10, "bad.json": b"{not json",
             "deep.json": b"[" * 100_000}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    save_file({"w": torch.randn(16, 16)}, str(tmp_path / "good.safetensors"))
    full = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) - 100])
    save_file({}, str(tmp_path / "none.safetensors"))
    os.mkfifo(tmp_path / "pipe.safetensors")
    expect = {"empty.safetensors": "empty file", "junk.bin": "not a checkpoint", "bad.json": "not a valid JSON index",
              "deep.json": "not a valid JSON index", "cut.safetensors": "corrupt or truncated",
              "none.safetensors": "no tensors", "pipe.safetensors": "not a regular file", "absent.pt": "no such file"}
    for name, match in expect.items():
        with pytest.raises(CheckpointError, match=match) as info:
            read_state_dict(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(tmp_path)


def test_corrupt_lego_as_input_is_a_checkpoint_error(tmp_path):
    cm = legonet.compress({"w": torch.randn(8, 8)}, legonet.LegoConfig(block=2, clusters=2))
    data = bytearray(cm.to_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "m.lego").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="m.lego: checksum mismatch"):
        read_state_dict(tmp_path / "m.lego")


def test_empty_and_unclusterable_models():
    with pytest.raises(CheckpointError, match="no tensors"):
        legonet.compress({})
    with pytest.raises(CheckpointError, match="no tensors"):
        legonet.compress(torch.nn.ReLU())
    with pytest.raises(ConfigError, match="no tensor to cluster"):
        legonet.compress({"bias": torch.randn(8), "step": torch.tensor(3)})


def test_non_finite_weights_are_refused_by_name_or_kept_when_allowed():
    g = torch.Generator().manual_seed(0)
    sd = {"ok.weight": torch.randn(8, 8, generator=g), "bad.weight": torch.randn(8, 8, generator=g),
          "bad.bias": torch.tensor([1.0, float("inf")])}
    sd["bad.weight"][3, 4] = float("nan")
    with pytest.raises(CheckpointError, match="tensor 'bad.weight' holds 1 non-finite value.*and 1 more"):
        legonet.compress(sd, legonet.LegoConfig(block=2, clusters=4))
    cm = legonet.compress(sd, legonet.LegoConfig(block=2, clusters=4, allow_nonfinite=True))
    assert set(cm.clustered) == {"ok.weight"} and set(cm.dense) == {"bad.weight", "bad.bias"}
    out = cm.to_state_dict()
    assert torch.equal(out["bad.weight"].nan_to_num(7.0), sd["bad.weight"].nan_to_num(7.0))  # kept bit for bit
    rows = {r.name: r.kind for r in cm.report().tensors}
    assert rows["bad.weight"] == "kept" and rows["ok.weight"] == "clustered"
