"""Where HQ (or ready LQ/GT) images come from: skimage's bundled images, its bundled LFW face
crops, or a user folder (local, or an s3://bucket/prefix that is downloaded to a temp dir first)."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file or folder."""


@dataclass
class SourceImage:
    name: str
    gt: np.ndarray  # uint8 (H, W, 3)
    lq: np.ndarray | None = None  # given only for ready pairs


def _rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from grey, RGB or RGBA of uint8, uint16 (scaled by 65535) or floats in
    [0, 1]; alpha is composited over white (a transparent pixel shows the page, not black)."""
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"integer pixels of {arr.dtype} outside 0..65535")
        # uint16 is 16-bit; other integer arrays holding 0..255 are 8-bit values.
        arr = arr.astype(np.float64) / (255.0 if arr.max() <= 255 and arr.dtype != np.uint16 else 65535.0)
    elif arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = np.clip(arr.astype(np.float64), 0, 1)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 2:  # grey + alpha
        arr = np.concatenate([np.repeat(arr[..., :1], 3, axis=-1), arr[..., 1:]], axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:]
        arr = arr[..., :3] * alpha + (1 - alpha)
    return np.ascontiguousarray((arr * 255 + 0.5).astype(np.uint8))


def load_skimage(names: list[str], key: str = "prepare.source.images") -> list[SourceImage]:
    """The bundled skimage.data images `names`; errors name the params `key` that lists them."""
    import skimage.data

    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise DataError(f"{key}: '{name}' is not an image in skimage.data")
        try:
            image = loader()
            if isinstance(image, tuple):  # stereo_motorcycle: (left view, right view, disparity)
                image = image[0]
            images.append(SourceImage(name, _rgb(np.asarray(image))))
        except Exception as err:  # e.g. images that skimage would download on demand
            raise DataError(f"{key}: skimage.data.{name} could not be loaded "
                            f"offline: {err}") from None
    return images


LFW_FACES = 100  # skimage.data.lfw_subset(): 100 face crops, then 100 non-face crops


def load_faces(count: int, size: int) -> list[SourceImage]:
    """The first `count` face crops of skimage's `lfw_subset` (LFW, 25x25 grey, in [0, 1]),
    each a source image named lfw_000, lfw_001, ...

    A crop is a whole face, so it is resized to one patch (`size` x `size`, bicubic; at 32 px
    an upscale of 1.28) instead of being cut into patches, which would keep only part of a
    face, and its grey level is repeated into 3 channels, as for grey skimage images. The
    GT is therefore smoother than a camera image of that size; the degradations act on it as
    on any patch."""
    import skimage.data
    from skimage.transform import resize

    if not 1 <= count <= LFW_FACES:
        raise DataError(f"prepare.source.face_count: {count}; lfw_subset has {LFW_FACES} faces")
    faces = skimage.data.lfw_subset()[:count]
    return [SourceImage(f"lfw_{i:03d}", _rgb(resize(face, (size, size), order=3, anti_aliasing=False)))
            for i, face in enumerate(faces)]


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("RGB") would clip it at 255
                return _rgb(np.asarray(im).astype(np.uint16))
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                return _rgb(np.asarray(im.convert("RGBA")))
            return _rgb(np.asarray(im.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    return files


def load_folder(folder: Path) -> list[SourceImage]:
    return [SourceImage(p.stem, read_image(p)) for p in _image_files(folder)]


def load_pairs(folder: Path) -> list[SourceImage]:
    """`folder/gt/NAME.ext` and `folder/lq/NAME.ext` with the same stem and size."""
    gt_files = {p.stem: p for p in _image_files(folder / "gt")}
    lq_files = {p.stem: p for p in _image_files(folder / "lq")}
    for stem in sorted(set(gt_files) ^ set(lq_files)):
        present = gt_files.get(stem) or lq_files.get(stem)
        raise DataError(f"{present}: has no counterpart in {folder / ('lq' if stem in gt_files else 'gt')}")
    images = []
    for stem in sorted(gt_files):
        gt, lq = read_image(gt_files[stem]), read_image(lq_files[stem])
        if gt.shape != lq.shape:
            raise DataError(f"{lq_files[stem]}: size {lq.shape[1]}x{lq.shape[0]} does not match "
                            f"{gt_files[stem]} ({gt.shape[1]}x{gt.shape[0]})")
        images.append(SourceImage(stem, gt, lq))
    return images


@contextlib.contextmanager
def local_source(path: str, endpoint: str | None = None) -> Iterator[Path]:
    """A local directory for `path`: itself, or a temp copy of an s3:// prefix (removed after).

    Errors about the copy name the s3:// URI, not the temp dir.
    """
    if not path.startswith("s3://"):
        yield Path(path)
        return
    from pipeline.storage import download_prefix

    with tempfile.TemporaryDirectory(prefix="restorl-source-") as tmp:
        download_prefix(path, Path(tmp), endpoint)
        try:
            yield Path(tmp)
        except DataError as err:
            raise DataError(str(err).replace(tmp, path.rstrip("/"))) from None
