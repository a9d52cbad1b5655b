"""C99 export of a compressed model for microcontrollers (see :mod:`legonet.export.c.codegen`)."""

from legonet.export.c.codegen import ExportInfo, export_c, generate

__all__ = ["ExportInfo", "export_c", "generate"]
