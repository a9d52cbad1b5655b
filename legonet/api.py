"""legonet's one entry point: :func:`compress`.

Three modes, one call::

    legonet.compress(model, LegoConfig(block=4, clusters=32))      # the paper's setting
    legonet.compress(model, target_ratio=8)                          # target mode, data-free
    legonet.compress(model, target_ratio=16, calib=batches)          # target mode, calibrated

The command line calls this same function.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from legonet.artifact import CompressedModel
from legonet.calibrate.data import Batch, Calibration
from legonet.config import LegoConfig, TargetConfig
from legonet.errors import ConfigError
from legonet.graph import own_forward_layers
from legonet.menu_cache import MenuCache
from legonet.runlog import Progress, RunLog
from legonet.threads import using_threads


def compress(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: LegoConfig | TargetConfig | None = None,
    *,
    target_ratio: float | Sequence[float] | None = None,
    calib: torch.Tensor | Iterable[Batch] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    threads: int | None = None,
) -> CompressedModel:
    """Compress a model by block weight clustering.

    Args:
        model_or_state_dict: the model (an ``nn.Module`` holding its trained weights) or its state
            dict. A module lets target mode use the network's structure (BatchNorm folding, bias
            correction, calibration); a state dict is compressed tensor by tensor.
        config: without ``target_ratio``, a :class:`LegoConfig` (default: the paper's 4x4 blocks,
            K=32, one model-wide codebook). With ``target_ratio``, a :class:`TargetConfig`
            (default ``TargetConfig()``) for target mode's settings.
        target_ratio: the whole-file compression ratio to meet (fp32 bytes over the bytes of the
            .lego file, everything counted). Every tensor then gets its own block shape and K.
            A list of ratios returns a list of compressed models, one per ratio, at the cost of
            one analysis of the weights (:mod:`legonet.menu_cache`).
        calib: calibration inputs, no labels (target mode with a module only): a tensor ``(N, ...)``
            of model inputs, or an iterable of batches, each a tensor, a tuple of positional
            arguments or a dict of keyword arguments (read once and kept for the passes).
            Without it target mode is data-free.
        device: where the model's passes run during calibration (``"cuda"``, say); clustering and
            the file stay on the CPU.
        progress: optional ``progress(task, done, total)`` callback for long steps.
        threads: CPU threads for the run; by default chosen from the cores this process may use
            and the load other processes put on them (:mod:`legonet.threads`: more threads than
            free cores slow PyTorch's many small operations down tenfold). The caller's setting
            is restored afterwards.
    Returns:
        The :class:`CompressedModel` (``.save(path)``, ``.report()``, ``.load_into(module)``), or a
        list of them, one per ratio, for a list of ratios; its ``log`` holds the time of every
        step and what each step did or left undone. The model given is not changed.
    Raises:
        ConfigError: a setting that does not fit the mode, or a target out of reach (said at once).
    """
    with using_threads(threads):
        if isinstance(target_ratio, (list, tuple)):
            if not target_ratio:
                raise ConfigError("target_ratio: the list of ratios is empty")
            if calib is not None and not isinstance(calib, (torch.Tensor, Calibration)):
                calib = Calibration.of(calib)  # read once (a generator can be given), used for every ratio
            for r in target_ratio:  # every ratio checked before any is compressed
                _check_ratio(r)
            cache = MenuCache()
            return [_compress(model_or_state_dict, config, r, calib, device, RunLog(progress), cache)
                    for r in target_ratio]
        return _compress(model_or_state_dict, config, target_ratio, calib, device, RunLog(progress), None)


def _compress(model_or_state_dict, config, target_ratio, calib, device, log: RunLog,
              menu_cache: MenuCache | None) -> CompressedModel:
    """:func:`compress` once the threads are set (see there)."""
    if target_ratio is None:
        if calib is not None:
            raise ConfigError("calib is used by target mode only: give target_ratio as well")
        if isinstance(config, TargetConfig):
            raise ConfigError("a TargetConfig needs target_ratio (the file ratio to meet)")
        if config is not None and not isinstance(config, LegoConfig):
            raise ConfigError(f"config must be a LegoConfig or a TargetConfig, got {type(config).__name__}")
        from legonet.clustering import cluster_model

        with log.step("clustering"):
            cm = cluster_model(model_or_state_dict, config, progress=log.report)
        cm.log = log
        return cm
    _check_ratio(target_ratio)
    if isinstance(config, LegoConfig):
        raise ConfigError("target mode takes a TargetConfig (include, exclude, seed, ...), not a LegoConfig: "
                          "its block shape and K are chosen per tensor")
    if config is not None and not isinstance(config, TargetConfig):
        raise ConfigError(f"config must be a TargetConfig in target mode, got {type(config).__name__}")
    cfg = config or TargetConfig()
    module = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    if module is not None:
        custom = own_forward_layers(module)
        if custom:
            log.note(f"{len(custom)} layers are subclasses with a forward of their own (e.g. {custom[0]}): "
                     "treated as the layers they derive from")
    if calib is not None:
        if module is None:
            raise ConfigError("calibration needs the model itself (an nn.Module holding its weights), not a state dict")
        from legonet.calibrate.pipeline import calibrated_compress

        # the pipeline reorders channels of, and finally loads the compressed weights into, the
        # module it is given: a copy, so that the caller's model stays as it was
        work = copy.deepcopy(module).to(device)
        cm, _plan, _result = calibrated_compress(work, target_ratio, calib, config=cfg, log=log)
        del work
    elif module is not None and (cfg.fold_norms or cfg.bias_correction):
        from legonet.datafree.pipeline import datafree_compress

        cm, _plan = datafree_compress(module, target_ratio, config=cfg, log=log, menu_cache=menu_cache)
    else:
        from legonet.target import compress_to_ratio

        cm, _plan = compress_to_ratio(model_or_state_dict, target_ratio, config=cfg, log=log, menu_cache=menu_cache)
    cm.log = log
    return cm


def _check_ratio(target_ratio) -> None:
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not target_ratio > 1:
        raise ConfigError(f"target_ratio must be a number > 1, got {target_ratio!r}")
