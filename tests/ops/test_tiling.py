import pytest
import torch

from legonet.errors import ConfigError
from legonet.ops.tiling import make_tiling, padding_mask, tile, untile

SHAPES = [
    (16, 3, 1, 1), (16, 3, 3, 3), (64, 3, 7, 7), (32, 4, 3, 3),  # 1x1, 3x3, 7x7, grouped (in/groups=4)
    (32, 1, 3, 3), (10, 64), (7, 13), (5, 1), (1, 1), (3, 5, 2), (100, 6),  # depthwise, Linear, odd
]
BLOCKS = [(4, 4), (2, 2), (1, 1), (3, 5), (8, 2), (1, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip(shape, block):
    w = torch.randn(shape)
    blocks = tile(w, block)
    t = make_tiling(shape, block)
    assert blocks.shape == (t.num_blocks, block[0] * block[1])
    assert torch.equal(untile(blocks, t), w)


def test_block_order_and_padding():
    w = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    b = tile(w, (4, 4))
    # grid is 2x2: blocks row-major; first block is rows 0..3, cols 0..3, flattened row-major
    assert b.shape == (4, 16)
    assert torch.equal(b[0], w[:4, :4].reshape(-1))
    assert torch.equal(b[1][:4], torch.tensor([4.0, 0, 0, 0]))  # col 4 then zero padding
    assert torch.equal(b[2][:8], torch.tensor([20.0, 21, 22, 23, 25, 26, 27, 28]))  # rows 4..5
    assert not b[2][8:].any()  # rows 6..7 are padding
    mask = padding_mask(make_tiling((6, 5), (4, 4)))
    assert int(mask.sum()) == 30


def test_conv_view_is_out_by_rest():
    w = torch.randn(8, 2, 3, 3)
    assert torch.equal(tile(w, (8, 18))[0], w.reshape(8, 18).reshape(-1))


def test_bad_inputs():
    with pytest.raises(ConfigError):
        tile(torch.randn(5), (4, 4))
    with pytest.raises(ConfigError):
        make_tiling((4, 0), (2, 2))
