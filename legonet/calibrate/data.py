"""Calibration inputs of any model: batches of tensors, of positional arguments, or of keyword arguments.

A CNN takes an image tensor; a language model takes token ids and an attention mask; a Hugging Face
model takes a dict. :class:`Calibration` holds whatever the user gives, one entry per batch, and
every calibrated step feeds it through :func:`run_model`, which calls the model the way the batch
says and takes the tensor the model returns (:func:`output_tensor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from legonet.errors import ConfigError

# One calibration batch: a tensor (the model's only input), a tuple of positional arguments, or a
# mapping of keyword arguments; tensors in it have the batch on their first axis.
Batch = torch.Tensor | tuple | Mapping


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor in it moved to ``device`` (other values as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


def batch_length(batch: Batch) -> int:
    """Samples in ``batch``: the first axis of its first tensor."""
    tensors = _tensors(batch)
    if not tensors or tensors[0].ndim == 0:
        raise ConfigError(f"a calibration batch must hold a tensor with a batch axis, got {type(batch).__name__}")
    return int(tensors[0].shape[0])


def output_tensor(out: object) -> torch.Tensor:
    """The tensor a model's output stands for: the output itself, its ``logits``, its
    ``last_hidden_state``, or the first tensor of a tuple (Hugging Face models return such objects)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"the model returned a {type(out).__name__}, not a tensor (or an object with logits "
                      "or last_hidden_state); calibration needs a tensor output")


def run_model(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` as the batch says; the output tensor."""
    if isinstance(batch, Mapping):
        return output_tensor(model(**batch))
    if isinstance(batch, (tuple, list)):
        return output_tensor(model(*batch))
    return output_tensor(model(batch))


@dataclass(frozen=True)
class Calibration:
    """Calibration batches, held as given (on the CPU or wherever they are) and fed again for every pass.

    Build it with :meth:`of`. ``samples`` is the number of samples over all batches.
    """

    batches: tuple[Batch, ...]
    samples: int

    @classmethod
    def of(cls, calib: torch.Tensor | Iterable[Batch] | "Calibration", batch_size: int = 64) -> "Calibration":
        """From a tensor ``(N, ...)`` of inputs (split into batches of ``batch_size``) or an iterable
        of batches (read once and kept: a generator can be given)."""
        if isinstance(calib, Calibration):
            return calib
        if isinstance(calib, torch.Tensor):
            if calib.ndim == 0 or calib.shape[0] == 0:
                raise ConfigError("the calibration tensor holds no samples")
            batches = tuple(calib[s : s + batch_size] for s in range(0, calib.shape[0], batch_size))
        elif isinstance(calib, (Mapping, str, bytes)) or not isinstance(calib, Iterable):
            raise ConfigError("calib must be a tensor of inputs or an iterable of batches (tensors, tuples of "
                              f"arguments or dicts of keyword arguments), got {type(calib).__name__}")
        else:
            batches = tuple(calib)
        if not batches:
            raise ConfigError("no calibration batch was given")
        return cls(batches, sum(batch_length(b) for b in batches))

    def __len__(self) -> int:
        return self.samples

    def iter(self, device: torch.device | str | None = None) -> Iterator[Batch]:
        """The batches, each moved to ``device`` as it is reached (all of them, in order)."""
        for b in self.batches:
            yield b if device is None else batch_to(b, device)

    def stacked(self) -> torch.Tensor | None:
        """All samples as one tensor ``(N, ...)`` when every batch is a floating-point tensor of one
        trailing shape (images, say), else None: refinement then draws its own mini-batches."""
        first = self.batches[0]
        if not all(isinstance(b, torch.Tensor) and b.is_floating_point() and b.shape[1:] == first.shape[1:]
                   for b in self.batches):
            return None
        return torch.cat(self.batches) if len(self.batches) > 1 else first
