"""Built-in architectures (no weights): name -> constructor and input normalisation.

``get_arch("module:callable")`` or ``get_arch("path/to/file.py:callable")`` imports any other
architecture; such a callable takes no arguments and returns an ``nn.Module``. Its input
normalisation and size are read from attributes of the *callable* (not of its module):
``legonet_mean`` and ``legonet_std`` (per channel, on [0, 1] pixels; default mean 0, std 1) and
``legonet_input_size`` (``(channels, height, width)``; without it images are taken at the size they
come in, and exports assume ``(3, 32, 32)``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from legonet.errors import ArchitectureError
from legonet.zoo import efficientnet_lite, mobilenet_v2, resnet50, resnet_cifar, vgg

CIFAR_RESNET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RESNET50_CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EFFICIENTNET_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class ArchSpec:
    """An architecture and how to feed it: inputs are ``(x/255 - mean) / std`` per channel."""

    name: str
    build: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int] = (3, 32, 32)
    # whether images are resized to ``input_size`` (False: an imported architecture that does not
    # say its size takes images as they come)
    fixed_size: bool = True


ZOO: dict[str, ArchSpec] = {
    **{f"resnet{d}": ArchSpec(f"resnet{d}", getattr(resnet_cifar, f"resnet{d}"), *CIFAR_RESNET_NORM)
       for d in (20, 32, 44, 56, 110)},
    "resnet50_cifar": ArchSpec("resnet50_cifar", resnet50.resnet50_cifar, *RESNET50_CIFAR_NORM),
    "vgg16": ArchSpec("vgg16", vgg.vgg16, *IMAGENET_NORM, input_size=(3, 224, 224)),
    "mobilenet_v2": ArchSpec("mobilenet_v2", mobilenet_v2.mobilenet_v2, *IMAGENET_NORM, input_size=(3, 224, 224)),
    **{name: ArchSpec(name, getattr(efficientnet_lite, name), *EFFICIENTNET_LITE_NORM,
                      input_size=(3, variant.resolution, variant.resolution))
       for name, variant in efficientnet_lite.VARIANTS.items()},
}


def get_arch(name: str) -> ArchSpec:
    """Look up a zoo architecture, or import ``module:callable``."""
    if name in ZOO:
        return ZOO[name]
    if ":" in name:
        where, _, attr = name.rpartition(":")
        fn = getattr(_import_source(where, name), attr, None)
        if fn is None:
            raise ArchitectureError(f"cannot import architecture {name!r}: {where} has no {attr!r}")
        if not callable(fn):
            raise ArchitectureError(f"architecture {name!r} is not callable")
        try:
            mean = tuple(float(v) for v in getattr(fn, "legonet_mean", (0.0, 0.0, 0.0)))
            std = tuple(float(v) for v in getattr(fn, "legonet_std", (1.0, 1.0, 1.0)))
            fixed = hasattr(fn, "legonet_input_size")
            size = tuple(int(v) for v in getattr(fn, "legonet_input_size", (3, 32, 32)))
        except (TypeError, ValueError):
            raise ArchitectureError(f"architecture {name!r}: legonet_mean, legonet_std and legonet_input_size "
                                    "must be sequences of numbers") from None
        if len(mean) != len(std) or len(size) != 3 or min(std, default=1.0) <= 0:
            raise ArchitectureError(f"architecture {name!r}: legonet_mean and legonet_std need one value per "
                                    "channel (std > 0) and legonet_input_size is (channels, height, width)")
        return ArchSpec(name, fn, mean, std, size, fixed)
    raise ArchitectureError(f"unknown architecture {name!r}; built in: {', '.join(ZOO)}, or give "
                            "module:callable or path/to/file.py:callable")


def _import_source(where: str, name: str):
    """The module ``where`` names: a Python file (``path/to/file.py``) or an importable module."""
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise ArchitectureError(f"cannot import architecture {name!r}: {where} is not a file")
            spec = importlib.util.spec_from_file_location(f"legonet_user_arch_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except ArchitectureError:
        raise
    except Exception as exc:  # the user's own file may fail in any way: one line naming it
        raise ArchitectureError(f"cannot import architecture {name!r}: {type(exc).__name__}: {exc}") from None


def build(name: str) -> nn.Module:
    model = get_arch(name).build()
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture {name!r} did not return an nn.Module")
    return model


def skeleton(arch_or_module: str | nn.Module) -> nn.Module:
    """A zoo architecture built on the meta device (no weight memory), or the module given."""
    if isinstance(arch_or_module, str):
        import torch

        with torch.device("meta"):
            return build(arch_or_module)
    if isinstance(arch_or_module, nn.Module):
        return arch_or_module
    raise ArchitectureError(f"expected an architecture name or an nn.Module, got {type(arch_or_module).__name__}")


__all__ = ["ZOO", "ArchSpec", "build", "get_arch", "skeleton"]
