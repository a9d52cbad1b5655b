"""``legonet info`` and ``legonet decompress``: what a .lego file holds, and its dense weights."""

from __future__ import annotations

import json
from pathlib import Path

import click

from legonet.cli.app import main


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--per-tensor", is_flag=True, help="Also print the per-tensor table (each tensor's block and K).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification (faster).")
def info(file, per_tensor, as_json, no_verify):
    """Report on a .lego file, from the file alone."""
    from legonet.format import load
    from legonet.report import build_report

    cm = load(file, verify=not no_verify)
    rep = build_report(cm, file.stat().st_size)
    if as_json:
        config = cm.config.to_dict()
        if rep.block is None:  # tensors have settings of their own (target mode): the config's are unused
            del config["block"], config["clusters"]
        click.echo(json.dumps(rep.to_dict() | {"config": config}, indent=2))
    else:
        click.echo(rep.render(per_tensor=per_tensor))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .safetensors file to write.")
def decompress(file, output):
    """Write the dense weights of a .lego file as .safetensors (the names, shapes and dtypes of the
    checkpoint it was compressed from)."""
    from safetensors.torch import save as st_save

    from legonet.artifact import fills
    from legonet.format import load
    from legonet.io.atomic import atomic_path, check_writable, refuse_overwriting

    check_writable(output)
    refuse_overwriting(output, [file])
    cm = load(file)
    # safetensors refuses tensors that share memory: a tied tensor is written under each name
    sd = {k: (v.clone() if k in cm.aliases else v.contiguous()) for k, v in cm.to_state_dict().items()}
    data = st_save(sd, metadata={"source": "legonet decompress"})
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)
    click.echo(f"wrote {output} ({len(sd)} tensors, {len(data):,} bytes): the compressed model's values "
               "under the names and shapes of the checkpoint it came from")
    constant = fills(cm.tensors)
    folded = [k for k in constant if k.endswith("running_mean") and constant[k] == 0.0]
    if folded:
        click.echo(f"{len(folded)} BatchNorm layers are in inference form: their statistics are folded into "
                   "weight and bias (running mean 0, variance 1 - eps), which gives the same outputs in eval mode")
    narrow = [k for k, t in cm.dense.items() if str(t.dtype) == "torch.float16"]
    if narrow and cm.config.kept_dtype == "float16" and not cm.source_dtypes:  # files that predate source_dtypes
        click.echo(f"{len(narrow)} kept tensors are float16 as stored: this file does not record the dtype they had")
