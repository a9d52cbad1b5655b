"""The .lego file format."""

from legonet.format.lego_file import FORMAT_VERSION, save, serialize
from legonet.format.lego_reader import deserialize, load

__all__ = ["FORMAT_VERSION", "deserialize", "load", "save", "serialize"]
