"""``legonet export-c``, ``legonet export-onnx`` and ``legonet footprint``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from legonet.cli.app import main, parse_input_size


def _blocks(_ctx, _param, values: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for value in values:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", value or "")
        if not m:
            raise click.BadParameter(f"expected B or RxC (e.g. 4 or 2x8), got {value!r}")
        out.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    return tuple(out)


@main.command(name="export-c")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", required=True,
              help="Architecture the .lego file was compressed from: zoo name (e.g. resnet20), module:callable "
                   "or path/file.py:callable (the callable returns the nn.Module).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write model.h, model.c, main.c and the Cortex-M7 firmware files into.")
@click.option("--input-size", callback=parse_input_size, metavar="C,H,W",
              help="Input shape without the batch (default: the architecture's; 3,32,32 for a callable).")
def export_c_cmd(file, arch, output, input_size):
    """Write portable C99 (model.h, model.c, example main.c, Cortex-M7 firmware) running FILE.lego on a
    microcontroller: weights decoded block by block from flash, activations in one static arena."""
    from legonet.export.c import export_c
    from legonet.format import load

    from legonet.export.c.codegen import OUTPUT_FILES
    from legonet.io.atomic import refuse_overwriting

    for name in OUTPUT_FILES:
        refuse_overwriting(output / name, [file])
    info = export_c(load(file), arch, output, input_size)
    click.echo(f"wrote {', '.join(info.files)} in {output}")
    click.echo(f"flash (const arrays): {info.flash_bytes:,} B = codebooks {info.codebook_bytes:,} + indices "
               f"{info.index_bytes:,} + row gains {info.scale_bytes:,} + dense tensors {info.dense_bytes:,}")
    click.echo(f"peak RAM (static buffers): {info.ram_bytes:,} B = activation arena {info.activation_bytes:,} "
               f"(without reuse: {info.activation_sum_bytes:,}) + decode scratch {info.scratch_bytes:,} "
               f"(plus the caller's image+outputs: {info.io_bytes:,} B)")


@main.command(name="footprint")
@click.option("--arch", required=True, help="Zoo architecture (e.g. vgg16, resnet20) or module:callable.")
@click.option("--block", "blocks", multiple=True, default=("4",), callback=_blocks, show_default=True,
              help="legonet block size B or RxC (repeatable; paired with --clusters).")
@click.option("--clusters", "-k", multiple=True, type=int, default=(32,), show_default=True,
              help="legonet K (repeatable; one per --block, or one for all).")
@click.option("--scope", type=click.Choice(["model", "layer"]), default="model", show_default=True)
@click.option("--palette-bits", multiple=True, type=click.IntRange(1, 8), default=(4,), show_default=True,
              help="Bits of the palettized (LUT) baseline (repeatable).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a bar chart (PNG/SVG).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def footprint_cmd(arch, blocks, clusters, scope, palette_bits, plot_path, as_json):
    """Weight memory of ARCH for fp32/fp16/int8/int4/palettized/legonet against STM32F7 memories."""
    from legonet.config import LegoConfig
    from legonet.errors import ConfigError
    from legonet.footprint import STM32F7, footprint, plot, render_table

    if len(clusters) == 1:
        clusters = clusters * len(blocks)
    if len(blocks) == 1 and len(clusters) > 1:
        blocks = blocks * len(clusters)
    if len(blocks) != len(clusters):
        raise ConfigError(f"give one --clusters per --block (got {len(blocks)} blocks, {len(clusters)} K values)")
    if plot_path:  # before any work: no table printed, then an error
        from legonet.footprint import pyplot
        from legonet.io.atomic import check_writable

        pyplot()
        check_writable(plot_path)
    configs = [LegoConfig(block=b, clusters=k, scope=scope) for b, k in zip(blocks, clusters)]
    entries = footprint(arch, configs, tuple(palette_bits))
    if as_json:
        click.echo(json.dumps({"arch": arch, "entries": [e.__dict__ for e in entries],
                               "devices": [d.__dict__ for d in STM32F7]}, indent=2))
    else:
        click.echo(render_table(arch, entries))
    if plot_path:
        plot(arch, entries, plot_path)
        click.echo(f"wrote {plot_path}")


@main.command(name="export-onnx")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", required=True,
              help="Architecture the .lego file was compressed from: zoo name, module:callable or path/file.py:callable.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .onnx file to write.")
@click.option("--input-size", callback=parse_input_size, metavar="C,H,W",
              help="Input shape without the batch (default: the architecture's).")
def export_onnx_cmd(file, arch, output, input_size):
    """Write an ONNX file of FILE.lego whose weights stay compressed (rebuilt in the graph from
    codebooks and bit-packed indices); input float32 NCHW, batch dynamic."""
    from legonet.export.onnx import export_onnx
    from legonet.format import load
    from legonet.io.atomic import refuse_overwriting

    refuse_overwriting(output, [file])
    info = export_onnx(load(file), arch, output, input_size)
    lego_bytes = Path(file).stat().st_size
    shape = ", ".join(str(d) for d in info.input_shape)
    click.echo(f"wrote {output}: {info.onnx_bytes:,} B, {info.onnx_bytes / lego_bytes:.2f}x the .lego file "
               f"({lego_bytes:,} B); {info.clustered} tensors rebuilt from codebooks, {info.kept} kept; "
               f"input float32 ({shape})")
