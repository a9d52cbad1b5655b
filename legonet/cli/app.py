"""The ``legonet`` command group and what its commands share: one-line errors, option parsers,
the console on stderr, the bundled fixtures.

Every failure legonet anticipates exits with status 1 and one line naming the problem; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import re
import sys
from importlib import resources
from pathlib import Path

import click

from legonet.errors import LegoError


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split()) or "(no message)"


# The library's errors name its Python arguments; on the command line the user knows the flags.
_FLAGS = (
    (re.compile(r"\bpass allow_nonfinite\b"), "set allow_nonfinite = true in a --recipe"),
    (re.compile(r"\buse (scope|scales|scale_stat)='([\w-]+)'"), lambda m: f'set {m[1]} = "{m[2]}" in a --recipe'),
    (re.compile(r"\btarget_ratio\b"), "--target-ratio"),
    (re.compile(r"\blower K\b"), "lower K (--clusters)"),
)


def in_flags(msg: str) -> str:
    """``msg`` with the Python arguments it names replaced by the command line's flags or recipe keys."""
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
            click.echo(f"legonet: error: {in_flags(_one_line(exc))}", err=True)
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


def parse_block(_ctx, _param, value: str | None) -> tuple[int, int] | None:
    """``--block B`` or ``RxC`` as ``(rows, cols)``; None when not given."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", value)
    if not m:
        raise click.BadParameter(f"expected B or RxC (e.g. 4 or 2x8), got {value!r}")
    r = int(m.group(1))
    return (r, int(m.group(2)) if m.group(2) else r)


def parse_input_size(_ctx, _param, value: str | None) -> tuple[int, int, int] | None:
    """``--input-size C,H,W`` as a tuple; None when not given."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*[x,]\s*(\d+)\s*", value)
    if not m:
        raise click.BadParameter(f"expected C,H,W (e.g. 3,224,224), got {value!r}")
    return tuple(int(g) for g in m.groups())


def console():
    from rich.console import Console

    return Console(stderr=True)


def status(quiet: bool, text: str):
    """A spinner on stderr while a step without progress counts runs (nothing when ``quiet``)."""
    return contextlib.nullcontext() if quiet else console().status(text, spinner="dots")


def bundled(name: str) -> Path:
    """Path of a fixture shipped inside the package (``legonet/data``)."""
    return Path(str(resources.files("legonet") / "data" / name))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="legonet")
def main(debug: bool) -> None:  # noqa: ARG001
    """Shrink trained networks by block weight clustering (LegoNet)."""
