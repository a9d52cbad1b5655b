"""Built-in architectures (no weights): name -> constructor and input normalisation.

``get_arch("module:callable")`` imports any other architecture; such a callable takes no arguments
and returns an ``nn.Module``; its normalisation defaults to none (mean 0, std 1) unless the module
object has ``legonet_mean``/``legonet_std`` attributes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from legonet.errors import ArchitectureError
from legonet.zoo import resnet50, resnet_cifar, vgg

CIFAR_RESNET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RESNET50_CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ArchSpec:
    """An architecture and how to feed it: inputs are ``(x/255 - mean) / std`` per channel."""

    name: str
    build: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int] = (3, 32, 32)


ZOO: dict[str, ArchSpec] = {
    **{f"resnet{d}": ArchSpec(f"resnet{d}", getattr(resnet_cifar, f"resnet{d}"), *CIFAR_RESNET_NORM)
       for d in (20, 32, 44, 56, 110)},
    "resnet50_cifar": ArchSpec("resnet50_cifar", resnet50.resnet50_cifar, *RESNET50_CIFAR_NORM),
    "vgg16": ArchSpec("vgg16", vgg.vgg16, *IMAGENET_NORM, input_size=(3, 224, 224)),
}


def get_arch(name: str) -> ArchSpec:
    """Look up a zoo architecture, or import ``module:callable``."""
    if name in ZOO:
        return ZOO[name]
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
        except (ImportError, AttributeError) as exc:
            raise ArchitectureError(f"cannot import architecture {name!r}: {exc}") from None
        if not callable(fn):
            raise ArchitectureError(f"architecture {name!r} is not callable")
        mean = getattr(fn, "legonet_mean", (0.0, 0.0, 0.0))
        std = getattr(fn, "legonet_std", (1.0, 1.0, 1.0))
        return ArchSpec(name, fn, tuple(mean), tuple(std))
    raise ArchitectureError(f"unknown architecture {name!r}; built in: {', '.join(ZOO)}, or give module:callable")


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
