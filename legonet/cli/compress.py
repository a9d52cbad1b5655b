"""``legonet compress`` and ``legonet recipe``: the command line of :func:`legonet.compress`."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from legonet.cli.app import main, parse_block, status

def _ratios(_ctx, _param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        ratios = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected a ratio or ratios separated by commas (e.g. 8 or 8,12,16), "
                                 f"got {value!r}") from None
    bad = [r for r in ratios if not r > 1]
    if bad:
        raise click.BadParameter(f"a target ratio must be > 1, got {bad[0]:g}")
    if len(set(ratios)) != len(ratios):
        raise click.BadParameter(f"a ratio is given twice in {value!r}")
    return ratios


def output_paths(output: Path, ratios: tuple[float, ...] | None) -> list[Path]:
    """The file of each ratio: ``output`` itself for one, else ``output`` with ``-<R>x`` before its
    suffix (``r20.lego`` -> ``r20-8x.lego``, ``r20-12x.lego``), or ``{ratio}`` in it replaced."""
    if not ratios or len(ratios) == 1:
        return [output]
    if "{ratio}" in output.name:
        return [output.with_name(output.name.replace("{ratio}", f"{r:g}")) for r in ratios]
    return [output.with_name(f"{output.stem}-{r:g}x{output.suffix}") for r in ratios]


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


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .lego file to write (several ratios: one file each, NAME-8x.lego, ...).")
@click.option("--target-ratio", callback=_ratios, metavar="R[,R...]",
              help="Meet this whole-file ratio (fp32 bytes / file bytes), each tensor at its own block "
                   "shape and K; several ratios (8,12,16) write one file each.")
@click.option("--arch", metavar="NAME",
              help="SRC's architecture (zoo name, module:callable or path/file.py:callable): target mode then "
                   "folds BatchNorm and corrects biases without data, and --calib can be used.")
@click.option("--calib", type=click.Path(path_type=Path), metavar="PATH",
              help="Unlabeled calibration images, a folder of photos or an npz (needs --arch, --target-ratio).")
@click.option("--block", callback=parse_block, metavar="B|RxC",
              help="Without --target-ratio: block size.  [default: 4]")
@click.option("--clusters", "-k", type=click.IntRange(min=1), metavar="K",
              help="Without --target-ratio: centroids per codebook.  [default: 32]")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.toml",
              help="Every other setting (scope, gains, include/exclude, calibration steps...): "
                   "'legonet recipe' prints the defaults.")
@click.option("--device", metavar="DEVICE", help="With --calib: where the model's passes run (cuda, cuda:1).  "
                                                  "[default: cpu]")
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="CPU threads (default: chosen from the cores free to this process).")
@click.option("--per-tensor", is_flag=True, help="Also print the per-tensor table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no report.")
def compress(src, output, target_ratio, arch, calib, block, clusters, recipe, device, threads, per_tensor, quiet):
    """Compress the checkpoint SRC (.safetensors, *.index.json or .pt) into a .lego file.

    \b
    The paper's method:  legonet compress model.safetensors -o m.lego --block 4 -k 32
    A size that keeps accuracy, no data:
                         legonet compress model.safetensors -o m.lego --target-ratio 8 --arch NAME
    Calibrated on unlabeled photos:
                         legonet compress ... --target-ratio 16 --arch NAME --calib photos/
    """
    from legonet.io.atomic import check_writable, refuse_overwriting
    from legonet.io.checkpoints import checkpoint_files
    from legonet.recipe import Recipe, read_recipe

    if calib is not None and (target_ratio is None or arch is None):
        raise click.UsageError("--calib needs --target-ratio and --arch")
    if target_ratio is not None and (block is not None or clusters is not None):
        raise click.UsageError("--block and --clusters are for one setting; --target-ratio chooses them per tensor")
    settings = read_recipe(recipe) if recipe is not None else Recipe()
    dev = parse_device(device)
    if device is not None and calib is None:
        raise click.UsageError("--device needs --calib (only the calibration passes run on a device)")
    outputs = output_paths(output, target_ratio)
    inputs = checkpoint_files(src) + ([calib] if calib is not None and calib.is_file() else [])
    for out in outputs:  # every refusal before any work
        check_writable(out)
        refuse_overwriting(out, inputs)
    from legonet.threads import using_threads

    with using_threads(threads):  # reading photos and streaming shards too; legonet.compress keeps it
        if target_ratio is None:
            _compress_one_setting(src, output, settings, block, clusters, per_tensor, quiet, threads)
        else:
            _compress_to_ratios(src, outputs, target_ratio, arch, calib, settings, dev, per_tensor, quiet, threads)


def _compress_one_setting(src, output, settings, block, clusters, per_tensor, quiet, threads):
    """Without --target-ratio: :class:`LegoConfig` from the recipe, --block/--clusters over it."""
    from dataclasses import replace

    import legonet
    from legonet.io.checkpoints import read_state_dict
    from legonet.progress import progress_bars
    from legonet.report import LOW_SQNR_DB, build_report
    from legonet.streaming import compress_sharded, is_sharded_index

    config = settings.lego
    if block is not None:
        config = replace(config, block=block)
    if clusters is not None:
        config = replace(config, clusters=clusters)
    sd = None
    if is_sharded_index(src) and config.scales == "none" and not config.allow_nonfinite:
        # shard by shard, bounded memory, same bytes as in memory
        with progress_bars(not quiet) as bars:
            cm, nbytes = compress_sharded(src, output, config, progress=bars)
    else:
        with status(quiet, f"reading {src}"):
            sd = read_state_dict(src)
        with progress_bars(not quiet) as bars:
            cm = legonet.compress(sd, config, progress=bars, threads=threads)
        nbytes = cm.save(output)
    report = build_report(cm, nbytes)
    if not quiet:
        click.echo(report.render(per_tensor=per_tensor))
    if config.allow_nonfinite and sd is not None:
        from legonet.clustering import nonfinite_tensors

        kept = nonfinite_tensors(sd)
        if kept:  # said even with --quiet: the user should know what was not compressed and why
            click.echo(f"legonet: kept {len(kept)} tensor(s) holding NaN/Inf uncompressed: "
                       + ", ".join(kept[:10]) + (", ..." if len(kept) > 10 else ""), err=True)
    worst = report.worst_tensor
    if worst is not None and worst.sqnr_db < LOW_SQNR_DB:
        # said even with --quiet: a file that has lost the model's accuracy should not pass unnoticed
        click.echo(f"legonet: warning: lowest tensor SQNR {worst.sqnr_db:.1f} dB ({worst.name}); below "
                   f"{LOW_SQNR_DB:g} dB models usually lose most of their accuracy. For a size that keeps it, try: "
                   f"legonet compress {src} -o {output} --target-ratio 8 --arch NAME", err=True)
    if not quiet:
        click.echo(f"wrote {output}")


def _compress_to_ratios(src, outputs, ratios, arch, calib, settings, device, per_tensor, quiet, threads):
    """Target mode: the model (with --arch) or its state dict, each ratio into its own file."""
    import legonet
    from legonet.io.checkpoints import read_state_dict
    from legonet.progress import progress_bars
    from legonet.report import build_report

    with status(quiet, f"reading {src}"):
        sd = read_state_dict(src)
    model, batches = None, None
    if arch is not None:
        from legonet.artifact import load_weights
        from legonet.cli.data import check_fit
        from legonet.zoo import build

        check_fit(arch, sd, src)  # a mismatch is known now, not after minutes of clustering
        model = build(arch)
        load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, str(src), arch)
        model.eval()
        if calib is not None:
            from legonet.cli.data import calibration_batches

            with status(quiet, f"reading calibration images from {calib}"):
                batches = calibration_batches(calib, arch, settings.calib, settings.target.seed,
                                              settings.target.batch_size)
    # one call for every ratio: the weights are analysed once (legonet.menu_cache)
    with progress_bars(not quiet) as bars:
        cms = legonet.compress(model if model is not None else sd, settings.target, target_ratio=list(ratios),
                               calib=batches, device=device, progress=bars, threads=threads)
    for cm, out in zip(cms, outputs):
        # a module's state may hold what the checkpoint lacks (BatchNorm's num_batches_tracked) and
        # computes in float32: the file keeps the checkpoint's own names and dtypes (it only shrinks)
        cm.tensors = {k: v for k, v in cm.tensors.items() if k in sd}
        cm.adopt_dtypes(sd)
        nbytes = cm.save(out)
        if not quiet:
            click.echo(build_report(cm, nbytes).render(per_tensor=per_tensor))
            for line in cm.log.notes:
                click.echo(line)
            click.echo("time: " + ", ".join(cm.log.timing_lines()))
            click.echo(f"wrote {out}")


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write it here instead of stdout.")
def recipe(output):
    """Print every setting of 'legonet compress' at its default, as a TOML recipe to edit."""
    from legonet.io.atomic import atomic_path
    from legonet.recipe import default_recipe_text

    text = default_recipe_text()
    if output is None:
        click.echo(text, nl=False)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    click.echo(f"wrote {output}")

