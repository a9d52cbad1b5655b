"""Pure tensor functions: tiling, k-means, bit packing. No nn.Module, no I/O."""

from legonet.ops.bitpack import bits_for, pack_bits, packed_nbytes, unpack_bits
from legonet.ops.kmeans import KMeansResult, assign, kmeans, kmeans_plusplus
from legonet.ops.tiling import Tiling, make_tiling, padding_mask, tile, untile

__all__ = [
    "KMeansResult", "Tiling", "assign", "bits_for", "kmeans", "kmeans_plusplus", "make_tiling",
    "pack_bits", "packed_nbytes", "padding_mask", "tile", "unpack_bits", "untile",
]
