import numpy as np
import pytest

from legonet.ops.bitpack import bits_for, pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("width", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_round_trip_every_width(width, count):
    rng = np.random.default_rng(width * 1000 + count)
    idx = rng.integers(0, 1 << width, size=count)
    packed = pack_bits(idx, width)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(count, width)
    assert np.array_equal(unpack_bits(packed, width, count), idx)


def test_layout_is_lsb_first_little_endian():
    # indices 1, 2, 3 at 3 bits: stream bits 100 010 110 -> byte0 = 0b11010001, byte1 = 0b0
    assert pack_bits(np.array([1, 2, 3]), 3).tolist() == [0b11010001, 0b0]


def test_bits_for():
    assert [bits_for(k) for k in (1, 2, 3, 4, 5, 16, 17, 32, 256, 65536)] == [1, 1, 2, 2, 3, 4, 5, 5, 8, 16]


def test_errors():
    with pytest.raises(ValueError):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(1, np.uint8), 5, 2)
