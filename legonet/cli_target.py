"""Target mode from the command line's options: the plain, data-free and calibrated pipelines.

Kept apart from :mod:`legonet.cli` (the commands and their options): this part builds the model,
reads the calibration images and hands the refinement options over.
"""

from __future__ import annotations

import click
import torch

from legonet.artifact import load_weights


def parse_device(name: str | None) -> torch.device:
    """``--device`` as a :class:`torch.device` (CPU when not given); a usage error names what is wrong."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise click.UsageError(f"--device {name!r} is not a device PyTorch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise click.UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise click.UsageError(f"--device {name}: only 'cpu' and 'cuda[:N]' are supported")
    return device


def compress_to_ratio_from_options(sd, config, target_ratio, arch, calib, calib_images, seed, refinement,
                                   pipeline, device, progress, notes=None):
    """Target mode as the CLI's options ask: plain, data-free (``arch``) or calibrated (``calib``).

    ``refinement`` holds :class:`RefineConfig` fields and ``pipeline`` keywords of
    :func:`calibrated_compress` (``norm_statistics``, ``group_channels``), None where not given
    (their defaults then). Lines the user should see after the report are appended to ``notes``."""
    from legonet.target import compress_to_ratio

    if calib is None:
        if arch is None:
            return compress_to_ratio(sd, target_ratio, config=config, progress=progress)[0]
        # the architecture is known: BatchNorm folding and bias correction, data-free
        from legonet.datafree.pipeline import datafree_compress
        from legonet.zoo import build

        def note(report) -> None:
            if notes is not None:
                notes.append(report.describe())

        return datafree_compress(build(arch), target_ratio, sd, config=config, progress=progress,
                                 on_correction=note)[0]
    from legonet.calibrate.pipeline import calibrated_compress_to_ratio
    from legonet.data import load_images, to_input
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    model = build(arch)
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "weights")
    images = load_images(calib, labels=False).subset(calib_images, seed)
    x = to_input(images.x, spec.mean, spec.std)
    model.to(device)  # the passes run there; the pipeline moves the images a batch at a time
    from legonet.calibrate.refine import RefineConfig

    # refinement: RefineConfig's fields as the user gave them, None where not given (its default then)
    chosen = {k: v for k, v in refinement.items() if v is not None}
    refine = None if chosen.get("epochs") == 0 else RefineConfig(seed=seed, **chosen)

    def on_step(step: int, steps: int, loss: float) -> None:
        if progress is not None:
            progress(f"refining codebooks on {x.shape[0]} calibration images: step {step}/{steps}, "
                     f"distillation loss {loss:.4f}")

    options = {k: v for k, v in pipeline.items() if v is not None}
    cm, _plan = calibrated_compress_to_ratio(model, target_ratio, x, config=config, refine=refine,
                                             progress=progress, on_refine_step=on_step, **options)
    # the model's state has what the checkpoint may lack (BatchNorm's num_batches_tracked) and
    # computed in float32: the file keeps the checkpoint's own names and dtypes (it only shrinks)
    cm.tensors = {k: v for k, v in cm.tensors.items() if k in sd}
    cm.adopt_dtypes(sd)
    return cm
