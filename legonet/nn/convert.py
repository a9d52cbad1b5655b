"""Whole-model conversion to lean modules, and loading a .lego file onto a meta-device skeleton.

``load_lean(path, "resnet20")`` builds the architecture on the meta device (no storage), fills the
tensors kept dense in the file (BatchNorm, biases), and swaps every module owning a clustered tensor
for its lean counterpart. The dense clustered weights are never materialised.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn

from legonet.aliases import unsupported
from legonet.artifact import ClusteredTensor, CompressedModel, fit_error
from legonet.errors import ArchitectureError
from legonet.nn.modules import LegoConv2d, LegoLinear, LegoModule


def check_fits(model: nn.Module, cm: CompressedModel) -> dict[str, torch.Tensor]:
    """The model's state dict (possibly meta tensors), after checking that ``cm`` fits it."""
    own = model.state_dict(keep_vars=True)
    refusal = unsupported(cm.aliases, "The lean runtime (legonet.nn)")
    if refusal:
        raise ArchitectureError(refusal + "; CompressedModel.load_into gives a dense model")
    err = fit_error({k: tuple(v.shape) for k, v in own.items()},
                    {k: tuple(t.shape) for k, t in cm.tensors.items()}, "compressed model does not fit")
    if err is not None:
        raise err
    return own


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def convert(model: nn.Module, cm: CompressedModel) -> nn.Module:
    """Turn ``model`` (in place) into a lean model holding ``cm``'s weights; returns it.

    ``model`` may live on the meta device. Tensors kept dense in ``cm`` are assigned (cast to the
    model's dtype); every module owning a clustered tensor becomes a :class:`LegoConv2d`,
    :class:`LegoLinear` or :class:`LegoModule`. Raises :class:`ArchitectureError` if ``cm`` does not
    fit ``model``.
    """
    own = check_fits(model, cm)
    for name, t in cm.tensors.items():
        if isinstance(t, torch.Tensor):
            _set_tensor(model, name, t.to(own[name].dtype) if t.is_floating_point() else t.clone())
    for name, t in own.items():  # counters the file may lack
        if name not in cm.tensors and t.is_meta:
            _set_tensor(model, name, torch.zeros(t.shape, dtype=t.dtype))

    by_owner: dict[str, list[str]] = defaultdict(list)
    for name, t in cm.tensors.items():
        if isinstance(t, ClusteredTensor):
            by_owner[name.rpartition(".")[0]].append(name)
    books: dict = {}  # prepared codebooks, shared by every module using the same one
    for owner_name, names in by_owner.items():
        module = model.get_submodule(owner_name)
        leaves = {n.rpartition(".")[2] for n in names}
        if type(module) is nn.Conv2d and leaves == {"weight"} and module.padding_mode == "zeros":
            lean: nn.Module = LegoConv2d.from_module(module, cm, names[0], books)
        elif type(module) is nn.Linear and leaves == {"weight"}:
            lean = LegoLinear.from_module(module, cm, names[0], books)
        else:
            lean = LegoModule.from_module(module, cm, owner_name, books)
        if owner_name:
            parent_name, _, attr = owner_name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, lean)
        else:
            raise ArchitectureError("the model's own top-level tensors are clustered; wrap it in a container module")
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ArchitectureError(f"{len(leftover)} tensor(s) of the model got no value (e.g. {leftover[0]})")
    return model.eval()


def load_lean(path: str | os.PathLike | CompressedModel, arch_or_module: str | nn.Module) -> nn.Module:
    """Lean model from a .lego file (or a loaded :class:`CompressedModel`).

    Args:
        path: .lego file or ``CompressedModel``.
        arch_or_module: a zoo name (``"resnet20"``, ``"module:callable"``), built on the meta device,
            or a module (ideally built under ``torch.device("meta")``).
    """
    from legonet.format import load
    from legonet.zoo import skeleton

    cm = path if isinstance(path, CompressedModel) else load(path)
    return convert(skeleton(arch_or_module), cm)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers; shared
    storages such as a model-wide codebook count once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
