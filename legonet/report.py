"""Size and error report of a compressed model, computed from real bytes.

The headline ratio is ``original fp32 bytes / bytes of the .lego file`` (the whole file: container
header, metadata, codebooks, packed indices and every tensor kept as it is). "Original fp32 bytes"
counts every floating tensor at 4 bytes per element, whatever dtype it came in, and other tensors
at their own size; a tensor listed under several names (tied weights) counts once, as the file
stores it once. The paper's narrower figure, fp32 bytes of the clustered tensors over their index
bits plus the codebooks, is reported too and labelled as such.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from legonet.artifact import ClusteredTensor, CompressedModel, fills


# Below this weight SQNR (noise at a tenth of the signal's energy) networks compressed without data
# lose much of their accuracy: every model measured at the paper's 4x4 K=32 setting (about 1 dB)
# falls to chance, while target mode's files that keep accuracy have no tensor below about 12 dB.
LOW_SQNR_DB = 10.0


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    kind: str  # "clustered" or "kept"
    stored_bytes: int
    bits_per_weight: float
    sqnr_db: float | None
    # clustered tensors: the block shape and K of their codebook, how their indices are stored
    # ("packed" or "entropy-coded") and their row gains ("float16", "8-bit" or None)
    block: tuple[int, int] | None = None
    clusters: int | None = None
    indices: str | None = None
    gains: str | None = None

    @property
    def setting(self) -> str:
        """``"BRxBC K=K"`` for a clustered tensor, ``""`` for a kept one."""
        return "" if self.block is None else f"{self.block[0]}x{self.block[1]} K={self.clusters}"


@dataclass(frozen=True)
class Report:
    """Sizes in bytes; ratios are ``original_fp32_bytes / something``."""

    original_fp32_bytes: int
    file_bytes: int
    num_weights: int
    clustered_weights: int
    codebook_bytes: int
    index_bytes: int
    kept_bytes: int
    scale_bytes: int
    header_bytes: int
    num_codebooks: int
    clusters: int | None  # the one setting every clustered tensor uses; None where they differ (target mode)
    block: tuple[int, int] | None
    scope: str
    clustered_fp32_bytes: int
    tensors: list[TensorRow] = field(default_factory=list)
    # ``[("BRxBC K=K", number of codebooks), ...]``, most frequent first: target mode mixes settings
    codebook_settings: list[tuple[str, int]] = field(default_factory=list)
    # clustered tensors whose row gains are 8-bit log codes (compact storage, format version 3)
    compact_tensors: int = 0
    # clustered tensors whose index stream is entropy-coded (format version 4)
    entropy_coded_tensors: int = 0
    # ``{alias: source}``: further names of tied tensors, stored and counted once (format version 5)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Whole-file compression ratio (fp32 bytes / .lego file bytes)."""
        return self.original_fp32_bytes / self.file_bytes

    @property
    def bits_per_weight(self) -> float:
        """File bits per weight of the model (every element of every tensor counted)."""
        return 8.0 * self.file_bytes / self.num_weights

    @property
    def paper_ratio(self) -> float:
        """The paper's narrower figure: clustered tensors' fp32 bytes / (index bits + codebooks [+ scales])."""
        return self.clustered_fp32_bytes / max(1, self.index_bytes + self.codebook_bytes + self.scale_bytes)

    @property
    def min_sqnr_db(self) -> float | None:
        vals = [r.sqnr_db for r in self.tensors if r.sqnr_db is not None]
        return min(vals) if vals else None

    @property
    def worst_tensor(self) -> TensorRow | None:
        """The clustered tensor with the lowest SQNR (None if none has one)."""
        rows = [r for r in self.tensors if r.sqnr_db is not None]
        return min(rows, key=lambda r: r.sqnr_db) if rows else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ratio=self.ratio, bits_per_weight=self.bits_per_weight, paper_ratio=self.paper_ratio)
        for row in d["tensors"]:
            if row["sqnr_db"] is not None and math.isinf(row["sqnr_db"]):
                row["sqnr_db"] = "inf"
        return d

    def summary_lines(self) -> list[tuple[str, str]]:
        return [
            ("original (fp32)", _human(self.original_fp32_bytes)),
            (".lego file", _human(self.file_bytes)),
            ("compression ratio (file)", f"{self.ratio:.2f}x"),
            ("bits per weight (file)", f"{self.bits_per_weight:.3f}"),
            ("paper's ratio (clustered tensors only)", f"{self.paper_ratio:.2f}x"),
            ("codebooks", self._codebooks_line()),
            ("packed indices", _human(self.index_bytes) + (
                f" (entropy-coded for {self.entropy_coded_tensors} tensors)" if self.entropy_coded_tensors else "")),
            ("per-row scales", _human(self.scale_bytes) + (
                f" (8-bit log codes for {self.compact_tensors} tensors, else float16)" if self.compact_tensors
                else " (float16)")),
            ("tensors kept as they are", _human(self.kept_bytes)),
            ("container header + metadata", _human(self.header_bytes)),
            ("clustered weights", f"{self.clustered_weights:,} of {self.num_weights:,}"),
            ("lowest tensor SQNR", "n/a" if self.min_sqnr_db is None else f"{self.min_sqnr_db:.2f} dB"),
        ] + ([("tied tensors (stored once)", self._aliases_line())] if self.aliases else [])

    def _aliases_line(self) -> str:
        alias, source = next(iter(self.aliases.items()))
        pair = f"{alias} = {source}"
        return pair if len(self.aliases) == 1 else f"{len(self.aliases)} names, e.g. {pair}"

    def _codebooks_line(self) -> str:
        size = _human(self.codebook_bytes)
        if not self.codebook_settings:
            return f"none, {size}"
        if len(self.codebook_settings) == 1:
            block, k = self.codebook_settings[0][0].split(" ")
            return f"{self.num_codebooks} x {k} of {block}, {size}"
        shown = ", ".join(f"{n} x {s}" for s, n in self.codebook_settings[:3])
        more = len(self.codebook_settings) - 3
        rest = f" (+{more} more setting{'s' if more > 1 else ''})" if more > 0 else ""
        return f"{self.num_codebooks}: {shown}{rest}; {size}"

    def render(self, per_tensor: bool = False) -> str:
        """The report as text (a rich table)."""
        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        console = Console(file=buf, width=110, force_terminal=False, color_system=None)
        t = Table(title="legonet report", show_header=False)
        t.add_column("what")
        t.add_column("value", justify="right")
        for k, v in self.summary_lines():
            t.add_row(k, v)
        console.print(t)
        if per_tensor:
            pt = Table(title="per tensor")
            for c in ("tensor", "shape", "stored", "setting", "bytes", "bits/weight", "SQNR dB"):
                pt.add_column(c, justify="left" if c in ("tensor", "shape", "stored", "setting") else "right")
            for r in self.tensors:
                s = "n/a" if r.sqnr_db is None else ("exact" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.2f}")
                stored = {"entropy-coded": "clustered, rANS", "packed": "clustered"}.get(
                    r.indices, "one value" if r.stored_bytes == 0 else r.kind)
                pt.add_row(r.name, "x".join(map(str, r.shape)), stored, r.setting, f"{r.stored_bytes:,}",
                           f"{r.bits_per_weight:.3f}", s)
            console.print(pt)
        return buf.getvalue()

    def __str__(self) -> str:
        return self.render()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def fp32_bytes(sd: dict) -> int:
    """Original size as legonet counts it: floating tensors at 4 bytes per element, others as stored.

    ``sd`` should list a tied tensor once (:func:`legonet.clustering.as_state_dict` does): every
    entry is counted."""
    return sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in sd.values())


def build_report(cm: CompressedModel, file_bytes: int | None = None) -> Report:
    """Report for ``cm``; ``file_bytes`` defaults to the exact size of its serialized .lego file."""
    if file_bytes is None:
        file_bytes = len(cm.to_bytes())
    rows: list[TensorRow] = []
    filled = fills(cm.tensors)
    orig = num = clustered_w = clustered_fp32 = idx_bytes = kept = scale_bytes = coded_tensors = 0
    for name, t in cm.tensors.items():
        if isinstance(t, ClusteredTensor):
            k = cm.codebooks[t.codebook].shape[0]
            stream, coded = cm.index_stream(name)
            nb = len(stream)
            idx_bytes += nb
            coded_tensors += coded
            if t.scale is not None:
                sb = t.shape[0] * (1 if t.gain_code is not None else 2)  # 8-bit log codes or float16
                scale_bytes += sb
                nb += sb
            clustered_w += t.numel
            clustered_fp32 += 4 * t.numel
            orig += 4 * t.numel
            num += t.numel
            gains = None if t.scale is None else "8-bit" if t.gain_code is not None else "float16"
            rows.append(TensorRow(name, t.shape, "clustered", nb, 8.0 * nb / t.numel, t.sqnr_db, t.block, k,
                                  "entropy-coded" if coded else "packed", gains))
        else:
            nb = 0 if name in filled else t.numel() * t.element_size()
            kept += nb
            orig += 4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
            num += t.numel()
            rows.append(TensorRow(name, tuple(t.shape), "kept", nb, 8.0 * nb / max(1, t.numel()), None))
    setting_of = {t.codebook: f"{t.block[0]}x{t.block[1]} K={cm.codebooks[t.codebook].shape[0]}"
                  for t in cm.tensors.values() if isinstance(t, ClusteredTensor)}
    settings = Counter(setting_of.values()).most_common()
    used = {(r.block, r.clusters) for r in rows if r.block is not None}
    block, clusters = next(iter(used)) if len(used) == 1 else (None, None)
    cb_item = 2 if cm.config.codebook_dtype == "float16" else 4
    cb_bytes = sum(int(cb.numel()) * (1 if i in cm.codebook_scales else cb_item) for i, cb in enumerate(cm.codebooks))
    return Report(
        original_fp32_bytes=orig, file_bytes=file_bytes, num_weights=num, clustered_weights=clustered_w,
        codebook_bytes=cb_bytes, index_bytes=idx_bytes, kept_bytes=kept, scale_bytes=scale_bytes,
        header_bytes=file_bytes - cb_bytes - idx_bytes - kept - scale_bytes, num_codebooks=len(cm.codebooks),
        clusters=clusters, block=block, scope=cm.config.scope,
        clustered_fp32_bytes=clustered_fp32, tensors=rows, codebook_settings=settings,
        compact_tensors=sum(1 for t in cm.clustered.values() if t.gain_code is not None),
        entropy_coded_tensors=coded_tensors, aliases=dict(cm.aliases),
    )
