import pytest
import torch

from legonet.ops.quant import choose_row_scales, unshrink_scales


def test_absmax_gains_put_every_row_in_unit_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g) * torch.logspace(-2, 1, 6)[:, None, None, None]
    s = choose_row_scales(w, stat="absmax")
    assert s.shape == (6,)
    ratio = (w.reshape(6, -1) / s[:, None]).abs().amax(1)
    assert torch.allclose(ratio, torch.ones(6), rtol=1e-3)  # float16 rounding of the gains
    rms = choose_row_scales(w, stat="rms")
    assert (s > rms).all()  # a row's largest magnitude exceeds its RMS
    zero = choose_row_scales(torch.zeros(3, 4), stat="absmax")
    assert torch.equal(zero, torch.ones(3))
    with pytest.raises(ValueError, match="statistic"):
        choose_row_scales(w, stat="median")


def test_unshrink_makes_the_projection_on_each_row_equal_the_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g)
    scale = torch.ones(8)
    # a conditional-mean codebook shrinks: reconstruction = 0.8 w + noise orthogonal-ish to w
    approx = 0.8 * w + 0.1 * torch.randn(8, 64, generator=g)
    before = (w * approx).sum(1) / (w * w).sum(1)
    assert (before < 0.9).all()
    s = unshrink_scales(w, approx, scale, dtype=torch.float32)
    after = (w * approx * s[:, None]).sum(1) / (w * w).sum(1)
    assert torch.allclose(after, torch.ones(8), atol=1e-5)
    # element weights: the projection is measured in the weighted inner product
    h = torch.rand(1, 64, generator=g) + 0.1
    sh = unshrink_scales(w, approx, scale, h, dtype=torch.float32)
    assert torch.allclose((h * w * approx * sh[:, None]).sum(1), (h * w * w).sum(1), rtol=1e-4)


def test_unshrink_leaves_degenerate_rows_bounded():
    w = torch.tensor([[1.0, 2.0], [1.0, -1.0], [0.0, 0.0], [3.0, 4.0]])
    approx = torch.tensor([[-1.0, -2.0], [0.01, -0.01], [0.5, 0.5], [3.0, 4.0]])
    s = unshrink_scales(w, approx, torch.full((4,), 2.0), dtype=torch.float32)
    # a row pointing the wrong way keeps its gain; a factor above 2 is capped; zero and exact rows keep theirs
    assert s.tolist() == [2.0, 4.0, 2.0, 2.0]


def test_storable_gains_round_and_keep_sign_when_asked():
    from legonet.ops.quant import storable_gains

    g = torch.tensor([-2.0, -1e-12, 0.0, 1e-12, 0.1, 1e9])
    tiny, big = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    positive = storable_gains(g)
    assert positive.tolist() == [tiny, tiny, tiny, tiny, torch.tensor(0.1).half().item(), big]
    signed = storable_gains(g, keep_sign=True)
    assert signed.tolist() == [-2.0, -tiny, tiny, tiny, torch.tensor(0.1).half().item(), big]
    assert torch.equal(signed, signed.half().float())


def test_clamp_magnitude_keeps_signs_and_does_not_round():
    from legonet.ops.quant import clamp_magnitude

    g = torch.tensor([-5.0, -1e-9, 0.0, 1e-9, 0.1, 5.0])
    out = clamp_magnitude(g, 1e-3, 2.0)
    assert out.tolist() == pytest.approx([-2.0, -1e-3, 1e-3, 1e-3, 0.1, 2.0], rel=1e-6)
    assert out[4].item() == torch.tensor(0.1).item()  # float32 kept, not rounded to float16
