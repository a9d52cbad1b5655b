"""``legonet eval``: top-1 of an architecture with weights from any file legonet reads."""

from __future__ import annotations

from pathlib import Path

import click

from legonet.cli.app import main


def load_model(arch: str, weights: Path):
    """``(model with the weights of the file, its ArchSpec)``; errors name the file and the architecture."""
    from legonet.artifact import load_weights
    from legonet.io.checkpoints import read_state_dict
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    model = build(arch)
    load_weights(model, read_state_dict(weights), str(weights), arch)
    return model.eval(), spec


@main.command(name="eval")
@click.option("--arch", required=True, help="Architecture: zoo name (e.g. resnet20), module:callable or path/file.py:callable.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help=".safetensors, *.index.json, .pt or .lego file.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Labelled images: a folder of photos (labels.csv with file,label, or one subfolder per class) "
                   "or an npz (x uint8 (N,H,W,3), y); photos are resized and center-cropped to the input size.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path),
              help="Also evaluate these weights (e.g. the uncompressed checkpoint) and say how often the two agree.")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate on a seeded random subset of this many images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
def eval_cmd(arch, weights, data, reference, limit, seed):
    """Top-1 accuracy of an architecture with the given weights (images read a batch at a time)."""
    from legonet.cli.data import image_source, predictions
    from legonet.evaluate import wilson_interval

    model, spec = load_model(arch, weights)
    ref_model = load_model(arch, reference)[0] if reference is not None else None
    source, spec = image_source(data, arch, labels=True)
    source = source.subset(limit, seed)
    pred, labels = predictions(model, source, spec)
    n = len(labels)
    acc = float((pred == labels).mean())
    lo, hi = wilson_interval(acc, n)
    click.echo(f"top-1 {100 * acc:.2f} % on {n} images (95 % interval {100 * lo:.1f}-{100 * hi:.1f} %)")
    if ref_model is not None:
        ref_pred, _ = predictions(ref_model, source, spec)
        ref_acc = float((ref_pred == labels).mean())
        click.echo(f"reference {reference}: top-1 {100 * ref_acc:.2f} %; the two agree on the top-1 of "
                   f"{100 * float((pred == ref_pred).mean()):.2f} % of the images; top-1 "
                   f"{100 * (acc - ref_acc):+.2f} points against the reference")
