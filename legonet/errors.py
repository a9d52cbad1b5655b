"""legonet's own exception types.

Every failure a user can cause (bad config, bad checkpoint, corrupt .lego file, bad data) raises a
subclass of :class:`LegoError` whose message names the problem and, where there is one, the file or
tensor. The CLI turns these into one-line messages; anything else is a bug in legonet.
"""

from __future__ import annotations


class LegoError(Exception):
    """Base class of every error legonet raises on purpose."""


class ConfigError(LegoError, ValueError):
    """An invalid or impossible compression configuration."""


class CheckpointError(LegoError):
    """An input checkpoint that cannot be read or holds unusable weights."""


class FormatError(LegoError):
    """A .lego file that is corrupt, truncated, or from an unsupported format version."""


class DataError(LegoError):
    """An evaluation or calibration data file that is missing or malformed."""


class ArchitectureError(LegoError):
    """An unknown architecture name, or weights that do not fit the architecture."""


class OutputError(LegoError):
    """An output file that cannot be written (missing folder, no permission, disk full)."""
