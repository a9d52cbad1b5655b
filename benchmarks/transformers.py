"""The transformer benchmark, one command: legonet against its peers on three transformers.

Run as ``python benchmarks/transformers.py --quick`` (or ``python -m benchmarks.transformers``).
Models (see :mod:`benchmarks.transformer_table`): ``lm``, the byte-level GPT (held-out perplexity),
``encoder``, the byte-level sentence encoder, and ``minilm``, all-MiniLM-L6-v2 when its package is
installed (cosine of each held-out sentence's embedding with the original's, nearest-neighbour
agreement). Methods: every peer of :data:`benchmarks.transformer_peers.PEERS`, then legonet's target
mode, data-free (``legonet-datafree-{6,8,12,16}x``) and calibrated on the task's training-data
batches (``legonet-calibrated-{8,12,16}x``). legonet's bytes are the whole ``.lego`` file
(``len(cm.to_bytes())``); the peers' follow :mod:`benchmarks.transformer_quant`; both against the
same fp32 size (a tied tensor counted once).

Writes ``benchmarks/results/transformers.json`` (every row with its seconds; for legonet also its
step times, notes and threads; the machine's load average before and after each model),
``transformers.md`` (the table, also printed) and ``transformers_<model>.png`` (quality against
file ratio). The peers and the scoring run on ``--threads``; legonet on the threads it chooses
itself from the cores other processes leave free (what a user gets) unless ``--legonet-threads``.
A method that raises is a row marked ``failed`` with the one-line error; the
traceback is printed and the table goes on. ``--legonet-limit-s`` stops a legonet run that takes
longer (recorded as failed with its time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, ScalarFormatter  # noqa: E402

if __package__ in (None, ""):  # run as ``python benchmarks/transformers.py``
    # Python put this file's folder first on the path, where this file would shadow the ``transformers``
    # package that all-MiniLM-L6-v2 loads through: the repository root takes the folder's place.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

import legonet
from benchmarks.transformer_peers import PEERS, Peer, PeerResult
from benchmarks.transformer_table import run_table
from legonet.io.atomic import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"
DATAFREE_RATIOS = (6, 8, 12, 16)
CALIBRATED_RATIOS = (8, 12, 16)
MODEL_KEYS = ("lm", "encoder", "minilm")


class LegonetOvertime(Exception):
    """A legonet run went past ``--legonet-limit-s``."""


@dataclass
class LegonetPeers:
    """legonet's target mode as table peers; keeps what each run's log said, by peer name.

    ``threads``: passed to :func:`legonet.compress` (``None``: legonet's own choice from the load).
    ``limit_s``: a run still compressing after this many seconds is stopped (0: no limit).
    """

    threads: int | None = None
    limit_s: int = 0
    logs: dict[str, dict] = field(default_factory=dict)

    def peers(self) -> list[Peer]:
        return ([self._peer(r, calibrated=False) for r in DATAFREE_RATIOS]
                + [self._peer(r, calibrated=True) for r in CALIBRATED_RATIOS])

    def _peer(self, ratio: float, *, calibrated: bool) -> Peer:
        name = f"legonet-{'calibrated' if calibrated else 'datafree'}-{ratio:g}x"
        return Peer(name, functools.partial(self._run, name=name, ratio=ratio), calibrated=calibrated)

    def _run(self, model: nn.Module, calib: Sequence | None, *, name: str, ratio: float) -> PeerResult:
        threads_seen: set[int] = set()  # what the run really used, seen from its progress callbacks
        start = time.perf_counter()
        with self._time_limit(name):
            cm = legonet.compress(model, target_ratio=ratio, calib=calib, threads=self.threads,
                                  progress=lambda *_: threads_seen.add(torch.get_num_threads()))
        seconds = time.perf_counter() - start
        nbytes = len(cm.to_bytes())
        self.logs[name] = {"compress_seconds": round(seconds, 1), "steps": cm.log.timing_lines(),
                           "notes": list(cm.log.notes), "threads": sorted(threads_seen)}
        return cm.load_into(copy.deepcopy(model)).eval(), nbytes

    @contextlib.contextmanager
    def _time_limit(self, name: str) -> Iterator[None]:
        """Raise :class:`LegonetOvertime` inside the block after ``limit_s`` (SIGALRM: main thread, POSIX)."""
        if not self.limit_s:
            yield
            return

        def overtime(_signum: int, _frame: Any) -> None:
            raise LegonetOvertime(f"{name} stopped after {self.limit_s} s (--legonet-limit-s)")

        previous = signal.signal(signal.SIGALRM, overtime)
        signal.alarm(self.limit_s)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


def selected(peers: Sequence[Peer], wanted: str) -> list[Peer]:
    """The peers whose name contains one of the comma-separated words of ``wanted`` (all if empty)."""
    words = [w for w in wanted.split(",") if w]
    return [p for p in peers if not words or any(w in p.name for w in words)]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def source_state() -> dict:
    """The commit the run measured, and whether legonet/ had changes not yet committed."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "legonet_uncommitted_changes": bool(git("status", "--porcelain", "--", "legonet"))}


def run(quick: bool, models: Sequence[str], peers: Sequence[Peer], legonet_peers: LegonetPeers) -> dict:
    """:func:`~benchmarks.transformer_table.run_table` model by model, with load, threads and legonet's logs."""
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **source_state(),
                              "cpu_count": os.cpu_count(), "load_avg_start": _load(), "models": {},
                              "skipped_models": []}
    start = time.perf_counter()
    for key in models:
        legonet_peers.logs.clear()
        load_before = _load()
        part = run_table(quick, [key], peers)
        for k, v in part.items():
            if k not in ("models", "skipped_models"):
                result.setdefault(k, v)
        result["skipped_models"] += part["skipped_models"]
        for name, table in part["models"].items():
            for row in table["rows"]:
                if row["method"] in legonet_peers.logs:
                    row["legonet"] = legonet_peers.logs[row["method"]]
            result["models"][name] = {**table, "load_avg_before": load_before, "load_avg_after": _load()}
    result["load_avg_end"] = _load()
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# -- report ---------------------------------------------------------------------------------------------------
def metric_text(row: dict) -> str:
    """The row's quality in a few words: perplexity for the LM, embedding cosine for the encoders."""
    if "failed" in row:
        return f"failed: {row['failed']}"
    if "perplexity" in row:
        return f"ppl {row['perplexity']:.3f} (bpb {row['bits_per_byte']:.4f})"
    return f"cos {row['cosine']['mean']:.5f} (min {row['cosine']['min']:.5f}, NN {row['nn_agreement']:.3f})"


def markdown(result: dict) -> str:
    lines = ["| model | method | ratio | metric | seconds |", "|---|---|---:|---|---:|"]
    for model, table in result["models"].items():
        for row in table["rows"]:
            ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
            lines.append(f"| {model} | {row['method']} | {ratio} | {metric_text(row)} | {row['seconds']:.1f} |")
    changes = " + uncommitted legonet changes" if result["legonet_uncommitted_changes"] else ""
    head = (f"Transformer benchmark ({'quick' if result.get('quick') else 'full'}; torch {result.get('torch')}; "
            f"{result.get('threads')} threads, legonet: {result.get('legonet_threads', '?')}; "
            f"load {result['load_avg_start']} -> {result['load_avg_end']}; commit {(result['commit'] or '?')[:10]}{changes}).\n"
            "ratio = fp32 bytes / file bytes, everything counted; seconds = compression and scoring.\n")
    return head + "\n" + "\n".join(lines) + "\n"


def family(method: str) -> str:
    """``legonet data-free``, ``legonet calibrated``, or a peer's prefix (``rtn``, ``hqq``, ``gptq`` ...)."""
    if method.startswith("legonet-"):
        return "legonet " + method.split("-")[1].replace("datafree", "data-free")
    return method.split(" ")[0].split("-")[0]


def plot_frontier(model: str, table: dict, path: Path) -> None:
    """Quality against file ratio: peers as markers per family, legonet's two modes as lines.

    Failed rows and the fp16 copy are left out (the table has them); encoders' cosines are spaced by
    ``log(1 - cos)``, where the methods' differences lie.
    """
    # fp16 (2x, cosine 1 - 1e-8) would stretch the axes far from where the methods differ: it is in the table
    rows = [r for r in table["rows"] if "failed" not in r and not r["method"].startswith("fp16")]
    lm = "perplexity" in rows[0]
    value = (lambda r: r["perplexity"]) if lm else (lambda r: r["cosine"]["mean"])
    fig, ax = plt.subplots(figsize=(9.5, 5))
    if lm:  # an encoder's original has cosine 1: the top of its axis
        original = next(r for r in rows if r["method"].startswith("fp32"))
        ax.axhline(value(original), color="k", ls="--", lw=1, label=f"fp32 original ({value(original):.4g})")
    markers = iter("osD^v<>pP*Xh")
    for fam in dict.fromkeys(family(r["method"]) for r in rows if not r["method"].startswith("fp32")):
        mine = sorted((r for r in rows if family(r["method"]) == fam), key=lambda r: r["ratio"])
        xs, ys = [r["ratio"] for r in mine], [value(r) for r in mine]
        if fam.startswith("legonet"):
            ax.plot(xs, ys, marker="o" if "data-free" in fam else "s", lw=2, ms=6, label=fam, zorder=3)
        else:
            ax.plot(xs, ys, marker=next(markers), ls="none", ms=6, mfc="none", label=fam)
    if not lm:  # cosines crowd just under 1: space them by 1 - cos on a log scale, label them as cosines
        floor = 1e-9
        ax.set_yscale("function", functions=(lambda y: -np.log10(np.clip(1 - np.asarray(y), floor, None)),
                                             lambda t: 1 - 10.0 ** -np.asarray(t)))
        gaps = [1 - value(r) for r in rows if not r["method"].startswith("fp32")]
        ax.set_ylim(max(0.0, 1 - 1.5 * max(gaps)), 1 - max(floor, min(gaps)) / 3)
        low, _ = ax.get_ylim()
        ticks = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99999, 1 - 1e-6, 1 - 1e-7]
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if t >= low]))

        def label(t: float, _pos: int) -> str:  # digits enough to tell 0.9999 from 0.99999, no trailing zeros
            return f"{t:.{math.ceil(-math.log10(max(1 - t, floor))) + 2}f}".rstrip("0").rstrip(".")

        ax.yaxis.set_major_formatter(FuncFormatter(label))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([4, 6, 8, 12, 16, 24, 32]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("file compression ratio (fp32 bytes / file bytes, everything counted)")
    ax.set_ylabel("held-out perplexity (lower is better)" if lm else
                  "mean cosine with the original (higher is better; log of 1 - cos)")
    ax.set_title(f"{model}: quality against file ratio, legonet and peers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


PLOT_NAMES = {"byte-gpt": "lm", "byte-encoder": "encoder", "all-MiniLM-L6-v2": "minilm"}  # transformers_<name>.png


def render(result: dict, out: Path) -> str:
    """Write ``transformers.md`` and one plot per model (at least one compressed row) into ``out``; the table."""
    table = markdown(result)
    with atomic_path(out / "transformers.md") as tmp:
        Path(tmp).write_text(table)
    for model, part in result["models"].items():
        if any("ratio" in r and not r["method"].startswith(("fp32", "fp16")) for r in part["rows"]):
            plot_frontier(model, part, out / f"transformers_{PLOT_NAMES.get(model, model)}.png")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 evaluation windows for the LM (else all)")
    parser.add_argument("--models", default=",".join(MODEL_KEYS), help="comma-separated: lm, encoder, minilm")
    parser.add_argument("--peers", default="", help="only the methods whose name contains one of these "
                        "(comma-separated; e.g. legonet, gptq)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the peers and the scoring")
    parser.add_argument("--legonet-threads", type=int, default=0,
                        help="threads for legonet's compression (0: legonet's own choice from the cores other "
                        "processes leave free, what a user gets; the JSON records the count it used)")
    parser.add_argument("--legonet-limit-s", type=int, default=0, help="stop a legonet run after this many seconds (0: never)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for transformers.{json,md} and the plots")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: redraw the table and plots from the folder's transformers.json")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODEL_KEYS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_KEYS)}")
    torch.set_num_threads(args.threads)
    legonet_peers = LegonetPeers(threads=args.legonet_threads or None, limit_s=args.legonet_limit_s)
    peers = selected([*PEERS, *legonet_peers.peers()], args.peers)
    if args.render_only:
        result = json.loads((args.out / "transformers.json").read_text())
    else:
        result = run(args.quick, models, peers, legonet_peers)
        result.update(legonet_threads=args.legonet_threads or "legonet's choice",
                      legonet_limit_s=args.legonet_limit_s or None)
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "transformers.json") as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + render(result, args.out))
    print(f"{'redrew' if args.render_only else 'wrote'} {args.out}/transformers.{{json,md}} and "
          f"{', '.join(f'transformers_{PLOT_NAMES.get(m, m)}.png' for m in result['models'])}")


if __name__ == "__main__":
    main()
