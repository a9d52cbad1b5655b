"""PNG plots of the benchmark results (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from benchmarks.experiments import family  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fig4(rows: Sequence[dict], base: dict, path: Path) -> Path:
    """Top-1 versus K at b=4 with 95 % intervals, and the uncompressed baseline as a band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["K"] for r in rows]
    acc = [100 * r["top1"] for r in rows]
    err = [[100 * (r["top1"] - r["ci95"][0]) for r in rows], [100 * (r["ci95"][1] - r["top1"]) for r in rows]]
    ax.errorbar(ks, acc, yerr=err, marker="o", capsize=3, label="legonet 4x4, model-wide codebook")
    ax.axhline(100 * base["top1"], color="k", ls="--", label=f"uncompressed ({100 * base['top1']:.2f} %)")
    ax.axhspan(100 * base["ci95"][0], 100 * base["ci95"][1], color="k", alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (codebook size)")
    ax.set_ylabel(f"top-1 % ({base['n']} test images, 95 % CI)")
    ax.set_title(f"{rows[0]['model'] if rows else ''}: accuracy versus K (Fig. 4)")
    ax.grid(alpha=0.3)
    ax.set_ylim(0, 100 * base["ci95"][1] + 5)
    ax.legend(loc="center right", fontsize=8)
    return _save(fig, path)


def plot_fig3(rows: Sequence[dict], path: Path) -> Path:
    """Ratio reached within each accuracy tolerance, versus block size.

    A block size with no K within the tolerance is an ``x`` on the 1x line; one not measured (a
    partial run) is marked ``n/m`` at the bottom.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4))
    blocks = sorted({r["b"] for r in rows})
    for i, tol in enumerate(sorted({r["tolerance"] for r in rows})):
        mine = [r for r in rows if r["tolerance"] == tol]
        pts = [(r["b"], r["ratio"]) for r in mine if r["ratio"] is not None]
        line = ax.plot(*zip(*pts), marker="o", label=f"within {tol:g} points") if pts else \
            ax.plot([], [], marker="o", label=f"within {tol:g} points")
        fails = [r["b"] for r in mine if r["ratio"] is None and r.get("note") != "not measured"]
        if fails:
            ax.plot(fails, [1.0 + 0.04 * i] * len(fails), ls="none", marker="x", color=line[0].get_color())
    for b in blocks:
        if all(r.get("note") == "not measured" for r in rows if r["b"] == b):
            ax.annotate("n/m", (b, 1.0), ha="center", va="top", fontsize=8, xytext=(0, -4), textcoords="offset points")
    ax.set_xticks(blocks)
    ax.set_xlabel("block size b (b x b); x = no K within tolerance, n/m = not measured")
    ax.set_ylabel("file compression ratio (x)")
    ax.set_yscale("log")
    ax.set_ylim(0.8, max([r["ratio"] for r in rows if r["ratio"]] + [10]) * 2)
    ax.set_title(f"{rows[0]['model'] if rows else ''}: best ratio per block size (Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


_MARKERS = "osD^v<>pP*Xh"


def plot_pareto(records: Sequence[dict], base: dict, path: Path,
                target_mode: dict | None = None) -> Path:
    """Accuracy versus file ratio, every method family with its own marker.

    ``target_mode``: optional contents of ``target_mode_<arch>.json`` (benchmarks/target_mode.py):
    legonet's target-mode points, measured on the whole test set, drawn as open markers, one line per mode.
    """
    fig, ax = plt.subplots(figsize=(9.5, 5))
    fams = sorted({family(r) for r in records})
    for i, fam in enumerate(fams):
        pts = sorted((r["ratio"], 100 * r["top1"]) for r in records if family(r) == fam)
        ax.plot(*zip(*pts), marker=_MARKERS[i % len(_MARKERS)], ls="-" if len(pts) > 1 else "none",
                lw=0.8, ms=5, label=fam)
    ax.axhline(100 * base["top1"], color="k", ls="--", lw=1, label="uncompressed")
    rows = (target_mode or {}).get("rows", [])
    for mode in sorted({r["mode"] for r in rows}):
        pts = sorted((r["file_ratio"], 100 * r["top1"]) for r in rows if r["mode"] == mode)
        peer = mode.startswith("peer ")  # benchmarks/target_mode.py --peers: same images, for comparison
        ax.plot(*zip(*pts), marker="s" if peer else "o", mfc="none", ls=":", lw=1.2, ms=7,
                label=(f"{mode[5:]}" if peer else f"legonet target mode, {mode}")
                + f" ({target_mode['test_images']} images)")
    if rows and "baseline_top1" in target_mode:
        ax.axhline(100 * target_mode["baseline_top1"], color="grey", ls=":", lw=1,
                   label=f"uncompressed ({target_mode['test_images']} images)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    top = max([r["ratio"] for r in records] + [r["file_ratio"] for r in rows])
    ax.set_xticks([t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= 1.5 * top])
    ax.set_xlabel("compression ratio (fp32 bytes / compressed bytes)")
    ax.set_ylabel(f"top-1 % ({base['n']} test images)")
    ax.set_ylim(0, 100 * base["top1"] + 5)  # the whole range: collapsed models (chance = 10 %) stay visible
    ax.set_title(f"{records[0]['model'] if records else ''}: accuracy versus ratio, legonet and peers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
