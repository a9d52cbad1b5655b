"""legonet's methods as the benchmark sees them: named configurations, one entry each.

A method is a function ``(state_dict, arch, calib_images, **setting) -> MethodOutput``. For legonet
the bytes are ``len(compressed_model.to_bytes())``: the whole .lego file (container header, JSON
metadata, codebooks, packed indices and every tensor kept as it is).

To add a method (per-layer scales, calibration, ...), write such a function and add one line to
:data:`LEGONET_METHODS`; the experiments pick methods up by name.
"""

from __future__ import annotations

from typing import Any

import torch

from legonet import compress
from legonet.config import KMeansConfig, LegoConfig, TargetConfig
from legonet.data import ImageSet
from legonet.report import build_report
from legonet.zoo import ArchSpec

from benchmarks.common import MethodOutput


def legonet_config(setting: dict[str, Any]) -> LegoConfig:
    """A :class:`LegoConfig` from a benchmark setting (same keys; ``kmeans`` may be a mapping)."""
    s = dict(setting)
    if isinstance(s.get("kmeans"), dict):
        s["kmeans"] = KMeansConfig.from_dict(s["kmeans"])
    return LegoConfig.from_dict(s)


def legonet_data_free(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None,  # noqa: ARG001
                      **setting: Any) -> MethodOutput:
    """The paper's method: block k-means, no data, no fine-tuning. ``setting``: LegoConfig keys."""
    cm = compress(sd, legonet_config(setting))
    data = cm.to_bytes()
    rep = build_report(cm, len(data))
    return MethodOutput(cm.to_state_dict(), len(data), {
        "paper_ratio": rep.paper_ratio, "codebook_bytes": rep.codebook_bytes, "index_bytes": rep.index_bytes,
        "kept_bytes": rep.kept_bytes, "header_bytes": rep.header_bytes,
        "clustered_weights": rep.clustered_weights,
    })


def _output(cm) -> MethodOutput:
    data = cm.to_bytes()
    rep = build_report(cm, len(data))
    return MethodOutput(cm.to_state_dict(), len(data), {
        "paper_ratio": rep.paper_ratio, "codebook_bytes": rep.codebook_bytes, "index_bytes": rep.index_bytes,
        "kept_bytes": rep.kept_bytes, "header_bytes": rep.header_bytes, "scale_bytes": rep.scale_bytes,
        "clustered_weights": rep.clustered_weights,
    })


def legonet_target(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None,  # noqa: ARG001
                   *, ratio: float, **setting: Any) -> MethodOutput:
    """Target-ratio mode, data-free, as the CLI with --arch: BatchNorm statistics folded, per-tensor
    block/K chosen to meet ``ratio`` (file bytes), then data-free bias correction. ``setting``:
    TargetConfig keys."""
    model = _model(arch, sd)
    cm = compress(model, TargetConfig.from_dict(setting), target_ratio=ratio)
    return _output(cm)


def legonet_target_calibrated(sd: dict[str, torch.Tensor], arch: ArchSpec, calib: ImageSet | None,
                              *, ratio: float, images: int = 1024, **setting: Any) -> MethodOutput:
    """Target-ratio mode with calibration: activation-aware clustering, BatchNorm re-estimation and
    codebook refinement by distillation (the CLI's defaults with ``--calib``)."""
    from legonet.data import to_input

    if calib is None:
        raise ValueError("legonet-target-calib needs calibration images")
    x = to_input(calib.subset(images, 0).x, arch.mean, arch.std)
    cm = compress(_model(arch, sd), TargetConfig.from_dict(setting), target_ratio=ratio, calib=x)
    return _output(cm)


def _model(arch: ArchSpec, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from legonet.artifact import load_weights

    model = arch.build()
    load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


LEGONET_METHODS = {
    "legonet": legonet_data_free,
    "legonet-target": legonet_target,
    "legonet-target-calib": legonet_target_calibrated,
}
