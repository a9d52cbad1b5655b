"""Transformer peers: byte accounting, quantizer error bounds, GPTQ, and the models' measures."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from benchmarks.transformer_models import (
    ByteEncoder, ByteGPT, embedding_cosine, encode_bytes, lm_perplexity, nn_agreement,
)
from benchmarks.transformer_peers import PEERS, gptq, linear_call_order
from benchmarks.transformer_quant import (
    HEADER_BYTES, fp16_at_least, gptq_groups, hessian_update, kmeans_scalar, minmax_grid,
    original_bytes, rtn_groups, rtn_rows_symmetric, unique_tensors,
)

# The tiny LM below: width 32, 2 layers, context 16. Its 2-D tensors, (rows, cols):
#   tok (256, 32) [tied with the head], pos (16, 32), per block qkv (96, 32), proj (32, 32),
#   fc1 (128, 32), fc2 (32, 128): 33,280 weights in 848 rows.
# 1-D tensors: per block ln1 64, qkv bias 96, proj bias 32, ln2 64, fc1 bias 128, fc2 bias 32, plus
#   ln_f 64: 896 values, kept at float16 = 1,792 bytes.
KEPT = 896 * 2
EXPECTED_BYTES = {
    # codes 33,280 B + one float16 scale per row (848 x 2)
    "rtn-int8-row": 33280 + 848 * 2 + KEPT + HEADER_BYTES,
    # codes 33,280 / 2; groups of min(64, cols): one per row except fc2's two -> 912 groups,
    # float16 scale each + 4-bit zero each (456 B)
    "rtn-int4-g64": 16640 + 912 * 2 + 456 + KEPT + HEADER_BYTES,
    # every row is one group (848): 848 scales + 424 B of zeros
    "rtn-int4-g128": 16640 + 848 * 2 + 424 + KEPT + HEADER_BYTES,
    # 3-bit codes 12,480 B; 3-bit zeros packed per tensor: 96 + 6 + 2 * (36 + 12 + 48 + 12) = 318 B
    "rtn-int3-g128": 12480 + 848 * 2 + 318 + KEPT + HEADER_BYTES,
    # float16 scale and float16 zero per group
    "hqq-int4-g64": 16640 + 912 * 2 * 2 + KEPT + HEADER_BYTES,
    # 10 tensors x a codebook of 16 (or 4) float16 entries
    "kmeans-4bit": 16640 + 10 * 16 * 2 + KEPT + HEADER_BYTES,
    "kmeans-2bit": 8320 + 10 * 4 * 2 + KEPT + HEADER_BYTES,
    # a 16-entry float16 table per 16 rows: (256 + 16 + 2 * (96 + 32 + 128 + 32)) / 16 = 53 tables
    "coreml-4bit-gc16": 16640 + 53 * 16 * 2 + KEPT + HEADER_BYTES,
    "gptq-int4-g128": 16640 + 848 * 2 + 424 + KEPT + HEADER_BYTES,
}


def tiny_lm() -> ByteGPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ByteGPT(width=32, layers=2, heads=2, context=16).eval()


def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(3)]


def peer(name: str):
    found = [p for p in PEERS if p.name == name]
    assert found, name
    p = found[0]
    if p.package:
        pytest.importorskip(p.package)
    return p


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
def test_peer_bytes_match_the_hand_count_and_keep_the_tie(name):
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = peer(name)
    out, nbytes = p.run(model, calib_batches() if p.calibrated else None)
    assert nbytes == EXPECTED_BYTES[name]
    assert out.head.weight is out.tok.weight  # the tied tensor stays one tensor
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert not torch.equal(out.blocks[0].fc1.weight, model.blocks[0].fc1.weight)
    assert torch.equal(out.blocks[0].ln1.weight, model.blocks[0].ln1.weight)


def test_every_registered_peer_runs_on_the_tiny_lm_and_stays_close():
    model = tiny_lm()
    x = calib_batches()[0]
    with torch.no_grad():
        ref = model(x)
    for p in PEERS:
        if p.missing():
            continue
        out, nbytes = p.run(model, calib_batches() if p.calibrated else None)
        assert HEADER_BYTES < nbytes < original_bytes(model) / 2.5, p.name
        with torch.no_grad():
            rel = float((out(x) - ref).norm() / ref.norm())
        assert rel < 0.5, (p.name, rel)


def test_tied_embedding_is_counted_once():
    model = tiny_lm()
    sd = model.state_dict()
    assert "tok.weight" in sd and "head.weight" in sd  # the state dict names the tied tensor twice
    assert "head.weight" not in unique_tensors(model)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields each tensor once
    assert original_bytes(model) == 4 * params == 4 * (33280 + 896)
    assert original_bytes(model) == 4 * sum(t.numel() for t in sd.values()) - 4 * 256 * 32


def test_untied_weights_are_counted_separately():
    class TwoTables(nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False)
            if tied:
                self.b.weight = self.a.weight

    assert original_bytes(TwoTables(tied=False)) == 2 * original_bytes(TwoTables(tied=True)) == 256


def test_rtn_int4_g64_error_is_at_most_half_a_step_with_16_levels_per_group():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3, :64] = 0.0  # an all-zero group stays zero
    w[5, 64:128] = torch.linspace(0.01, 0.02, 64)  # an all-positive group: zero lies outside, range widened
    deq = rtn_groups(w, 4, 64)
    scale, zero = minmax_grid(w.reshape(-1, 64), 4)
    err = (deq - w).abs().reshape(-1, 64).amax(1)
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
    assert torch.equal(scale, scale.half().float())  # scales are float16 values
    for g in deq.reshape(-1, 64):
        assert len(torch.unique(g)) <= 16
    assert torch.all(deq[3, :64] == 0)
    assert torch.all((zero >= 0) & (zero <= 15) & (zero == zero.round()))


def test_fp16_scales_never_shrink_the_range():
    x = torch.tensor([1e-3, 0.1, 3.3333e-5, 0.0123457])
    up = fp16_at_least(x)
    assert torch.all(up >= x) and torch.equal(up, up.half().float())
    assert torch.all(up <= x * (1 + 2**-9) + 2**-24)


def test_int8_row_codes_fit_and_error_is_half_a_step():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    deq, scale = rtn_rows_symmetric(w, 8)
    assert torch.all((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-6))
    assert torch.round(deq / scale[:, None]).abs().max() <= 127


def _correlated_layer(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cols = 256
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / 8
    x = torch.randn(2048, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven scales
    return torch.randn(96, cols, generator=g) * 0.05, x


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_reduces_layer_output_error_against_rtn(bits):
    w, x = _correlated_layer()
    h, n = hessian_update(torch.zeros(256, 256, dtype=torch.float64), 0, x)
    assert n == 2048

    def out_err(d: torch.Tensor) -> float:
        return float(((x @ (d - w).T) ** 2).mean())

    rtn = out_err(rtn_groups(w, bits, 128))
    assert out_err(gptq_groups(w, h, bits, 128)) < 0.8 * rtn
    assert out_err(gptq_groups(w, h, bits, 128, act_order=True)) < 0.8 * rtn
    deq = gptq_groups(w, h, bits, 128)  # still on a grid of 2^bits levels per group
    assert max(len(torch.unique(g)) for g in deq.reshape(-1, 128)) <= 2**bits


def test_gptq_with_uncorrelated_equal_inputs_is_rtn():
    w, _ = _correlated_layer()
    assert torch.allclose(gptq_groups(w, torch.eye(256, dtype=torch.float64), 4, 64), rtn_groups(w, 4, 64))


def test_hessian_update_is_the_running_mean_of_2xxT():
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(5))
    h, n = hessian_update(torch.zeros(5, 5, dtype=torch.float64), 0, x[:3])
    h, n = hessian_update(h, n, x[3:].reshape(7, 1, 5))
    assert n == 10 and torch.allclose(h, 2 * x.double().T @ x.double() / 10)


def test_linear_call_order_groups_layers_that_read_the_same_input():
    class SplitAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = SplitAttention()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
    assert linear_call_order(model, x) == [["q", "k", "v"], ["o"]]
    out, _ = gptq(model, [x], bits=4, group=128)
    assert all(len(torch.unique(getattr(out, n).weight[0])) <= 16 for n in "qkvo")


def test_gptq_calibrates_layers_in_call_order_and_needs_data():
    model = tiny_lm()
    assert linear_call_order(model, calib_batches()[0]) == [
        [f"blocks.{i}.{n}"] for i in range(2) for n in ("qkv", "proj", "fc1", "fc2")] + [["head"]]
    with pytest.raises(ValueError, match="calibration"):
        gptq(model, None, bits=4, group=128)


def test_kmeans_scalar_uses_at_most_k_float16_values():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(6))
    deq = kmeans_scalar(w, 8)
    values = torch.unique(deq)
    assert len(values) <= 8 and torch.equal(values, values.half().float())
    assert float((deq - w).abs().mean()) < float((w - w.mean()).abs().mean()) / 2


def test_uniform_model_has_perplexity_256():
    class Uniform(nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*idx.shape, 256)

    text = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    r = lm_perplexity(Uniform(), text, context=64, batch_size=7)
    assert r["perplexity"] == pytest.approx(256) and r["bits_per_byte"] == pytest.approx(8)
    assert r["scored_bytes"] == (5000 - 1) // 64 * 64


def test_perplexity_sees_a_model_that_copies_its_input():
    class Oracle(nn.Module):  # knows the text: puts all its mass on the true next byte
        def __init__(self, text: np.ndarray) -> None:
            super().__init__()
            self.text = torch.from_numpy(text).long()

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*idx.shape, 256).scatter_(-1, (idx[..., None] + 1) % 256, 50.0)

    text = (np.arange(3000) % 256).astype(np.uint8)
    assert lm_perplexity(Oracle(text), text, context=32)["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_models_trace_with_fx_and_the_encoder_ignores_padding():
    lm = tiny_lm()
    x = calib_batches()[0]
    assert torch.allclose(torch.fx.symbolic_trace(lm)(x), lm(x))
    enc = ByteEncoder(width=32, layers=2, heads=2, max_len=24).eval()
    short = encode_bytes(["def f(x)", "Return the sum."], 24)
    padded = torch.cat([short, torch.zeros(2, 6, dtype=torch.int64)], 1)
    assert torch.allclose(enc(short), enc(padded), atol=1e-5)
    assert torch.allclose(torch.fx.symbolic_trace(enc)(padded), enc(padded), atol=1e-6)
    assert torch.allclose(enc(short).norm(dim=1), torch.ones(2))


def test_embedding_measures():
    ref = torch.eye(4)
    assert embedding_cosine(ref, 2 * ref) == pytest.approx({"mean": 1.0, "min": 1.0})
    flipped = ref.clone()
    flipped[0] = -flipped[0]
    assert embedding_cosine(ref, flipped)["min"] == pytest.approx(-1.0)
    pts = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nn_agreement(pts, pts) == 1.0
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # 1 and 2 trade places
    assert nn_agreement(pts, swapped) < 1.0


def test_optional_peers_say_why_they_are_missing(monkeypatch):
    p = next(p for p in PEERS if p.package == "hqq")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "hqq is not installed" in p.missing()


def test_run_task_scores_the_original_and_each_peer_and_lists_the_skipped():
    from benchmarks.transformer_peers import Peer
    from benchmarks.transformer_table import Task, run_task

    model = tiny_lm()
    text = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8)
    task = Task("tiny", model, calib_batches(), lambda m: lm_perplexity(m, text, context=16))
    peers = [peer("rtn-int8-row"), peer("gptq-int4-g128"), Peer("absent", PEERS[0].run, package="no_such_pkg_x")]
    lines: list[str] = []
    result = run_task(task, peers, lines.append)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["fp32 (original)", "fp16 (every tensor)", "rtn-int8-row", "gptq-int4-g128"]
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["rtn-int8-row"]["file_bytes"] == EXPECTED_BYTES["rtn-int8-row"]
    assert rows["fp32 (original)"]["ratio"] == 1.0 and result["original_bytes"] == 4 * (33280 + 896)
    assert rows["fp16 (every tensor)"]["file_bytes"] == 2 * (33280 + 896) + HEADER_BYTES
    assert abs(rows["rtn-int8-row"]["perplexity"] - rows["fp32 (original)"]["perplexity"]) < 0.05
    assert result["skipped"] == ["absent skipped: the package no_such_pkg_x is not installed"]
    assert len(lines) == 5
