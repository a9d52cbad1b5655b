"""The ``legonet`` command line: compress, recipe, info, decompress, eval, demo, export-c,
export-onnx, footprint.

Each command lives in the module of its concern and calls the library's public functions
(:func:`legonet.compress` for compression). Every failure legonet anticipates exits with status 1
and one line naming the problem; ``--debug`` shows the traceback instead.
"""

from legonet.cli import compress, demo, evaluate, export, inspect  # noqa: F401  (register the commands)
from legonet.cli.app import bundled, main

__all__ = ["bundled", "main"]
