"""Lean inference runtime: modules that compute from the codebook and packed indices.

``legonet.nn.load_lean("model.lego", "resnet20")`` gives a model whose weight memory is the .lego
file's, decoding one layer's weight at a time during ``forward``.
"""

from legonet.nn.convert import convert, load_lean, tensor_bytes
from legonet.nn.functional import decode_prepared, decode_weight, pack_indices, prepare_codebook, unpack_indices
from legonet.nn.modules import LegoConv2d, LegoLinear, LegoModule

__all__ = ["LegoConv2d", "LegoLinear", "LegoModule", "convert", "decode_prepared", "decode_weight", "load_lean", "pack_indices", "prepare_codebook",
           "tensor_bytes", "unpack_indices"]
