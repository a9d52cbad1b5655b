"""The ``legonet`` command line: compress, info, decompress, eval, demo.

Every failure legonet anticipates exits with status 1 and one line naming the problem; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path

import click

from legonet.artifact import load_weights
from legonet.errors import LegoError


class _Cli(click.Group):
    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LegoError as exc:
            if debug:
                raise
            click.echo(f"legonet: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("legonet: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug in legonet, but still one line unless --debug
            if debug:
                raise
            click.echo(f"legonet: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                       err=True)
            sys.exit(2)


def _parse_block(_ctx, _param, value: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", value or "")
    if not m:
        raise click.BadParameter(f"expected B or RxC (e.g. 4 or 2x8), got {value!r}")
    r = int(m.group(1))
    return (r, int(m.group(2)) if m.group(2) else r)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def bundled(name: str) -> Path:
    """Path of a fixture shipped inside the package (``legonet/data``)."""
    return Path(str(resources.files("legonet") / "data" / name))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="legonet")
def main(debug: bool) -> None:  # noqa: ARG001
    """Shrink trained networks by block weight clustering (LegoNet)."""


@main.command()
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .lego file to write.")
@click.option("--block", default="4", callback=_parse_block, show_default=True, help="Block size B or RxC.")
@click.option("--clusters", "-k", type=int, default=32, show_default=True, help="K, centroids per codebook.")
@click.option("--scope", type=click.Choice(["model", "layer"]), default="model", show_default=True,
              help="One model-wide codebook (the paper) or one per tensor.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--include", multiple=True, help="Glob of tensor names to cluster (repeatable; default all).")
@click.option("--exclude", multiple=True, help="Glob of tensor names to keep as they are (repeatable).")
@click.option("--codebook-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--per-tensor", is_flag=True, help="Also print the per-tensor table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress and no report.")
def compress(src, output, block, clusters, scope, seed, include, exclude, codebook_dtype, per_tensor, quiet):
    """Compress the checkpoint SRC (.safetensors, *.index.json or .pt) into a .lego file."""
    from legonet.compress import compress as do_compress
    from legonet.config import LegoConfig
    from legonet.io.checkpoints import read_state_dict
    from legonet.report import build_report

    config = LegoConfig(block=block, clusters=clusters, scope=scope, seed=seed,
                        include=tuple(include) or ("*",), exclude=tuple(exclude), codebook_dtype=codebook_dtype)
    console = _console()
    with console.status(f"reading {src}", spinner="dots") if not quiet else _null() as status:
        sd = read_state_dict(src)

        def progress(msg: str) -> None:
            if status is not None:
                status.update(msg)

        cm = do_compress(sd, config, progress=progress)
        if status is not None:
            status.update(f"writing {output}")
        nbytes = cm.save(output)
    if not quiet:
        click.echo(build_report(cm, nbytes).render(per_tensor=per_tensor))
        click.echo(f"wrote {output}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--per-tensor", is_flag=True, help="Also print the per-tensor table.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checksum verification (faster).")
def info(file, per_tensor, as_json, no_verify):
    """Report on a .lego file, from the file alone."""
    from legonet.format import load
    from legonet.report import build_report

    cm = load(file, verify=not no_verify)
    rep = build_report(cm, file.stat().st_size)
    if as_json:
        click.echo(json.dumps(rep.to_dict() | {"config": cm.config.to_dict()}, indent=2))
    else:
        click.echo(rep.render(per_tensor=per_tensor))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .safetensors file to write.")
def decompress(file, output):
    """Write the dense weights of a .lego file as .safetensors (same names, shapes, dtypes)."""
    from safetensors.torch import save as st_save

    from legonet.format import load
    from legonet.io.atomic import atomic_path

    sd = {k: v.contiguous() for k, v in load(file).to_state_dict().items()}
    data = st_save(sd, metadata={"source": "legonet decompress"})
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)
    click.echo(f"wrote {output} ({len(sd)} tensors, {len(data):,} bytes)")


def _load_model(arch: str, weights: Path):
    from legonet.io.checkpoints import read_state_dict
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    model = build(arch)
    sd = read_state_dict(weights)
    load_weights(model, sd, str(weights))
    return model, spec


def evaluate_file(arch: str, weights: Path, data: Path, limit: int | None, seed: int, quiet: bool = True) -> tuple[float, int]:
    """Top-1 of zoo model ``arch`` with ``weights`` on an npz; returns (accuracy, images)."""
    from legonet.data import load_images
    from legonet.evaluate import top1

    model, spec = _load_model(arch, weights)
    images = load_images(data).subset(limit, seed)
    return top1(model, images, spec.mean, spec.std), len(images)


@main.command(name="eval")
@click.option("--arch", required=True, help="Zoo architecture (e.g. resnet20) or module:callable.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help=".safetensors, *.index.json, .pt or .lego file.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="npz with x uint8 (N,H,W,3) and y labels.")
@click.option("--limit", type=int, default=None, help="Evaluate on a seeded random subset of this many images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
def eval_cmd(arch, weights, data, limit, seed):
    """Top-1 accuracy of an architecture with the given weights."""
    from legonet.evaluate import wilson_interval

    acc, n = evaluate_file(arch, weights, data, limit, seed)
    lo, hi = wilson_interval(acc, n)
    click.echo(f"top-1 {100 * acc:.2f} % on {n} images (95 % interval {100 * lo:.1f}-{100 * hi:.1f} %)")


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("legonet-demo/resnet20.lego"), show_default=True, help="Where to write the .lego file.")
@click.option("--block", default="4", callback=_parse_block, show_default=True)
@click.option("--clusters", "-k", type=int, default=32, show_default=True)
def demo(output, block, clusters):
    """Compress the bundled ResNet-20 (paper setting), evaluate before and after, print one table."""
    from rich.table import Table

    from legonet.compress import compress as do_compress
    from legonet.config import LegoConfig
    from legonet.data import load_images
    from legonet.evaluate import top1
    from legonet.format import load
    from legonet.io.checkpoints import read_state_dict
    from legonet.report import build_report
    from legonet.zoo import build, get_arch

    weights, data = bundled("resnet20_cifar10.safetensors"), bundled("cifar10-test-1000.npz")
    spec = get_arch("resnet20")
    images = load_images(data)
    console = _console()
    with console.status("evaluating the original ResNet-20", spinner="dots") as status:
        model = build("resnet20")
        sd = read_state_dict(weights)
        load_weights(model, sd, str(weights))
        before = top1(model, images, spec.mean, spec.std)
        status.update(f"compressing ({block[0]}x{block[1]} blocks, K={clusters}, one model-wide codebook)")
        cm = do_compress(sd, LegoConfig(block=block, clusters=clusters, scope="model"))
        output.parent.mkdir(parents=True, exist_ok=True)
        nbytes = cm.save(output)
        status.update("evaluating the compressed model (read back from the .lego file)")
        load(output).load_into(model)
        after = top1(model, images, spec.mean, spec.std)
    rep = build_report(cm, nbytes)
    table = Table(title=f"legonet demo: ResNet-20, CIFAR-10 ({len(images)} bundled test images)")
    for col in ("original (fp32)", ".lego file", "ratio", "bits/weight", "top-1 before", "top-1 after"):
        table.add_column(col, justify="right")
    table.add_row(f"{rep.original_fp32_bytes:,} B", f"{rep.file_bytes:,} B", f"{rep.ratio:.1f}x",
                  f"{rep.bits_per_weight:.3f}", f"{100 * before:.1f} %", f"{100 * after:.1f} %")
    from rich.console import Console

    Console(width=120).print(table)
    click.echo(f"setting: {block[0]}x{block[1]} blocks, K={clusters}, one model-wide codebook, no data, no retraining; "
               f"paper's ratio (clustered tensors only) {rep.paper_ratio:.1f}x; wrote {output}")


# issue 5: C export and footprint (bodies in legonet/export/cli.py)
from legonet.export.cli import export_c_cmd, footprint_cmd  # noqa: E402

main.add_command(export_c_cmd)
main.add_command(footprint_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
