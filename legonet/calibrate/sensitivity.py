"""Per-tensor sensitivity from the Fisher information, for the byte allocation of target mode.

Clustering tensor ``t`` with relative error ``e_t = |W_hat - W|^2 / |W|^2`` raises the loss by about
``1/2 sum_i F_ii delta_i^2`` (second-order Taylor expansion at a trained model, ``F`` the Fisher
information). With row gains, the error of an element is about ``e_t`` times the mean square of its
row, so the loss grows by about ``e_t * s_t / 2`` with

    s_t = sum_i F_ii * ms(row(i)),        ms(row) = |row|^2 / cols.

Target mode weighs each tensor's distortion by ``s_t`` (HAWQ-style), instead of counting every tensor
equally. ``F_ii`` is estimated from unlabeled images: labels are drawn from the model's own
predictive distribution (the true Fisher, not the empirical one, so no label is needed), and the
squared gradient of a batch's summed loss is used: its cross-sample terms vanish in expectation
because ``E_y[grad log p(y|x)] = 0`` for each image.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from legonet.errors import ConfigError


def fisher_sensitivity(
    model: nn.Module, batches: Iterable[torch.Tensor], names: list[str], *, seed: int = 0
) -> dict[str, float]:
    """``{name: s_t}`` (see the module docstring) for the parameters ``names`` of ``model``.

    Args:
        model: a classifier returning ``(N, classes)`` logits; its weights are not changed.
        batches: ``(N, ...)`` input batches (unlabeled).
        names: parameter names (``model.named_parameters()``); every one must exist.
        seed: seed of the sampled labels.
    Returns:
        Positive floats, normalised to mean 1 (only their ratios matter to the allocation).
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"no parameter named {missing[0]!r} in the model for the Fisher sensitivity")
    was_training = model.training
    grads_were = {n: p.requires_grad for n, p in params.items()}
    model.eval()
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    gen = torch.Generator().manual_seed(seed)
    seen = 0
    try:
        for n, p in params.items():
            p.requires_grad_(n in fisher)
        for x in batches:
            logits = model(x)
            if logits.ndim != 2:
                raise ConfigError(f"the Fisher sensitivity needs (N, classes) logits, got shape {tuple(logits.shape)}")
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits.float(), 1), 1, generator=gen)[:, 0]
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    fisher[n] += g.float().square()
            seen += x.shape[0]
    finally:
        for n, p in params.items():
            p.requires_grad_(grads_were[n])
        model.train(was_training)
    if not seen:
        raise ConfigError("no calibration batch was given")
    out = {}
    for n in names:
        w = params[n].detach().float().reshape(params[n].shape[0], -1)
        row_ms = w.square().mean(1, keepdim=True)
        out[n] = float((fisher[n].reshape(w.shape) * row_ms).sum()) / seen
    mean = sum(out.values()) / len(out) if out else 1.0
    tiny = 1e-12 * max(mean, 1e-30)
    return {n: max(v, tiny) / max(mean, 1e-30) for n, v in out.items()}
