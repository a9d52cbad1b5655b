import pytest
import torch

from legonet.ops.error_feedback import assign_with_error_feedback, inverse_cholesky
from legonet.ops.output_lsq import Member, output_error
from legonet.ops.tiling import make_tiling, padding_mask, tile


def _correlated_cov(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 6, generator=g) @ torch.randn(6, cols, generator=g) + 0.3 * torch.randn(2000, cols, generator=g)
    h = x.T @ x / 2000
    h = (h + h.T) / 2
    return h + 0.01 * h.diagonal().mean() * torch.eye(cols)


def _nearest(w, codebook, tiling, col_weights=None):
    """Nearest centroid over the real (unpadded) elements of each block, each column's squared error
    weighted by ``col_weights`` (default 1)."""
    h = torch.ones(tiling.cols) if col_weights is None else col_weights
    blocks, mask = tile(w, tiling.block), padding_mask(tiling).float()
    weight = tile(torch.ones(tiling.rows, tiling.cols) * h, tiling.block) * mask
    d = ((blocks[:, None, :] - codebook[None]) ** 2 * weight[:, None, :]).sum(-1)
    return d.argmin(1)


@pytest.mark.parametrize("rows,cols,block,k", [(64, 72, (2, 2), 16), (30, 50, (4, 4), 32), (33, 45, (4, 8), 4),
                                                (16, 9, (1, 1), 8)])
def test_without_correlation_it_is_the_nearest_centroid_of_the_real_elements(rows, cols, block, k):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g)
    t = make_tiling((rows, cols), block)
    codebook = torch.randn(k, block[0] * block[1], generator=g)
    diag = torch.diag(torch.rand(cols, generator=g) + 0.5)  # uncorrelated inputs: no error to push
    got = assign_with_error_feedback(w, diag, codebook, t, row_weights=None)
    # a diagonal H weights each column: the nearest centroid under those column weights
    assert torch.equal(got, _nearest(w, codebook, t, diag.diagonal()))
    assert got.dtype == torch.int64 and got.shape == (t.num_blocks,)


@pytest.mark.parametrize("rows,cols,block,k", [(64, 72, (2, 2), 16), (30, 50, (4, 4), 32), (40, 27, (1, 2), 8)])
def test_with_correlated_inputs_the_output_error_is_lower_than_nearest(rows, cols, block, k):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(rows, cols, generator=g)
    h = _correlated_cov(cols)
    t = make_tiling((rows, cols), block)
    codebook = tile(w, block)[torch.randperm(t.num_blocks, generator=g)[:k]].clone()
    ones = torch.ones(rows)
    near = output_error(Member(w, h, _nearest(w, codebook, t), t, ones), codebook)[0]
    fed = output_error(Member(w, h, assign_with_error_feedback(w, h, codebook, t), t, ones), codebook)[0]
    assert fed < 0.8 * near


def test_gains_only_rescale_each_rows_error():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 36, generator=g)
    gains = torch.rand(24, generator=g) + 0.5
    h = _correlated_cov(36, seed=4)
    t = make_tiling((24, 36), (2, 4))
    codebook = torch.randn(16, 8, generator=g)
    rho = torch.rand(24, generator=g)
    with_gains = assign_with_error_feedback(w * gains[:, None], h, codebook, t, gains, rho / gains.square())
    without = assign_with_error_feedback(w, h, codebook, t, None, rho)
    assert torch.equal(with_gains, without)


def test_inverse_cholesky_and_shape_errors():
    h = _correlated_cov(10)
    u = inverse_cholesky(h)
    inv = torch.linalg.inv(h.double())
    assert float((u.T @ u - inv).abs().max()) < 1e-9 * float(inv.abs().max())
    assert torch.equal(u, torch.triu(u))
    t = make_tiling((4, 10), (2, 2))
    with pytest.raises(ValueError, match="shapes do not match"):
        assign_with_error_feedback(torch.randn(4, 9), h, torch.randn(4, 4), t)
    with pytest.raises(ValueError, match="shapes do not match"):
        assign_with_error_feedback(torch.randn(4, 10), h, torch.randn(4, 3), t)
