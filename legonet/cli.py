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
from legonet.config import FEATURE_FALLBACKS, NORM_STATISTICS, PRECISIONS
from legonet.errors import LegoError


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split()) or "(no message)"


# The library's errors name its Python arguments; on the command line the user knows the flags.
_FLAGS = (
    (re.compile(r"\ballow_nonfinite\b"), "--allow-nonfinite"),
    (re.compile(r"\b(scope|scales|scale_stat)='([\w-]+)'"), lambda m: f"--{m[1].replace('_', '-')} {m[2]}"),
    (re.compile(r"\btarget_ratio\b"), "--target-ratio"),
    (re.compile(r"\blower K\b"), "lower K (--clusters)"),
)


def _in_flags(msg: str) -> str:
    """``msg`` with the Python argument names it mentions replaced by the CLI's flags."""
    for pattern, flag in _FLAGS:
        msg = pattern.sub(flag, msg)
    return msg


class _Cli(click.Group):
    """Every failure: one line on stderr naming the problem, non-zero exit; ``--debug`` re-raises.

    Exit status 1 for legonet's own errors (bad input, bad file), 2 for usage errors, 2 for a bug
    in legonet (still one line), 130 on Ctrl-C, 128+N when killed by signal N during a write.
    """

    def main(self, *args, **kwargs):
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # click >= 8.2
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # one line instead of click's usage block
            where = exc.ctx.command_path if exc.ctx is not None else "legonet"
            click.echo(f"legonet: error: {_one_line(exc.format_message())} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"legonet: error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("legonet: aborted", err=True)
            sys.exit(1)
        # non-standalone click returns the exit code of ctx.exit()/--help/--version, else the result
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except LegoError as exc:
            if debug:
                raise
            click.echo(f"legonet: error: {_in_flags(_one_line(exc))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("legonet: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug in legonet, but still one line unless --debug
            if debug:
                raise
            click.echo(f"legonet: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} "
                       "(run with --debug for the traceback)", err=True)
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
@click.option("--allow-nonfinite", is_flag=True,
              help="Keep tensors holding NaN/Inf uncompressed (reported) instead of refusing the model.")
@click.option("--scales", type=click.Choice(["none", "row"]), default="none", show_default=True,
              help="Per-row float16 gains (gain-shape clustering).")
@click.option("--scale-stat", type=click.Choice(["rms", "absmax"]), default="rms", show_default=True,
              help="With --scales row: normalise each row by its RMS or by its largest magnitude.")
@click.option("--unshrink", is_flag=True,
              help="With --scales row: rescale each row's gain so that clustering does not shrink the row "
                   "(target mode always does).")
@click.option("--compact-storage", is_flag=True,
              help="Store the row gains and codebook of every tensor clustered at <= 12 dB SQNR in 8 bits and the "
                   "metadata compressed (format version 3; target mode always does).")
@click.option("--entropy-coding", is_flag=True,
              help="Entropy-code each tensor's indices by their own frequencies where that is smaller than "
                   "bit-packing them (format version 4; target mode always does).")
@click.option("--target-ratio", type=float, default=None,
              help="Choose per-tensor block/K to meet this whole-file ratio (ignores --block/--clusters/--scope).")
@click.option("--arch", default=None,
              help="Zoo architecture: needed with --calib; in target mode it also stores BatchNorm in inference "
                   "form (statistics folded into weight/bias, eval outputs unchanged) and, without --calib, "
                   "enables data-free bias correction.")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="npz of unlabeled calibration images: enables activation-aware clustering, a least-squares "
                   "fit of codebooks and row gains to layer outputs, BatchNorm re-estimation and codebook "
                   "refinement (with --target-ratio).")
@click.option("--calib-images", type=int, default=1024, show_default=True,
              help="How many calibration images to use (seeded random subset).")
@click.option("--refine-epochs", type=click.FloatRange(min=0), default=None,
              help="With --calib: passes over the calibration images of codebook refinement by distillation "
                   "(indices fixed; codebooks, row gains and norm affine parameters tuned). 0 turns it off. "
                   "[default: 7.5]")
@click.option("--refine-feature-weight", type=click.FloatRange(min=0), default=None,
              help="With --calib: weight of refinement's second term, the relative squared error of the "
                   "features entering the model's last Linear layer (0: logits only). [default: 10]")
@click.option("--refine-feature-fallback", type=click.Choice(FEATURE_FALLBACKS), default=None,
              help="With --calib: what that term does while the compressed features are further from the "
                   "original's than zeros are: match their direction ('cosine') or nothing ('none'). "
                   "[default: cosine]")
@click.option("--refine-average", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help="With --calib: decay of the moving average of the tuned parameters that refinement "
                   "writes back instead of its last step's (0: the last step's). [default: 0.97]")
@click.option("--refine-precision", type=click.Choice(PRECISIONS), default=None,
              help="With --calib: precision of refinement's passes through the compressed model; "
                   "'bfloat16' is about twice as fast on CPUs and GPUs with native bfloat16 and slower "
                   "elsewhere. [default: float32]")
@click.option("--refine-boundary-share", type=click.FloatRange(min=0, max=1), default=None,
              help="With --calib: refinement also distils on a view of every calibration image moved by one "
                   "gradient step that removes this share of the original model's top-1 margin (0: off). "
                   "[default: 0.5]")
@click.option("--norm-statistics", type=click.Choice(NORM_STATISTICS), default=None,
              help="With --calib: how BatchNorm statistics are re-estimated on the calibration images: "
                   "'relative' moves the model's stored statistics by the change compression makes to "
                   "them; 'replace' replaces them by the calibration images' own. [default: relative]")
@click.option("--group-channels/--no-group-channels", default=None,
              help="With --calib: first reorder hidden channels that can be reordered without changing the "
                   "network's function, so that alike weight rows share blocks. [default: on]")
@click.option("--device", default=None,
              help="With --calib: where the model's passes run (input statistics, BatchNorm re-estimation, "
                   "refinement), e.g. 'cuda' or 'cuda:1'; clustering and the layer fit stay on the CPU. "
                   "[default: cpu]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for k-means (default: PyTorch's; 1 is often faster on a busy machine).")
def compress(src, output, block, clusters, scope, seed, include, exclude, codebook_dtype, per_tensor, quiet,
             allow_nonfinite, scales, scale_stat, unshrink, compact_storage, entropy_coding, target_ratio, arch, calib, calib_images, refine_epochs,
             refine_feature_weight, refine_feature_fallback, refine_average, refine_precision, refine_boundary_share,
             norm_statistics, group_channels, device, threads):
    """Compress the checkpoint SRC (.safetensors, *.index.json or .pt) into a .lego file."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from legonet.compress import compress as do_compress
    from legonet.config import LegoConfig
    from legonet.io.checkpoints import read_state_dict
    from legonet.report import LOW_SQNR_DB, build_report

    config = LegoConfig(block=block, clusters=clusters, scope=scope, seed=seed,
                        include=tuple(include) or ("*",), exclude=tuple(exclude), codebook_dtype=codebook_dtype,
                        allow_nonfinite=allow_nonfinite, scales=scales, scale_stat=scale_stat, unshrink=unshrink,
                        compact_storage=compact_storage, entropy_coding=entropy_coding)
    if calib is not None and (target_ratio is None or arch is None):
        raise click.UsageError("--calib needs --target-ratio and --arch")
    for flag, value in (("--refine-epochs", refine_epochs), ("--refine-feature-weight", refine_feature_weight),
                        ("--refine-feature-fallback", refine_feature_fallback), ("--refine-average", refine_average),
                        ("--refine-precision", refine_precision),
                        ("--refine-boundary-share", refine_boundary_share), ("--norm-statistics", norm_statistics),
                        ("--group-channels/--no-group-channels", group_channels), ("--device", device)):
        if value is not None and calib is None:
            raise click.UsageError(f"{flag} needs --calib")
    from legonet.cli_target import compress_to_ratio_from_options, parse_device

    device = parse_device(device)
    from legonet.io.atomic import check_writable, refuse_overwriting
    from legonet.io.checkpoints import checkpoint_files
    from legonet.progress import progress_bars

    check_writable(output)
    refuse_overwriting(output, checkpoint_files(src))
    if calib is not None:
        refuse_overwriting(output, [calib], "calibration data")
    from legonet.streaming import compress_sharded, is_sharded_index

    sd = None
    notes: list[str] = []  # lines for the user after the report
    if is_sharded_index(src) and target_ratio is None and scales == "none" and not allow_nonfinite:
        # shard by shard, bounded memory, same bytes as in memory
        with progress_bars(not quiet) as bars:
            cm, nbytes = compress_sharded(src, output, config, progress=bars)
    else:
        with _console().status(f"reading {src}", spinner="dots") if not quiet else _null():
            sd = read_state_dict(src)
        if arch is not None:  # a mismatch is known now, not after minutes of clustering
            _check_fit(arch, sd, src)
        if target_ratio is None:
            with progress_bars(not quiet) as bars:
                cm = do_compress(sd, config, bars=bars)
        else:
            with _console().status("target mode", spinner="dots") if not quiet else _null() as status:
                refinement = {"epochs": refine_epochs, "feature_weight": refine_feature_weight,
                              "feature_fallback": refine_feature_fallback, "average": refine_average,
                              "precision": refine_precision, "boundary_share": refine_boundary_share}
                pipeline = {"norm_statistics": norm_statistics, "group_channels": group_channels}
                cm = compress_to_ratio_from_options(sd, config, target_ratio, arch, calib, calib_images, seed,
                                                    refinement, pipeline, device,
                                                    status.update if status is not None else None, notes)
        nbytes = cm.save(output)
    report = build_report(cm, nbytes)
    if not quiet:
        click.echo(report.render(per_tensor=per_tensor))
        for line in notes:
            click.echo(line)
    worst = report.worst_tensor
    if target_ratio is None and worst is not None and worst.sqnr_db < LOW_SQNR_DB:
        # said even with --quiet: a file that has lost the model's accuracy should not pass unnoticed
        click.echo(f"legonet: warning: lowest tensor SQNR {worst.sqnr_db:.1f} dB ({worst.name}); below "
                   f"{LOW_SQNR_DB:g} dB models usually lose most of their accuracy. For a size that keeps it, try: "
                   f"legonet compress {src} -o {output} --target-ratio 8" + (f" --arch {arch}" if arch else "")
                   + " (add --arch NAME for a zoo architecture)" * (arch is None), err=True)
    if allow_nonfinite and sd is not None:
        from legonet.compress import nonfinite_tensors

        kept = nonfinite_tensors(sd)
        if kept:  # said even with --quiet: the user should know what was not compressed and why
            click.echo(f"legonet: kept {len(kept)} tensor(s) holding NaN/Inf uncompressed: "
                       + ", ".join(kept[:10]) + (", ..." if len(kept) > 10 else ""), err=True)
    if not quiet:
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
    sd = {k: v.contiguous() for k, v in cm.to_state_dict().items()}
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
    if narrow and cm.config.kept_dtype == "float16" and not cm.source_dtypes:  # written before files recorded the dtypes they narrowed
        click.echo(f"{len(narrow)} kept tensors are float16 as stored: this file does not record the dtype they had")


def _check_fit(arch: str, sd, src: Path) -> None:
    """Raise :class:`ArchitectureError` naming the file unless ``sd`` fits ``arch`` (no weights loaded)."""
    from legonet.artifact import fit_error
    from legonet.zoo import skeleton

    own = {k: tuple(v.shape) for k, v in skeleton(arch).state_dict().items()}
    err = fit_error(own, {k: tuple(v.shape) for k, v in sd.items()}, f"{src}: weights do not fit", arch)
    if err is not None:
        raise err


def _load_model(arch: str, weights: Path):
    from legonet.io.checkpoints import read_state_dict
    from legonet.zoo import build, get_arch

    spec = get_arch(arch)
    model = build(arch)
    sd = read_state_dict(weights)
    load_weights(model, sd, str(weights), arch)
    return model, spec


def evaluate_file(arch: str, weights: Path, data: Path, limit: int | None, seed: int) -> tuple[float, int]:
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

    from legonet.io.atomic import refuse_overwriting

    weights, data = bundled("resnet20_cifar10.safetensors"), bundled("cifar10-test-1000.npz")
    refuse_overwriting(output, [weights, data], "bundled demo data")
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
    drop = 100 * (before - after)
    verdict = "within 1 point" if drop <= 1.0 else f"a loss of {drop:.1f} points"
    click.echo(f"accuracy: {100 * before:.1f} % -> {100 * after:.1f} % on these images, {verdict}"
               + ("; the paper's method does not keep this model's accuracy (see the README)" if drop > 3 else ""))


# export and footprint commands (bodies in legonet/export/cli.py)
from legonet.export.cli import export_c_cmd, export_onnx_cmd, footprint_cmd  # noqa: E402

main.add_command(export_c_cmd)
main.add_command(export_onnx_cmd)
main.add_command(footprint_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
