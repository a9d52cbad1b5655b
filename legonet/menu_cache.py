"""A cache of target mode's menu estimates, so that several ratios cost one analysis.

Target mode estimates, for every tensor, the distortion and bytes of every menu entry
(:func:`legonet.target.evaluate_menu`); that analysis does not depend on the target ratio and is
most of target mode's time. A :class:`MenuCache` given to several target-mode runs of the same model
(``legonet.compress(model, target_ratio=[8, 12, 16])``, the CLI's ``--target-ratio 8,12,16``)
evaluates each tensor once.

Entries are keyed by everything the estimate depends on: the tensor's name, shape, dtype and a hash
of its bytes, the menu, the seed and whether index streams are entropy-coded. Estimates weighted by
calibration statistics are not cached (the statistics would have to be part of the key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


class MenuCache:
    """``{key: list of Choice}``; see the module docstring. Not shared between threads."""

    def __init__(self) -> None:
        self._entries: dict[tuple, list] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(name: str, weight: torch.Tensor, menu, seed: int, entropy_coding: bool) -> tuple:
        data = weight.detach().cpu().contiguous()
        # hashed in place through the buffer protocol: no copy of the weights
        digest = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()
        return (name, tuple(data.shape), str(data.dtype), digest, tuple(menu), int(seed), bool(entropy_coding))

    def get_or_evaluate(self, key: tuple, evaluate: Callable[[], list]) -> list:
        """The cached entries for ``key``, or ``evaluate()``'s, stored."""
        if key in self._entries:
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        entries = evaluate()
        self._entries[key] = entries
        return entries

    def __len__(self) -> int:
        return len(self._entries)
