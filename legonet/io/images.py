"""Evaluation and calibration images from a folder of photos or an npz, read a batch at a time.

:func:`open_images` takes either source and returns an object with one interface
(:class:`FolderImages` or :class:`ArrayImages`): ``len()``, ``subset(limit, seed)``,
``batches(batch_size, workers=0)`` yielding ``(x uint8 (B, H, W, 3), y int64 (B,) or None)``,
``check()`` and ``to_image_set()``.

Folder layouts (files and folders whose name starts with ``.`` are skipped: macOS writes
``._NAME.jpg`` companions that are not images):

* flat: ``*.jpg``, ``*.jpeg``, ``*.png`` (any case) in the folder, with a ``labels.csv``
  (header ``file,label``, ``file`` relative to the folder, integer labels) for evaluation;
* class subfolders: each immediate subfolder is a class and holds its images; classes sorted by
  name get the indices 0..C-1 (ImageNet synset folders ``n01440764`` ... give the ILSVRC-2012
  order, provided all 1000 are there). A ``labels.csv``, where present, takes precedence.

Images are found in the folder and one level down, and listed in order of relative path, so the
order (and every seeded subset) is the same on every machine. Calibration (``labels=False``)
ignores any ``labels.csv``.

Preprocessing is the usual "resize, then center crop" of evaluation pipelines: decode, apply the
EXIF orientation, convert to RGB, scale bicubically (antialiased) so the photo just covers the
model's input ``(H, W)`` -- for a square input, its shorter side becomes ``H`` -- then cut the
central ``(H, W)``. No extra crop ratio (the 0.875 of "resize to 256, crop 224") is applied: the
photos are taken as framed at the model's input size, and a folder already prepared that way
(224x224 crops) passes through untouched instead of being cropped a second time.
"""

from __future__ import annotations

import csv
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from legonet.data import ImageSet, load_images
from legonet.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
LABELS_FILE = "labels.csv"
# Pillow picks the decoder from the content, not the name; only these two are ever run.
_DECODERS = ("JPEG", "PNG")
# Pillow's own errors for unreadable files are OSError; corrupt metadata can surface as these too.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

Size = tuple[int, int]
Batch = tuple[np.ndarray, "np.ndarray | None"]


# --- the resize-and-crop rule (pure functions of sizes) -------------------------------------


def cover_size(height: int, width: int, target: Size) -> Size:
    """``(h, w)`` to resize a ``height x width`` photo to so it just covers ``target = (H, W)``.

    The photo is scaled by ``max(H / height, W / width)``: one side lands exactly on the target,
    the other is truncated to an integer (never below the target). For a square target this is
    "the shorter side becomes ``H``"; a photo of the target's size keeps its size.
    """
    th, tw = target
    if th * width >= tw * height:  # the height is the binding side (integer arithmetic: exact)
        return th, width * th // height
    return height * tw // width, tw


def center_crop_box(height: int, width: int, target: Size) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the central ``target = (H, W)`` window of an image.

    An odd surplus puts the extra pixel on the right / bottom (offsets are rounded down).
    """
    th, tw = target
    if th > height or tw > width:
        raise ValueError(f"cannot crop {th}x{tw} out of {height}x{width}")
    top, left = (height - th) // 2, (width - tw) // 2
    return left, top, left + tw, top + th


def fit_to(img: Image.Image, target: Size) -> Image.Image:
    """Resize ``img`` (bicubic, antialiased) to cover ``target`` and center-crop it to ``(H, W)``."""
    w, h = img.size
    nh, nw = cover_size(h, w, target)
    if (nh, nw) != (h, w):
        # Pillow's filters widen their support when shrinking: this is the antialiased bicubic
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if (nh, nw) != tuple(target):
        img = img.crop(center_crop_box(nh, nw, target))
    return img


# --- decoding one photo ---------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: Pillow's own conversion to 8 bits clips at 255 instead of scaling
        grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency before the alpha is dropped
    # the alpha channel is dropped (as torchvision's folder loader does), not composited
    return img.convert("RGB")


def read_image(path: str | os.PathLike, size: Size) -> np.ndarray:
    """Decode one JPEG/PNG photo to uint8 ``(H, W, 3)`` RGB at ``size = (H, W)``.

    Raises :class:`DataError` naming the file if it cannot be decoded (corrupt, truncated, not a
    JPEG or PNG, or larger than Pillow's decompression-bomb limit).
    """
    try:
        with Image.open(path, formats=_DECODERS) as img:
            upright = ImageOps.exif_transpose(img)  # a loaded copy, turned the way the camera stood
        return np.asarray(fit_to(_to_rgb(upright), size), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a JPEG or PNG image") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def check_image(path: str | os.PathLike) -> None:
    """Open ``path``'s header without decoding the pixels; :class:`DataError` if it is unusable.

    Catches files that are empty, not JPEG/PNG, over the decompression-bomb limit, or PNGs whose
    chunks fail their checksums. A JPEG cut short inside its pixel data passes (the header is
    intact) and fails when it is read.
    """
    try:
        with Image.open(path, formats=_DECODERS) as img:
            img.verify()  # PNG: walks the chunks and checks their CRCs, without inflating them
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a JPEG or PNG image") from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


# --- batching, shared by both sources -------------------------------------------------------


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded uniform subset of ``limit`` of ``n`` items, as ``ImageSet.subset``.

    None where the subset is everything (``limit`` None or at least ``n``).
    """
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class _Batched:
    """``batches`` / ``to_image_set`` over ``_read(i)`` (one image) and ``_labels`` (or None)."""

    _labels: np.ndarray | None

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def batches(self, batch_size: int, *, workers: int = 0) -> Iterator[Batch]:
        """Yield ``(x uint8 (B, H, W, 3), y int64 (B,) or None)`` in order, ``B <= batch_size``.

        Only the images of the batch being yielded are decoded and held. ``workers > 0`` decodes
        each batch's images in that many threads (Pillow releases the GIL while decoding and
        resizing); the result is the same, in the same order, as without threads.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ConfigError(f"decoding workers must be >= 0, got {workers}")
        n = len(self)
        if workers == 0:
            for s in range(0, n, batch_size):
                yield self._batch(range(s, min(s + batch_size, n)), map)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="legonet-decode") as pool:
            for s in range(0, n, batch_size):
                yield self._batch(range(s, min(s + batch_size, n)), pool.map)

    def _batch(self, idx: range, mapper) -> Batch:
        x = np.stack(list(mapper(self._read, idx)))  # map keeps the order, threaded or not
        return x, None if self._labels is None else self._labels[idx.start : idx.stop]

    def to_image_set(self, *, workers: int = 0) -> ImageSet:
        """Decode every image into one :class:`~legonet.data.ImageSet` (for sets that must sit in
        memory anyway, such as calibration images)."""
        parts = [x for x, _ in self.batches(256, workers=workers)]
        return ImageSet(np.concatenate(parts), self._labels)


# --- the two sources ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FolderImages(_Batched):
    """Photos in ``root``: ``files`` relative POSIX paths (in order), ``labels`` int64 ``(N,)`` or
    None, decoded to ``size = (H, W)``; ``classes`` the subfolder names where labels come from them."""

    root: Path
    files: tuple[str, ...]
    size: Size
    labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None

    @property
    def _labels(self) -> np.ndarray | None:
        return self.labels

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> np.ndarray:
        return read_image(self.root / self.files[i], self.size)

    def subset(self, limit: int | None, seed: int = 0) -> FolderImages:
        """A seeded uniform random subset of ``limit`` photos (same draw as ``ImageSet.subset``)."""
        idx = subset_indices(len(self), limit, seed)
        if idx is None:
            return self
        return replace(self, files=tuple(self.files[i] for i in idx),
                       labels=None if self.labels is None else self.labels[idx])

    def check(self) -> None:
        """Open every photo's header (no decoding); :class:`DataError` naming the first bad one."""
        for name in self.files:
            check_image(self.root / name)


@dataclass(frozen=True, eq=False)
class ArrayImages(_Batched):
    """An npz :class:`~legonet.data.ImageSet`, served in batches; images whose size differs from
    ``size`` are resized and center-cropped as photos are (``size`` None: as stored)."""

    images: ImageSet
    size: Size | None = None

    @property
    def _labels(self) -> np.ndarray | None:
        return self.images.y

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, i: int) -> np.ndarray:
        x = self.images.x[i]
        if self.size is None or x.shape[:2] == tuple(self.size):
            return x
        return np.asarray(fit_to(Image.fromarray(x), self.size), dtype=np.uint8)

    def subset(self, limit: int | None, seed: int = 0) -> ArrayImages:
        """A seeded uniform random subset of ``limit`` images (``ImageSet.subset``)."""
        return replace(self, images=self.images.subset(limit, seed))

    def check(self) -> None:
        """Nothing to do: the npz was validated when it was read."""


# --- listing a folder -----------------------------------------------------------------------


def _visible(entries: Sequence[Path]) -> list[Path]:
    return [p for p in entries if not p.name.startswith(".")]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _list_folder(root: Path) -> tuple[list[str], list[str]]:
    """(relative paths of the images in ``root`` and one level down, sorted; subfolder names, sorted)."""
    try:
        top = _visible(list(root.iterdir()))
        subdirs = sorted(p.name for p in top if p.is_dir())
        files = [p.name for p in top if _is_image(p)]
        for d in subdirs:
            files += [f"{d}/{p.name}" for p in _visible(list((root / d).iterdir())) if _is_image(p)]
    except OSError as exc:
        raise DataError(f"{exc.filename or root}: cannot list the folder ({exc.strerror or exc})") from None
    if not files:
        raise DataError(f"{root}: no images (*.jpg, *.jpeg, *.png) in the folder or its subfolders")
    return sorted(files), subdirs


def _labels_from_csv(csv_path: Path, files: list[str]) -> np.ndarray:
    """int64 ``(N,)`` labels of ``files`` from ``csv_path`` (``file,label``); every image needs a row."""
    index = {name: i for i, name in enumerate(files)}
    labels = np.full(len(files), -1, dtype=np.int64)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            if header != ["file", "label"]:
                raise DataError(f"{csv_path}: the header must be 'file,label', got {','.join(header)!r}")
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                line = reader.line_num
                if len(row) != 2:
                    raise DataError(f"{csv_path}: line {line}: expected 'file,label', got {len(row)} fields")
                name = PurePosixPath(row[0].strip().replace("\\", "/")).as_posix()
                if name not in index:
                    raise DataError(f"{csv_path}: line {line}: no image {name!r} in {csv_path.parent}")
                i = index[name]
                if labels[i] >= 0:
                    raise DataError(f"{csv_path}: line {line}: a second row for {name!r}")
                text = row[1].strip()
                if not (text.isascii() and text.isdigit()):
                    raise DataError(f"{csv_path}: line {line}: label {text!r} of {name!r} is not a "
                                    "non-negative integer")
                labels[i] = int(text)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the labels ({exc})") from None
    missing = np.flatnonzero(labels < 0)
    if missing.size:
        raise DataError(f"{csv_path}: no row for {files[missing[0]]!r} "
                        f"({missing.size} of {len(files)} images have none)")
    return labels


def _labels_from_subfolders(root: Path, files: list[str], classes: list[str]) -> np.ndarray:
    """Each image's class index: the position of its subfolder among the sorted ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    labels = np.empty(len(files), dtype=np.int64)
    for i, name in enumerate(files):
        folder, _, _ = name.rpartition("/")
        if not folder:
            raise DataError(f"{root / name}: no label (no {LABELS_FILE} in {root}, and the image is "
                            "not in a class subfolder)")
        labels[i] = index[folder]
    return labels


def open_folder(path: str | os.PathLike, *, size: Size, labels: bool = True) -> FolderImages:
    """List the photos of a folder (and their labels where ``labels``); decodes nothing."""
    root = Path(path)
    files, subdirs = _list_folder(root)
    if not labels:
        return FolderImages(root, tuple(files), tuple(size))
    csv_path = root / LABELS_FILE
    if csv_path.is_file():
        return FolderImages(root, tuple(files), tuple(size), _labels_from_csv(csv_path, files))
    return FolderImages(root, tuple(files), tuple(size), _labels_from_subfolders(root, files, subdirs),
                        tuple(subdirs))


def open_images(path: str | os.PathLike, *, size: Size | None, labels: bool = True) -> FolderImages | ArrayImages:
    """A folder of photos or an npz (``x`` uint8 ``(N, H, W, 3)``, ``y``), as images of ``size = (H, W)``.

    ``labels`` False: for calibration, no labels are read (``y`` is None in every batch). ``size``
    None keeps an npz's images as stored; a folder needs the model's input size.
    """
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ConfigError(f"image size must be (height, width) >= 1, got {size}")
    if Path(path).is_dir():
        if size is None:
            raise DataError(f"{path}: a folder of photos needs the model's input size to resize to")
        return open_folder(path, size=size, labels=labels)
    return ArrayImages(load_images(path, labels=labels), None if size is None else tuple(size))
