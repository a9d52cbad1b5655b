"""Folders of photos (and npz files) read as evaluation / calibration images, a batch at a time.

Every photo is made here with Pillow; PNG where a test compares pixels exactly, JPEG where the
format itself matters.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import legonet.io.images as images_mod
from legonet.data import ImageSet, load_images
from legonet.errors import ConfigError, DataError
from legonet.io.images import (
    ArrayImages,
    FolderImages,
    center_crop_box,
    cover_size,
    fit_to,
    open_images,
    read_image,
)

BUNDLED_NPZ = Path(__file__).resolve().parents[2] / "legonet" / "data" / "cifar10-test-1000.npz"
ORIENTATION = 0x0112  # the EXIF tag


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 (h, w, 3) picture plus a little noise (JPEG-friendly, every pixel distinct enough)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy + 40 * seed) % 256], -1)
    noise = np.random.default_rng(seed).integers(0, 16, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def write_csv(folder: Path, rows: list[str]) -> Path:
    path = folder / "labels.csv"
    path.write_text("file,label\n" + "".join(r + "\n" for r in rows))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG that claims ``width x height`` 1-bit pixels: a few bytes, a decompression bomb."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """Seven photos of assorted sizes, formats and extension cases, a labels.csv, and clutter."""
    d = tmp_path / "flat"
    names = ["b.JPG", "a.png", "c.jpeg", "e.Png", "d.jpg", "g.png", "f.PNG"]
    for i, name in enumerate(names):
        save(d / name, photo(20 + 3 * i, 30 - 2 * i, seed=i))
    (d / "notes.txt").write_text("not an image")
    save(d / "skip.gif", photo(8, 8))
    (d / "._a.png").write_bytes(b"\0\x05\x16\x07 AppleDouble")  # macOS companion file: not an image
    write_csv(d, [f"{n},{10 + i}" for i, n in enumerate(names)])
    return d


# --- the resize and crop rule ---------------------------------------------------------------


def test_cover_size_hand_computed():
    assert cover_size(375, 500, (224, 224)) == (224, 298)  # 500 * 224 / 375 = 298.67, truncated
    assert cover_size(500, 375, (224, 224)) == (298, 224)
    assert cover_size(224, 224, (224, 224)) == (224, 224)
    assert cover_size(100, 50, (224, 224)) == (448, 224)  # small photos are scaled up
    assert cover_size(480, 640, (224, 320)) == (240, 320)  # non-square: the width binds here
    assert cover_size(480, 640, (300, 320)) == (300, 400)


def test_center_crop_box_hand_computed():
    assert center_crop_box(224, 298, (224, 224)) == (37, 0, 261, 224)
    assert center_crop_box(224, 299, (224, 224)) == (37, 0, 261, 224)  # odd surplus: extra pixel right
    assert center_crop_box(301, 224, (224, 224)) == (0, 38, 224, 262)
    with pytest.raises(ValueError):
        center_crop_box(200, 300, (224, 224))


def test_read_image_is_bicubic_resize_then_center_crop(tmp_path: Path):
    arr = photo(75, 100)
    path = save(tmp_path / "p.png", arr)
    got = read_image(path, (32, 32))
    # by hand: 75x100 -> shorter side 32 -> 32 x 42 (100 * 32 / 75 = 42.67), crop columns 5..37
    want = np.asarray(Image.fromarray(arr).resize((42, 32), Image.Resampling.BICUBIC))[:, 5:37]
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, want)


def test_photo_at_the_exact_size_is_untouched_and_a_cover_is_only_cropped(tmp_path: Path):
    arr = photo(24, 40)
    np.testing.assert_array_equal(read_image(save(tmp_path / "p.png", arr), (24, 40)), arr)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", (24, 32)), arr[:, 4:36])


# --- colour modes and orientation -----------------------------------------------------------


def test_other_colour_modes_come_out_rgb(tmp_path: Path):
    rgb = photo(16, 16)
    grey = save(tmp_path / "grey.png", rgb[..., 0])
    rgba = save(tmp_path / "rgba.png", np.dstack([rgb, np.full((16, 16), 7, np.uint8)]))
    pal = tmp_path / "pal.png"
    Image.fromarray(rgb).quantize(8).save(pal)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=95)
    deep = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 0x1234, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")

    g = read_image(grey, (16, 16))
    np.testing.assert_array_equal(g, np.repeat(rgb[..., :1], 3, axis=2))
    np.testing.assert_array_equal(read_image(rgba, (16, 16)), rgb)  # alpha dropped, colours kept
    np.testing.assert_array_equal(read_image(pal, (16, 16)), np.asarray(Image.open(pal).convert("RGB")))
    c = read_image(cmyk, (16, 16))
    assert c.shape == (16, 16, 3) and np.abs(c.astype(int) - rgb).mean() < 12
    np.testing.assert_array_equal(read_image(deep, (16, 16)), np.full((16, 16, 3), 0x12, np.uint8))


def test_exif_orientation_is_applied(tmp_path: Path):
    arr = photo(20, 40)
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored sideways: shown turned 90 degrees clockwise
    path = tmp_path / "sideways.png"
    Image.fromarray(arr).save(path, exif=exif)
    np.testing.assert_array_equal(read_image(path, (40, 20)), np.rot90(arr, k=-1))
    jpg = tmp_path / "sideways.jpg"
    Image.fromarray(arr).save(jpg, exif=exif, quality=95)
    upright = read_image(jpg, (40, 20))
    assert np.abs(upright.astype(int) - np.rot90(arr, k=-1)).mean() < 6


# --- folder layouts and labels --------------------------------------------------------------


def test_flat_folder_with_labels_csv(flat: Path):
    src = open_images(flat, size=(16, 16))
    assert isinstance(src, FolderImages)
    assert src.files == ("a.png", "b.JPG", "c.jpeg", "d.jpg", "e.Png", "f.PNG", "g.png")
    np.testing.assert_array_equal(src.labels, [11, 10, 12, 14, 13, 16, 15])
    assert src.labels.dtype == np.int64 and src.classes is None
    batches = list(src.batches(3))
    assert [x.shape for x, _ in batches] == [(3, 16, 16, 3), (3, 16, 16, 3), (1, 16, 16, 3)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), src.labels)
    np.testing.assert_array_equal(batches[0][0][0], read_image(flat / "a.png", (16, 16)))


def test_class_subfolders_give_sorted_class_indices(tmp_path: Path):
    for cls, n in [("n02", 2), ("n01", 3), ("n04", 1)]:
        for i in range(n):
            save(tmp_path / cls / f"{i}.jpg", photo(12, 12, seed=i))
    (tmp_path / "n03").mkdir()  # an empty class folder still holds its place in the order
    (tmp_path / "n01" / "deeper").mkdir()
    save(tmp_path / "n01" / "deeper" / "x.jpg", photo(12, 12))  # two levels down: not listed
    src = open_images(tmp_path, size=(8, 8))
    assert src.classes == ("n01", "n02", "n03", "n04")
    assert src.files == ("n01/0.jpg", "n01/1.jpg", "n01/2.jpg", "n02/0.jpg", "n02/1.jpg", "n04/0.jpg")
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 3])


def test_labels_csv_takes_precedence_over_subfolders(tmp_path: Path):
    save(tmp_path / "cat" / "1.png", photo(8, 8))
    save(tmp_path / "dog" / "2.png", photo(8, 8))
    write_csv(tmp_path, ["dog/2.png,281", "cat/1.png,207"])
    src = open_images(tmp_path, size=(8, 8))
    np.testing.assert_array_equal(src.labels, [207, 281])
    assert src.classes is None


def test_calibration_needs_no_labels_and_ignores_labels_csv(tmp_path: Path):
    save(tmp_path / "top.jpg", photo(10, 10))
    save(tmp_path / "cls" / "inner.png", photo(10, 10))
    (tmp_path / "labels.csv").write_text("garbage\n")
    src = open_images(tmp_path, size=(8, 8), labels=False)
    assert src.files == ("cls/inner.png", "top.jpg") and src.labels is None
    assert all(y is None for _, y in src.batches(1))


# --- errors a user can cause ----------------------------------------------------------------


def one_line_error(fn, *needles: object) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


def test_a_folder_without_images_names_the_folder(tmp_path: Path):
    (tmp_path / "readme.txt").write_text("photos to come")
    (tmp_path / "sub").mkdir()
    one_line_error(lambda: open_images(tmp_path, size=(8, 8)), tmp_path, "no images")


@pytest.mark.parametrize(("rows", "needles"), [
    (["a.png,1", "missing.png,2"], ["line 3", "missing.png"]),
    (["a.png,1", "b.png,2", "a.png,1"], ["line 4", "a.png", "second row"]),
    (["a.png,cat", "b.png,2"], ["line 2", "'cat'", "integer"]),
    (["a.png,-1", "b.png,2"], ["line 2", "'-1'"]),
    (["a.png,1.5", "b.png,2"], ["line 2", "'1.5'"]),
    (["a.png,1,extra", "b.png,2"], ["line 2", "3 fields"]),
    (["a.png,1"], ["no row for 'b.png'", "1 of 2"]),
])
def test_labels_csv_problems_name_the_csv_and_the_row(tmp_path: Path, rows, needles):
    save(tmp_path / "a.png", photo(8, 8))
    save(tmp_path / "b.png", photo(8, 8))
    csv_path = write_csv(tmp_path, rows)
    one_line_error(lambda: open_images(tmp_path, size=(8, 8)), csv_path, *needles)


def test_labels_csv_with_a_wrong_header(tmp_path: Path):
    save(tmp_path / "a.png", photo(8, 8))
    (tmp_path / "labels.csv").write_text("image,class\na.png,1\n")
    one_line_error(lambda: open_images(tmp_path, size=(8, 8)), tmp_path / "labels.csv", "file,label")


def test_labels_csv_from_a_spreadsheet_is_read(tmp_path: Path):
    save(tmp_path / "a.png", photo(8, 8))
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbffile,label\r\n./a.png, 3\r\n\r\n")  # BOM, CRLF, blank
    np.testing.assert_array_equal(open_images(tmp_path, size=(8, 8)).labels, [3])


def test_an_image_outside_the_class_subfolders_has_no_label(tmp_path: Path):
    save(tmp_path / "cls" / "a.png", photo(8, 8))
    save(tmp_path / "stray.png", photo(8, 8))
    one_line_error(lambda: open_images(tmp_path, size=(8, 8)), tmp_path / "stray.png", "no label")


def make_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / ("bad.png" if kind in ("bomb", "checksum") else "bad.jpg")
    if kind == "checksum":
        data = bytearray(save(path, photo(32, 32)).read_bytes())
        data[data.index(b"IDAT") + 20] ^= 0xFF  # one flipped bit pattern in the pixel data
        path.write_bytes(bytes(data))
    elif kind == "truncated":
        save(path, photo(64, 64), quality=90)
        path.write_bytes(path.read_bytes()[:-400])
    elif kind == "text":
        path.write_text("this is not a photo\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        png_header_only(path, 20_000, 20_000)  # 4e8 pixels: over twice Pillow's default limit
    return path


@pytest.mark.parametrize(("kind", "needle", "caught_by_check"), [
    ("truncated", "unreadable image", False),
    ("text", "not a JPEG or PNG", True),
    ("empty", "not a JPEG or PNG", True),
    ("bomb", "too large to decode safely", True),
    ("checksum", "unreadable image", True),
])
def test_a_bad_image_fails_when_it_is_read_and_check_catches_header_damage(tmp_path, kind, needle,
                                                                          caught_by_check):
    for i in range(4):
        save(tmp_path / f"good{i}.png", photo(8, 8, seed=i))
    bad = make_bad(tmp_path, kind)  # "bad.*" sorts first
    src = open_images(tmp_path, size=(8, 8), labels=False)
    assert src.files[0] == bad.name
    one_line_error(lambda: next(src.batches(2)), bad, needle)
    one_line_error(lambda: next(src.batches(2, workers=2)), bad, needle)
    if caught_by_check:
        one_line_error(src.check, bad, needle)
    else:
        src.check()  # the header is intact: only decoding finds a JPEG cut short
    moved = tmp_path / ("zz" + bad.suffix)
    bad.rename(moved)  # now the last of five: the first two batches are read before it fails
    later = open_images(tmp_path, size=(8, 8), labels=False)
    it = later.batches(2)
    next(it), next(it)
    one_line_error(lambda: next(it), moved)


# --- order, subsets, batching ---------------------------------------------------------------


def test_order_and_subsets_are_deterministic_and_match_imageset(tmp_path: Path):
    names = [f"{i:02d}.png" for i in range(12)]
    for i, name in reversed(list(enumerate(names))):  # created in reverse order: the listing sorts
        save(tmp_path / name, photo(8, 8, seed=i))
    write_csv(tmp_path, [f"{n},{i}" for i, n in enumerate(names)])
    src = open_images(tmp_path, size=(8, 8))
    assert src.files == tuple(names)
    sub = src.subset(5, seed=3)
    assert sub.files == open_images(tmp_path, size=(8, 8)).subset(5, seed=3).files
    reference = ImageSet(np.zeros((12, 1, 1, 3), np.uint8), np.arange(12, dtype=np.int64)).subset(5, seed=3)
    np.testing.assert_array_equal(sub.labels, reference.y)  # label i marks image i: the same draw
    assert list(sub.files) == sorted(sub.files) and len(sub) == 5
    assert src.subset(5, seed=4).files != sub.files
    assert src.subset(None) is src and src.subset(12) is src
    with pytest.raises(DataError):
        src.subset(0)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_decode_one_batch_at_a_time(flat: Path, monkeypatch, workers):
    decoded: list[str] = []
    real = images_mod.read_image

    def counting(path, size):
        decoded.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(images_mod, "read_image", counting)
    it = open_images(flat, size=(8, 8)).batches(3, workers=workers)
    x, y = next(it)
    assert len(x) == 3 and sorted(decoded) == ["a.png", "b.JPG", "c.jpeg"]
    next(it)
    assert len(decoded) == 6
    assert sum(len(x) for x, _ in it) == 1 and len(decoded) == 7


def test_threads_give_identical_batches(flat: Path):
    src = open_images(flat, size=(12, 10))
    plain = list(src.batches(2))
    threaded = list(src.batches(2, workers=3))
    assert len(plain) == len(threaded) == 4
    for (x0, y0), (x1, y1) in zip(plain, threaded):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
    whole = src.to_image_set(workers=2)
    np.testing.assert_array_equal(whole.x, np.concatenate([x for x, _ in plain]))
    np.testing.assert_array_equal(whole.y, src.labels)


def test_threads_keep_the_order_when_decodes_finish_out_of_order(flat: Path, monkeypatch):
    real = images_mod.read_image
    delays = {"a.png": 0.06, "b.JPG": 0.03, "c.jpeg": 0.0}  # the first image of a batch finishes last

    def slow(path, size):
        time.sleep(delays.get(Path(path).name, 0.0))
        return real(path, size)

    src = open_images(flat, size=(8, 8))
    want = next(src.batches(3))[0]
    monkeypatch.setattr(images_mod, "read_image", slow)
    np.testing.assert_array_equal(next(src.batches(3, workers=3))[0], want)


def test_bad_batch_options_and_a_folder_without_a_size(flat: Path):
    src = open_images(flat, size=(8, 8))
    with pytest.raises(ConfigError):
        next(src.batches(0))
    with pytest.raises(ConfigError):
        next(src.batches(2, workers=-1))
    one_line_error(lambda: open_images(flat, size=None), flat, "input size")


# --- npz files through the same interface ---------------------------------------------------


def test_npz_at_the_input_size_is_served_as_stored():
    src = open_images(BUNDLED_NPZ, size=(32, 32))
    ref = load_images(BUNDLED_NPZ)
    assert isinstance(src, ArrayImages) and len(src) == len(ref)
    xs, ys = zip(*src.batches(300))
    np.testing.assert_array_equal(np.concatenate(xs), ref.x)
    np.testing.assert_array_equal(np.concatenate(ys), ref.y)
    sub, ref_sub = src.subset(50, seed=7), ref.subset(50, seed=7)
    np.testing.assert_array_equal(next(sub.batches(50))[1], ref_sub.y)


def test_npz_of_another_size_is_resized_like_photos(tmp_path: Path):
    x = np.stack([photo(30, 40, seed=i) for i in range(3)])
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=np.array([4, 5, 6]))
    src = open_images(path, size=(16, 16), labels=False)
    got, y = next(src.batches(8))
    assert y is None and got.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(got[1], np.asarray(fit_to(Image.fromarray(x[1]), (16, 16))))
    as_png = read_image(save(tmp_path / "one.png", x[1]), (16, 16))
    np.testing.assert_array_equal(got[1], as_png)  # the same pixels as the photo route
    np.testing.assert_array_equal(next(open_images(path, size=None).batches(8))[0], x)
