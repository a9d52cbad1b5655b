"""What the commands read besides checkpoints: an architecture and the images it takes."""

from __future__ import annotations

from pathlib import Path

import torch

from legonet.calibrate.data import Calibration
from legonet.data import to_input


def check_fit(arch: str, sd, src: Path) -> None:
    """Raise :class:`~legonet.errors.ArchitectureError` naming the file unless ``sd`` fits ``arch``
    (built without weight memory: it costs nothing)."""
    from legonet.artifact import fit_error
    from legonet.zoo import skeleton

    own = {k: tuple(v.shape) for k, v in skeleton(arch).state_dict().items()}
    err = fit_error(own, {k: tuple(v.shape) for k, v in sd.items()}, f"{src}: weights do not fit", arch)
    if err is not None:
        raise err


def image_source(path: Path, arch: str, *, labels: bool):
    """The images of ``path`` (a folder of photos or an npz) as ``arch`` takes them, checked: every
    photo's header is read now, so that a bad file fails before any work."""
    from legonet.io.images import open_images
    from legonet.zoo import get_arch

    spec = get_arch(arch)
    size = spec.input_size[1:] if spec.fixed_size else None
    source = open_images(path, size=size, labels=labels)
    source.check()
    return source, spec


def calibration_batches(path: Path, arch: str, settings, seed: int, batch_size: int) -> Calibration:
    """``settings.images`` calibration images of ``path`` (a seeded subset where there are more),
    normalised for ``arch``, in batches of ``batch_size``. They are decoded once and kept (as the
    network's float inputs) for the calibrated passes, which go over them several times."""
    source, spec = image_source(path, arch, labels=False)
    source = source.subset(settings.images, seed)
    batches = [to_input(x, spec.mean, spec.std) for x, _ in source.batches(batch_size, workers=settings.workers)]
    return Calibration.of(batches)


@torch.no_grad()
def predictions(model: torch.nn.Module, source, spec, batch_size: int = 100):
    """``(predicted class, label)`` arrays of every image of ``source``, read a batch at a time."""
    import numpy as np

    model.eval()
    preds, labels = [], []
    for x, y in source.batches(batch_size):
        preds.append(model(to_input(x, spec.mean, spec.std)).argmax(1).numpy())
        labels.append(y)
    return np.concatenate(preds), np.concatenate(labels)
