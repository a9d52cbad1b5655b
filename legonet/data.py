"""Image data in the npz layout legonet evaluates and calibrates on.

An npz with ``x``: uint8 ``(N, H, W, 3)`` RGB images (NHWC) and, for evaluation, ``y``: integer
labels ``(N,)``. Calibration files may carry labels; they are ignored.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from legonet.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """Images ``x`` uint8 ``(N, H, W, C)`` and optional labels ``y`` int64 ``(N,)``."""

    x: np.ndarray
    y: np.ndarray | None

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, limit: int | None, seed: int = 0) -> "ImageSet":
        """A seeded uniform random subset of ``limit`` images (all images if ``limit`` is None)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise DataError(f"--limit must be >= 1, got {limit}")
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=limit, replace=False))
        return ImageSet(self.x[idx], None if self.y is None else self.y[idx])


def load_images(path: str | os.PathLike, *, labels: bool = True) -> ImageSet:
    """Read and validate an npz image set; raises :class:`DataError` naming the problem."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise DataError(f"{path}: no array 'x' (found {', '.join(z.files) or 'nothing'})")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: 'x' must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if labels:
        if y is None:
            raise DataError(f"{path}: no labels 'y' to evaluate against")
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y' must be integer labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    else:
        y = None
    if x.shape[0] == 0:
        raise DataError(f"{path}: no images")
    return ImageSet(x, y)


def to_input(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW: ``(x/255 - mean) / std`` per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (t - m) / s
