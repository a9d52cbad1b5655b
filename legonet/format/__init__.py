"""The .lego file format."""

from legonet.format.lego_file import FORMAT_VERSION, deserialize, load, save, serialize

__all__ = ["FORMAT_VERSION", "deserialize", "load", "save", "serialize"]
