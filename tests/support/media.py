"""Real footage and photos for tests, read from wheels installed with the dev extra."""

from __future__ import annotations

import functools
import importlib.util
import itertools
from pathlib import Path

import cv2

from stream_worker.replay import encode_jpeg, footage_path, iter_images


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed: run scripts/setup (it installs the dev extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def skimage_photo(name: str) -> Path:
    """A photo shipped in scikit-image's data folder, e.g. ``chelsea.png`` (a cat)."""
    return _package_dir("skimage") / "data" / name


@functools.cache
def street_jpegs(count: int, quality: int = 85) -> tuple[bytes, ...]:
    """``count`` JPEG frames of bikes.mp4, a street scene at 640x272 (looping after its 250)."""
    images = itertools.islice(iter_images(str(footage_path()), loop=True), count)
    return tuple(encode_jpeg(image, quality, None) for image in images)


def photo_png(name: str) -> bytes:
    """A scikit-image photo as PNG bytes."""
    return skimage_photo(name).read_bytes() if name.endswith(".png") else _reencode(name, ".png")


def photo_jpeg(name: str, quality: int = 90) -> bytes:
    """A scikit-image photo as JPEG bytes."""
    return _reencode(name, ".jpg", quality)


def _reencode(name: str, ext: str, quality: int = 90) -> bytes:
    image = cv2.imread(str(skimage_photo(name)), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"cannot read {skimage_photo(name)}")
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    return cv2.imencode(ext, image, params)[1].tobytes()
